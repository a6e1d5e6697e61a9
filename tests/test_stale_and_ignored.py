"""Silent wrong results: a cache or an evaluation that outlives its video, options that apply to
nothing, damaged weights answered as if fine (shipped toy models, tiny splits)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vidtok
from vidtok import DyToK, VideoCache, VisionZip
from vidtok.cli import main
from vidtok.compressors import GUIDES, METHODS
from vidtok.compressors.options import OPTIONS, options_table
from vidtok.harness.evaluate import EvalConfig, configurations, evaluate
from vidtok.testbed.synth import read_split, write_split
from vidtok.testbed.toy import ASSETS, load_default
from vidtok.video import read_frames, write_video

from helpers import assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    model, tokenizer, assistant, note = load_default()
    assert note is None
    return model, tokenizer, assistant


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    """Two needle videos whose questions differ in answer: (records, frames of each)."""
    out = tmp_path_factory.mktemp("two")
    write_split(out, seed=5, count=2)
    records = read_split(out)
    return records, [read_frames(r["video"], 16) for r in records]


def _guided(assistant):
    return DyToK(VisionZip(0.25), guide=assistant)


def test_frames_overwritten_in_place_are_recomputed_not_served_from_the_cache(toy, two_videos):
    model, tokenizer, assistant = toy
    records, (first, second) = two_videos
    frames = first.copy()
    cache = VideoCache(frames)
    question = records[1]["question"]
    vidtok.generate(model, tokenizer, frames, question, _guided(assistant), cache=cache, max_new_tokens=2)
    frames[:] = second  # another video in the same buffer
    cached = vidtok.generate(model, tokenizer, frames, question, _guided(assistant), cache=cache, max_new_tokens=2)
    fresh = vidtok.generate(model, tokenizer, second, question, _guided(assistant), max_new_tokens=2)
    assert not any(stage.endswith("_reused") for stage in cached.plan.seconds), cached.plan.seconds
    assert cache.refreshed == 1
    assert (cached.text, cached.plan.budgets, cached.plan.frame_weights) == (fresh.text, fresh.plan.budgets, fresh.plan.frame_weights)
    # unchanged content is still shared
    again = vidtok.generate(model, tokenizer, frames, question, _guided(assistant), cache=cache, max_new_tokens=2)
    assert "vision_reused" in again.plan.seconds and again.plan.frame_weights == fresh.plan.frame_weights


def test_a_video_file_rewritten_in_place_is_recomputed_and_a_path_is_a_path(toy, two_videos, tmp_path):
    model, tokenizer, assistant = toy
    records, (first, second) = two_videos
    path = tmp_path / "clip.mp4"
    write_video(path, first)
    cache = VideoCache(str(path))
    question = records[1]["question"]
    vidtok.generate(model, tokenizer, path, question, _guided(assistant), frames=16, cache=cache, max_new_tokens=2)  # Path for str
    assert cache.refreshed == 0
    write_video(path, second)
    rewritten = vidtok.generate(model, tokenizer, str(path), question, _guided(assistant), frames=16, cache=cache, max_new_tokens=2)
    fresh = vidtok.generate(model, tokenizer, str(path), question, _guided(assistant), frames=16, max_new_tokens=2)
    assert cache.refreshed == 1 and "vision_reused" not in rewritten.plan.seconds
    assert rewritten.plan.frame_weights == fresh.plan.frame_weights and rewritten.text == fresh.text


def test_eval_recomputes_a_sample_whose_video_file_was_replaced(toy, tmp_path):
    model, tokenizer, _ = toy
    split = tmp_path / "split"
    write_split(split, seed=7, count=3)
    config = dict(split=str(split), out=str(tmp_path / "out"), methods=["visionzip"], guides=["none"], retentions=[0.25])
    logs = []
    evaluate(EvalConfig(**config), model, tokenizer, progress=False, log=logs.append)
    predictions = tmp_path / "out" / "visionzip-none-r0.25" / "predictions.jsonl"
    lines = len(predictions.read_text().splitlines())
    evaluate(EvalConfig(**config), model, tokenizer, progress=False, log=logs.append)  # nothing changed: nothing recomputed
    assert len(predictions.read_text().splitlines()) == lines and not any("changed" in line for line in logs)

    records = read_split(split)
    shutil.copyfile(records[2]["video"], records[0]["video"])  # sample 0's file now holds sample 2's video
    evaluate(EvalConfig(**config), model, tokenizer, progress=False, log=logs.append)
    assert any("the video of 1 scored sample(s) changed" in line for line in logs), logs
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == lines + 1  # sample 0 again, nothing else
    latest = [r for r in rows if r["index"] == 0][-1]
    alone = vidtok.generate(model, tokenizer, records[0]["video"], records[0]["question"], VisionZip(0.25), frames=16, max_new_tokens=2)
    assert latest["video_file"]["sha256"] != rows[0]["video_file"]["sha256"]
    assert latest["prediction"] == (alone.text.split() or [""])[0] and latest["budgets"] == alone.plan.budgets


def test_eval_keeps_results_of_a_copied_split(toy, tmp_path):
    model, tokenizer, _ = toy
    split = tmp_path / "split"
    write_split(split, seed=7, count=2)
    config = dict(out=str(tmp_path / "out"), methods=["visionzip"], guides=["none"], retentions=[0.25])
    evaluate(EvalConfig(split=str(split), **config), model, tokenizer, progress=False, log=lambda *_: None)
    copy = tmp_path / "copy"
    shutil.copytree(split, copy)  # new mtimes and inodes, the same bytes
    logs = []
    evaluate(EvalConfig(split=str(copy), **config), model, tokenizer, progress=False, log=logs.append)
    predictions = tmp_path / "out" / "visionzip-none-r0.25" / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 2 and not any("changed" in line for line in logs)


# --- options that apply to nothing are refused, the same way everywhere -----------------------

VALUES = {"retention": 0.25, "layer": 3, "vision_retention": 0.5, "match_flops": 0.5, "seed": 1, "assistant": "toy-assistant",
          "layers": "0", "cap": 4, "floor": 1, "guide_pool": 2, "guide_stride": 2, "allocation": "binary"}
TABLE = "which applies to"


def test_every_option_has_a_value_here_and_the_docs_table_is_generated_from_the_code():
    assert set(VALUES) == {o.name for o in OPTIONS}
    assert options_table() in (ROOT / "docs" / "options.md").read_text(), "docs/options.md is stale: paste options_table()"


class _Reached(Exception):
    pass


def _run_refusal(monkeypatch, method, guide, option):
    """Whether `vidtok run` refuses the option by the table (it would otherwise go on to build the method)."""
    import vidtok.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: (None, None, None, None))
    monkeypatch.setattr(cli, "build_method", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    monkeypatch.setattr("vidtok.pipeline.fastv_retention_for_flops", lambda *a, **k: 0.5)
    value = VALUES[option.name]
    try:  # --debug: the error itself, not its one-line report
        main(["--debug", "run", "--method", method, "--guide", guide, option.flag, str(value)])
    except _Reached:
        return False
    except ValueError as error:
        return TABLE in str(error)
    raise AssertionError("vidtok run neither refused nor built a method")


def _lmms_refusal(method, guide, option):
    from vidtok.integrations.lmms_eval import ModelArgs, ModelArgsError

    raw = {"method": method, "guide": guide, option.name: VALUES[option.name]}
    if "+" in method and option.name != "vision_retention":
        raw["vision_retention"] = 0.5
    if guide == "assistant" and option.name != "assistant":
        raw["assistant"] = "toy-assistant"
    try:
        ModelArgs.parse(raw)
    except ModelArgsError as error:
        return TABLE in str(error.code)
    return False


def _eval_refusal(method, guide, option, tmp_path):
    try:
        EvalConfig(split=str(tmp_path), methods=[method], guides=[guide], **{option.name: VALUES[option.name]})
    except ValueError as error:  # None: refused for another reason first (inline without fastv): no configuration to compare
        return True if TABLE in str(error) else None
    return False


EVAL_OPTIONS = {"layers", "seed", "guide_pool", "guide_stride", "layer"}  # eval's own flags among the table's
BENCH_OPTIONS = {"layers", "guide_pool", "guide_stride", "layer", "allocation"}  # the keys of a bench config's run among the table's


def _bench_refusal(method, guide, option):
    from vidtok.harness.bench import BenchConfig

    run = {"method": method, "guide": guide, option.name: VALUES[option.name] if option.name != "layers" else "0"}
    try:
        BenchConfig(name="t", main={"toy": "test"}, guide={"toy": "test"}, runs=[run])
    except ValueError as error:
        return True if TABLE in str(error) else None  # None: refused for another reason first (a composed method, ...)
    return False


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_run_eval_and_lmms_eval_refuse_exactly_what_the_table_says(option, monkeypatch, capsys, tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is part of the README's setup")
    mismatches = []
    for method in METHODS:
        for guide in GUIDES:
            applies = option.test(method, guide)
            run = _run_refusal(monkeypatch, method, guide, option)
            if run == applies:
                mismatches.append(("run", method, guide))
            if option.name != "match_flops" and _lmms_refusal(method, guide, option) == applies:
                mismatches.append(("lmms-eval", method, guide))
            if option.name in EVAL_OPTIONS:  # an evaluation runs several configurations (full too): refused where none applies
                try:
                    runs = configurations(EvalConfig(split=str(tmp_path), methods=[method], guides=[guide]))
                except ValueError:
                    continue  # an evaluation that cannot be configured at all (inline without fastv)
                if _eval_refusal(method, guide, option, tmp_path) is any(option.test(m, g) for m, g, *_ in runs):
                    mismatches.append(("eval", method, guide))
            if option.name in BENCH_OPTIONS:
                refused = _bench_refusal(method, guide, option)
                if refused is not None and refused == applies:
                    mismatches.append(("bench", method, guide))
    assert not mismatches, mismatches


def test_eval_refuses_an_assistant_no_guide_reads(capsys, tmp_path):
    write_split(tmp_path / "s", seed=1, count=1)
    assert main(["eval", str(tmp_path / "s"), "--guides", "none,self", "--assistant", "toy-assistant", "--out", str(tmp_path / "o")]) == 2
    assert "--assistant sets the assistant model, which applies to guide assistant" in capsys.readouterr().err


# --- what a run reports --------------------------------------------------------------------------

def test_run_json_names_the_video_file_with_match_flops(capsys):
    assert main(["run", "--method", "fastv", "--guide", "none", "--match-flops", "1.0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["video"] == str(ASSETS / "sample" / "sample.mp4")


def test_keyframe_selection_names_itself(capsys):
    assert main(["run", "--method", "keyframe", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["method"], record["base"], record["allocation"]) == ("keyframe", "visionzip", "binary")
    assert main(["run", "--method", "keyframe"]) == 0
    assert "method:   keyframe selection (guide: assistant" in capsys.readouterr().out
    assert main(["run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["allocation"] == "proportional"


# --- damaged weights ------------------------------------------------------------------------------

def _corrupt(folder: Path, part: str) -> str:
    """Overwrite one float32 tensor of `part` with 0xFF bytes (NaN) under an intact safetensors header."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    name = next(k for k, v in header.items() if part in k and k.endswith("weight") and v.get("dtype") == "F32")
    start, end = header[name]["data_offsets"]
    data[8 + size + start : 8 + size + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("part, what", [("language_model.model.layers.0.mlp.down_proj", "logits"), ("vision_tower", "vision features")])
@pytest.mark.parametrize("guide", ["none", "assistant"])
def test_damaged_weights_are_named_not_answered(tmp_path, part, what, guide):
    folder = tmp_path / "damaged"
    shutil.copytree(ASSETS / "toy-main", folder)
    _corrupt(folder, part)
    command = [sys.executable, "-m", "vidtok.cli", "run", "--model", str(folder), "--guide", guide]
    command += ["--assistant", "toy-assistant"] if guide == "assistant" else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{folder} produces NaN/inf" in done.stderr and what in done.stderr and "Traceback" not in done.stderr


def test_damaged_guide_is_named_and_the_models_are_unchanged(toy):
    model, tokenizer, assistant = toy
    import copy

    import torch

    damaged = copy.deepcopy(assistant)
    with torch.no_grad():
        damaged.model.language_model.layers[0].self_attn.k_proj.weight.fill_(float("nan"))
    before, hooks = snapshot(model), snapshot(damaged)["hooks"]  # NaN != NaN: the damaged weights compare by hooks only
    frames = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(vidtok.ModelOutputError, match="produces NaN/inf attention"):
        vidtok.generate(model, tokenizer, frames, "what shape is red ?", DyToK(VisionZip(0.25), guide=damaged, layers=[1]))
    assert_unchanged(model, before)
    assert snapshot(damaged)["hooks"] == hooks
