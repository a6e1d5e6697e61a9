"""The trained toy pair, the synthetic generator, eval / calibrate / viz end to end (shipped weights, offline)."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vidtok
from vidtok import DyToK, VisionZip
from vidtok.calibration import calibrated_layers, default_guide_layers
from vidtok.testbed.synth import make_sample, read_split, samples, write_split
from vidtok.testbed.toy import ASSETS, load_default


@pytest.fixture(scope="module")
def toy():
    model, tokenizer, assistant, note = load_default()
    assert note is None, "the trained toy models must ship with the package"
    return model, tokenizer, assistant


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    # seed 99: not the training stream (seed 0), not the committed eval (1) or calibration (7) splits
    out = tmp_path_factory.mktemp("split")
    write_split(out, seed=99, count=24)
    return out


def test_generator_is_deterministic():
    a, b = next(samples(5, 1)), next(samples(5, 1))
    assert np.array_equal(a.frames, b.frames) and a.question == b.question and a.needles == b.needles
    assert not np.array_equal(a.frames, next(samples(6, 1)).frames)


def test_generator_is_query_conditioned():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = make_sample(rng, frames=16, needles=3)
        frames = {n["frame"] for n in s.needles}
        colours = [n["colour"] for n in s.needles]
        assert len(frames) == 3 and len(set(colours)) == 3
        asked = [n for n in s.needles if n["colour"] in s.question]
        assert len(asked) == 1 and asked[0]["shape"] == s.answer and asked[0]["frame"] == s.needle_frame
        # the needle colour appears in exactly one cell of the whole video
        assert (s.labels[..., 0] == vidtok.testbed.toy.COLOURS.index(asked[0]["colour"]) + 1).sum() == 1
        r, c = divmod(s.needle_token, 4)
        cell = s.frames[s.needle_frame, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
        assert cell.any()


def test_split_round_trip(split):
    records = read_split(split)
    assert len(records) == 24
    frames = vidtok.read_frames(records[0]["video"], records[0]["frames"])
    assert frames.shape == (16, 64, 64, 3)
    with pytest.raises(ValueError, match="no split"):
        read_split(split / "missing")


def test_shipped_tokenizer_prompt_ends_with_a_template_token(toy):
    model, tokenizer, _ = toy
    ids = vidtok.adapter_for(model).input_ids(tokenizer, "what shape is red ?", 5)
    assert tokenizer.convert_ids_to_tokens(int(ids[0, -1])) == "assistant"


def test_shipped_models_answer_and_dytok_keeps_accuracy(toy, split):
    """Regression guard for the core: full accuracy, and DyToK at 12.5% far above static VisionZip."""
    model, tokenizer, assistant = toy
    records = read_split(split)
    layers = calibrated_layers(model)
    methods = {
        "full": None,
        "static": VisionZip(0.125),
        "self": DyToK(VisionZip(0.125), layers=layers),
        "assistant": DyToK(VisionZip(0.125), guide=assistant, layers=calibrated_layers(assistant)),
    }
    correct = dict.fromkeys(methods, 0)
    for r in records:
        pixels = vidtok.adapter_for(model).pixels(r["video"], 16)
        for name, method in methods.items():
            text = vidtok.generate(model, tokenizer, pixels, r["question"], method, max_new_tokens=2).text
            correct[name] += text.split()[:1] == [r["answer"]]
    n = len(records)
    assert correct["full"] / n >= 0.95
    assert correct["self"] / n >= 0.9 and correct["assistant"] / n >= 0.9
    assert correct["static"] / n <= 0.75  # the task needs the right frame: static budgets must lose it


def test_calibration_is_stored_with_the_models():
    for name in ("toy-main", "toy-assistant"):
        stored = json.loads((ASSETS / name / "vidtok.json").read_text())
        assert stored["guide_layers"] and all(isinstance(x, int) for x in stored["guide_layers"])


def test_calibrate_finds_the_prior_layer(toy, split):
    from vidtok.harness.analysis import calibrate

    model, tokenizer, _ = toy
    result = calibrate(model, tokenizer, read_split(split)[:12])
    layers = result["prior"]["layers"]
    best = max(layers, key=lambda r: r["needle_mass"])
    assert best["needle_mass"] > 5 * best["uniform_share"]
    assert best["layer"] in result["guide_layers"]


def test_eval_end_to_end_and_skips_finished_runs(toy, split, tmp_path):
    from vidtok.harness.evaluate import EvalConfig, evaluate

    model, tokenizer, assistant = toy
    config = EvalConfig(split=str(split), out=str(tmp_path), methods=["visionzip"], guides=["none", "assistant"], retentions=[0.125], limit=6)
    summaries = evaluate(config, model, tokenizer, assistant, progress=False)
    assert {(s["method"], s["guide"]) for s in summaries} == {("full", "none"), ("visionzip", "none"), ("visionzip", "assistant")}
    for s in summaries:
        assert s["samples"] == 6 and 0 <= s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1] <= 1
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    predictions = (tmp_path / "visionzip-assistant-r0.125" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6 and "needle_kept" in json.loads(predictions[0])
    stamp = (tmp_path / "visionzip-none-r0.125" / "results.json").stat().st_mtime_ns
    evaluate(config, model, tokenizer, assistant, progress=False)
    assert (tmp_path / "visionzip-none-r0.125" / "results.json").stat().st_mtime_ns == stamp


def test_wilson_interval():
    from vidtok.harness.evaluate import wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_viz_writes_a_png(tmp_path):
    from vidtok.cli import main

    out = tmp_path / "viz.png"
    assert main(["viz", "--out", str(out), "--retention", "0.125"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_smoke(tmp_path):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from vidtok.testbed.train import main

    main(["--out", str(tmp_path), "--geometry", "test", "--vision-steps", "2", "--steps", "2", "--batch", "2"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    result = vidtok.generate(model, tokenizer, torch.zeros(2, 3, 64, 64), "what shape is red ?", VisionZip(0.5), max_new_tokens=1)
    assert result.plan.visual_tokens_kept == 16
    assert "auxiliary" in (tmp_path / "README.md").read_text()
    # the auxiliary heads and the probe stay out of the checkpoint: exactly the architecture's weights
    assert model.state_dict().keys() == vidtok.testbed.toy.build_toy_model("test").state_dict().keys()


def _imported_siblings(path: Path, package: str) -> set[str]:
    """Modules of `package` a file imports, at its top or inside a function (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith(f"vidtok.{package}."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith(f"vidtok.{package}."))
    return found


def test_testbed_modules_import_each_other_without_a_circle():
    # toy, synth and events once imported each other (events <-> toy <-> synth); the words they
    # share live in vocab.py, which imports nothing
    folder = Path(vidtok.__file__).parent / "testbed"
    graph = {f.stem: _imported_siblings(f, "testbed") - {f.stem} for f in folder.glob("*.py") if f.stem != "__init__"}
    assert graph["vocab"] == set()
    assert "events" not in graph["toy"] and "toy" not in graph["synth"] and "toy" not in graph["events"]
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import circle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done or node not in graph:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_calibration_is_core_and_reads_the_checkpoint_folder(tmp_path):
    # the calibrated layers belong to a checkpoint: the core module reads them, importing nothing
    # from the testbed, the harness or the integrations
    source = (Path(vidtok.__file__).parent / "calibration.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith(("testbed", "harness", "integrations")), node.module
            assert node.level == 0, "calibration.py imports nothing from the package"

    class Model:
        name_or_path = str(tmp_path)

    assert calibrated_layers(Model()) is None and calibrated_layers(None) is None
    (tmp_path / "vidtok.json").write_text(json.dumps({"guide_layers": [1]}))
    assert calibrated_layers(Model()) == [1]
    assert default_guide_layers("self", Model(), None) == [1]
    assert default_guide_layers("assistant", None, Model()) == [1]
    assert default_guide_layers("inline", Model(), None, fastv_layer=2) == [1]
    assert default_guide_layers("inline", Model(), None, fastv_layer=1) is None
    assert default_guide_layers("none", Model(), Model()) is None


def test_a_qwen_pair_member_fine_tunes_from_its_folder_with_its_tower_frozen(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vidtok.testbed.train import main

    first = tmp_path / "first"
    common = ["--family", "qwen2_5_vl", "--geometry", "test", "--batch", "2", "--steps", "2", "--anneal", "2"]
    main([*common, "--out", str(first), "--vision-steps", "1", "--curriculum", "2"])
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(first).state_dict()
    tuned = first  # in place, as the documented command does
    main([*common, "--out", str(tuned), "--start", str(first), "--curriculum", "2,4", "--anneal-lengths", "all"])
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(tuned).state_dict()
    assert before.keys() == after.keys()  # the training-only heads stay out of the checkpoint
    visual = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)  # the pair still shares the tower, merger included
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    history = json.loads((tuned / "training.json").read_text())["history"]
    assert {h["frames"] for h in history[-2:]} == {2, 4}  # the annealing steps take the curriculum's lengths in turn
    card = (tuned / "README.md").read_text()
    assert f"--start {first}" in card and "--anneal-lengths all" in card and "two steps: from scratch" in card
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--start", str(first)])  # LLaVA-OV's needle task has no --start
