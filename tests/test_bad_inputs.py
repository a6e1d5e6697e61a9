"""Bad or unlucky inputs, as a new user makes them: through the CLI each is a non-zero exit with one
line naming the problem and no traceback; through the API a ValueError/TypeError naming it, the
model left exactly as it was."""

import errno
import json
import math
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vidtok
from vidtok import DyToK, Uniform, VisionZip
from vidtok.cli import main
from vidtok.testbed.toy import ASSETS, build_tokenizer, build_toy_model

from helpers import assert_unchanged, snapshot

Q = "what shape is red ?"
SAMPLE = str(ASSETS / "sample" / "sample.mp4")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Checkpoint folders with one thing wrong each, a split, and paths that cannot be written."""
    root = tmp_path_factory.mktemp("broken")
    good = root / "good"
    build_toy_model("test").save_pretrained(good)
    build_tokenizer().save_pretrained(good)
    import shutil

    for name in ("badconfig", "noweights", "badweights", "truncweights", "notokenizer"):
        shutil.copytree(good, root / name)
    (root / "badconfig" / "config.json").write_text("{ not json")
    (root / "noweights" / "model.safetensors").unlink()
    (root / "badweights" / "model.safetensors").write_bytes(b"garbage" * 10)
    weights = (good / "model.safetensors").read_bytes()
    (root / "truncweights" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    for f in (root / "notokenizer").iterdir():
        if "token" in f.name or "chat" in f.name:
            f.unlink()
    (root / "a-file").write_text("not a folder")
    split = root / "split"
    split.mkdir()
    (split / "questions.jsonl").write_text('{"video": "v.mp4", "question": "q", "answer": "a"}\n{"video": "v.mp4", "quest\n')
    (root / "oksplit").mkdir()
    (root / "oksplit" / "questions.jsonl").write_text('{"video": "v.mp4", "question": "q", "answer": "a"}\n')
    (root / "intvideo").mkdir()
    (root / "intvideo" / "questions.jsonl").write_text('{"video": "v.mp4", "question": "q", "answer": "a"}\n{"video": 5, "question": "q", "answer": "a"}\n')
    (root / "needle99").mkdir()
    (root / "needle99" / "questions.jsonl").write_text(f'{{"id": 3, "video": "{SAMPLE}", "question": "q", "answer": "a", "needle_frame": 99, "frames": 16}}\n')
    (root / "bench.json").write_text(json.dumps({"name": "x", "main": {"path": str(root / "missing")}}))
    (root / "bench-warmup.json").write_text(json.dumps({"name": "x", "main": {"path": str(root / "missing")}, "warmup": -1}))
    return root


def _cli(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    return code, capsys.readouterr().err


CLI_CASES = [
    (["run", "--frames", "0"], "--frames: expected a whole number >= 1"),
    (["run", "--max-new-tokens", "0"], "expected a whole number >= 1"),
    (["eval", "{root}/split", "--limit", "0"], "--limit: expected a whole number >= 1"),
    (["run", "--model", "{root}/badconfig"], "cannot read the model config"),
    (["run", "--model", "{root}/noweights"], "cannot load the model weights"),
    (["run", "--model", "{root}/badweights"], "cannot load the model weights"),
    (["run", "--model", "{root}/truncweights"], "cannot load the model weights"),
    (["run", "--model", "{root}/notokenizer"], "cannot load the tokenizer"),
    (["run", "--model", "{root}/a-file"], "no model at"),
    (["run", "--assistant", "{root}/noweights"], "cannot load the model weights"),
    (["run", SAMPLE, "what <|im_end|> shape ?"], "special token"),
    (["run", SAMPLE, "what <video> shape ?"], "special token"),
    (["run", "--guide", "self", "--layers", "1.5"], "cannot read layers"),
    (["viz", "--out", "{root}/viz.txt"], "cannot write a figure as 'txt'"),
    (["viz", "--out", "{root}/a-file/viz.png"], "a-file' is a file"),
    (["viz", "--out", "{root}"], "is a folder"),
    (["eval", "{root}/oksplit", "--out", "{root}/a-file"], "is a file"),
    (["eval", "{root}/missing-split"], "no split"),
    (["eval", "{root}/split", "--out", "{root}/ev"], "questions.jsonl:2 is not valid JSON"),
    (["synth", "{root}/a-file/s", "--count", "1"], "cannot write"),
    (["calibrate", "{root}/oksplit", "--plot", "{root}/p.xyz"], "cannot write a figure as 'xyz'"),
    (["calibrate", "{root}/needle99", "--dry-run"], "record id 3 (" + SAMPLE + "): needle_frame 99 is outside its 16 frames"),
    (["eval", "{root}/intvideo", "--out", "{root}/ev"], "questions.jsonl:2: 'video' must be a string"),
    (["eval", "{root}/oksplit", "--retentions", "abc", "--out", "{root}/ev"], "--retentions: expected comma-separated numbers"),
    (["bench", "{root}/bench.json", "--warmup", "-1", "--out", "{root}/b"], "--warmup: expected a whole number >= 0"),
    (["bench", "{root}/bench.json", "--repeats", "0", "--out", "{root}/b"], "--repeats: expected a whole number >= 1"),
    (["bench", "{root}/bench-warmup.json", "--out", "{root}/b"], "warmup -1 in"),
    (["bench", "{root}/bench.json", "--out", "{root}/a-file/b"], "cannot write"),
    (["bench", "{root}/bench.json", "--out", "{root}/b"], "cannot load the checkpoint"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_clear_line(capsys, broken, args, message):
    code, err = _cli(capsys, *[a.format(root=broken) for a in args])
    assert code == 2, err
    assert message in err and "Traceback" not in err
    for out in (broken / "ev", broken / "b"):  # refused before anything was written (the checked folder may exist, empty)
        assert not out.exists() or not any(out.iterdir())


EARLY_CASES = [  # refused from the arguments alone: no model may load first
    (["eval", "{root}/oksplit", "--methods", "visionzap"], "unknown methods/guides ['visionzap']"),
    (["eval", "{root}/oksplit", "--guides", "sef"], "unknown methods/guides ['sef']"),
    (["eval", "{root}/oksplit", "--retentions", "0.5,2"], "retention must be a number in (0, 1], got 2.0"),
    (["eval", "{root}/oksplit", "--layers", "1.5"], "cannot read layers '1.5'"),
    (["eval", "{root}/oksplit", "--layers", "1-2-3"], "cannot read layers '1-2-3'"),
    (["calibrate", "{root}/needle99", "--model", "{root}/good"], "cannot write to the model folder"),
]


@pytest.mark.parametrize("args, message", EARLY_CASES, ids=[" ".join(a)[:60] for a, _ in EARLY_CASES])
def test_cli_refuses_bad_arguments_before_loading_a_model(capsys, broken, monkeypatch, args, message):
    import vidtok.cli
    import vidtok.harness.files

    def no_load(*_):
        raise AssertionError("a model was loaded before the arguments were checked")

    def unwritable(path, what="--out"):
        if "model folder" in what:
            raise vidtok.harness.files.OutputError(f"cannot write to {what} {str(path)!r} (Read-only file system); choose a writable folder")
        return real(path, what)

    real = vidtok.harness.files.writable_dir
    monkeypatch.setattr(vidtok.cli, "_load", no_load)
    monkeypatch.setattr(vidtok.harness.files, "writable_dir", unwritable)
    code, err = _cli(capsys, *[a.format(root=broken) for a in args], "--out", str(broken / "ev")) if args[0] == "eval" else _cli(
        capsys, *[a.format(root=broken) for a in args])
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_full_disk_is_one_line_and_keeps_finished_work(capsys, tmp_path, monkeypatch):
    from vidtok.harness.files import JsonlLog
    from vidtok.testbed.synth import write_split

    write_split(tmp_path / "split", seed=3, count=3)
    real, calls = JsonlLog.append, []

    def append(self, record, durable=True):
        calls.append(record)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, record, durable)

    monkeypatch.setattr(JsonlLog, "append", append)
    args = ["eval", str(tmp_path / "split"), "--methods", "visionzip", "--guides", "none", "--retentions", "0.5", "--out", str(tmp_path / "e"), "--quiet"]
    code, err = _cli(capsys, *args)
    assert code == 2 and "No space left on device" in err and "free some disk space" in err and "Traceback" not in err
    assert len((tmp_path / "e" / "full-none-r1" / "predictions.jsonl").read_text().splitlines()) == 1  # finished work kept


def test_cli_internal_errors_say_so_and_debug_shows_the_traceback(capsys, monkeypatch):
    import vidtok.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(vidtok.pipeline, "generate", boom)
    code, err = _cli(capsys, "run")
    assert code == 1 and "internal error: RuntimeError: something inside broke" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["run", "--debug"])
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["--debug", "run"])


def test_cli_in_a_real_process_prints_no_traceback(broken):
    done = subprocess.run([sys.executable, "-m", "vidtok.cli", "run", "--model", str(broken / "badweights")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "cannot load the model weights" in done.stderr


def test_figure_without_a_suffix_is_written_exactly_there(tmp_path):
    out = tmp_path / "picture"
    assert main(["viz", "--retention", "0.125", "--out", str(out), "--max-new-tokens", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["picture"]


# API --------------------------------------------------------------------------------------------


def _nan_pixels(pixels):
    bad = pixels.clone()
    bad[1, 0, 3, 3] = float("nan")
    return bad


def _inf_pixels(pixels):
    bad = pixels.clone()
    bad[0, 2, 0, 0] = float("inf")
    return bad


API_CASES = [
    ("frames 0", lambda m, t, p: vidtok.prepare(m, t, p, Q, Uniform(0.5), frames=0), ValueError, "frames must be a whole number"),
    ("frames 2.5", lambda m, t, p: vidtok.prepare(m, t, p, Q, Uniform(0.5), frames=2.5), ValueError, "frames must be a whole number"),
    ("zero-size frames", lambda m, t, p: vidtok.prepare(m, t, np.zeros((4, 0, 0, 3), np.uint8), Q, Uniform(0.5)), ValueError, "H>0, W>0"),
    ("NaN pixels", lambda m, t, p: vidtok.prepare(m, t, _nan_pixels(p), Q, Uniform(0.5)), ValueError, "NaN or infinite"),
    ("inf pixels", lambda m, t, p: vidtok.generate(m, t, _inf_pixels(p), Q, DyToK(Uniform(0.5))), ValueError, "NaN or infinite"),
    ("layer 1.5", lambda m, t, p: vidtok.prepare(m, t, p, Q, DyToK(Uniform(0.5), layers=[1.5])), ValueError, "whole numbers, got 1.5"),
    ("layer 2.0", lambda m, t, p: vidtok.prepare(m, t, p, Q, DyToK(Uniform(0.5), layers=[1, 2.0])), ValueError, "whole numbers"),
    ("layer 16.23", lambda m, t, p: vidtok.prepare(m, t, p, Q, DyToK(Uniform(0.5), layers=16.23)), ValueError, "layers must be"),
    ("model as a path", lambda m, t, p: vidtok.prepare("/ckpt/llava", t, p, Q, Uniform(0.5)), TypeError, "got the path '/ckpt/llava'"),
    ("tokenizer as a path", lambda m, t, p: vidtok.prepare(m, "/ckpt/llava", p, Q, Uniform(0.5)), TypeError, "expected a loaded tokenizer"),
    ("guide None", lambda m, t, p: DyToK(Uniform(0.5), guide=None), ValueError, "got None"),
    ("guide as a path", lambda m, t, p: DyToK(Uniform(0.5), guide="/ckpt/small"), ValueError, "loaded assistant"),
    ("turn delimiter", lambda m, t, p: vidtok.prepare(m, t, p, "what <|im_end|> ?", VisionZip(0.5)), ValueError, "'<|im_end|>'"),
    ("image marker", lambda m, t, p: vidtok.prepare(m, t, p, "<image> what ?", VisionZip(0.5)), ValueError, "'<image>'"),
    ("video marker", lambda m, t, p: vidtok.prepare(m, t, p, "what <video> ?", DyToK(VisionZip(0.5))), ValueError, "'<video>'"),
    ("video as bytes", lambda m, t, p: vidtok.prepare(m, t, b"\x00\x00\x00 ftypmp42", Q, Uniform(0.5)), ValueError,
     "video was given as bytes (an encoded file's bytes?); vidtok takes a video file path"),
    ("video None", lambda m, t, p: vidtok.prepare(m, t, None, Q, Uniform(0.5)), ValueError, "video was given as NoneType"),
    ("video an int", lambda m, t, p: vidtok.prepare(m, t, 3, Q, Uniform(0.5)), ValueError, "video was given as int (3); vidtok takes"),
    ("numpy float frames", lambda m, t, p: vidtok.prepare(m, t, np.zeros((4, 64, 64, 3), np.float32), Q, Uniform(0.5)), ValueError,
     "np.clip(frames * 255, 0, 255).round().astype(np.uint8)"),
    ("guide a tokenizer", lambda m, t, p: DyToK(Uniform(0.5), guide=t), TypeError, "a tokenizer: pass the assistant model itself"),
    ("cache a dict", lambda m, t, p: vidtok.prepare(m, t, p, Q, Uniform(0.5), cache={}), TypeError, "cache must be a vidtok.VideoCache"),
    ("cache a string", lambda m, t, p: vidtok.prepare(m, t, p, Q, Uniform(0.5), cache="x"), TypeError, "got str"),
    ("inf weight", lambda m, t, p: vidtok.allocate_budgets([1.0, math.inf], 4, 4), ValueError, "finite"),
    ("NaN weight", lambda m, t, p: vidtok.allocate_budgets([math.nan, 1.0], 4, 4), ValueError, "finite"),
]


@pytest.mark.parametrize("case, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_a_clear_error(model, tokenizer, pixels, case, call, error, message):
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(message)):
        call(model, tokenizer, pixels)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method, who", [(Uniform(0.5), "model"), (DyToK(Uniform(0.1)), "guide")])
def test_prompt_over_the_position_limit_is_refused_naming_it(tokenizer, pixels, method, who):
    model = build_toy_model("test")
    model.config.text_config.max_position_embeddings = 30  # 4 frames x 16 tokens do not fit uncompressed
    with torch.no_grad():  # transformers adds its own recording hooks at the first video forward (see conftest)
        model.model.get_video_features(torch.zeros(1, 1, 3, 64, 64))
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"the {who}'s prompt is \d+ tokens, over its position limit of 30"):
        vidtok.prepare(model, tokenizer, pixels, Q, method)
    assert_unchanged(model, before)


def test_generation_past_the_position_limit_warns(tokenizer, pixels):
    model = build_toy_model("test")
    model.config.text_config.max_position_embeddings = 30
    with pytest.warns(UserWarning, match="position limit of 30"):
        vidtok.generate(model, tokenizer, pixels, Q, Uniform(0.25), max_new_tokens=20)


def test_integral_layer_types_are_accepted(model, tokenizer, pixels):
    plan = vidtok.prepare(model, tokenizer, pixels, Q, DyToK(Uniform(0.5), layers=[np.int64(1), 2])).plan
    assert plan.guide_layers == [1, 2]


def test_eval_config_refuses_a_zero_limit():
    from vidtok.harness.evaluate import EvalConfig

    with pytest.raises(ValueError, match="limit"):
        EvalConfig(split="x", limit=0)


# allocate_budgets on weights whose sum overflows ------------------------------------------------


def _within_one_of_exact_share(weights, total, budgets):
    """Independent of the implementation: exact rational shares; largest remainder is within one token."""
    mass = sum(Fraction(w) for w in weights)
    for w, b in zip(weights, budgets):
        exact = Fraction(w) / mass * total if mass else Fraction(total, len(weights))
        assert abs(b - exact) < 1 + Fraction(1, 10**9), (weights, total, budgets)


@pytest.mark.parametrize(
    "weights",
    [[1e308] * 3, [1.7e308, 1e-300, 1e308, 5e-324], [sys.float_info.max] * 5, [sys.float_info.max, 0.0, sys.float_info.max / 3]],
)
def test_overflowing_weight_sums_keep_the_sum_exact(weights):
    for total in range(len(weights) * 8 + 1):
        budgets = vidtok.allocate_budgets(weights, total, 8 * len(weights))
        assert sum(budgets) == total
        _within_one_of_exact_share(weights, total, budgets)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, sys.float_info.max, allow_nan=False, allow_infinity=False), min_size=1, max_size=10), st.integers(0, 200))
def test_any_finite_weights_give_exactly_the_total(weights, total):
    cap = -(-total // len(weights)) + 3
    budgets = vidtok.allocate_budgets(weights, total, cap)
    assert sum(budgets) == total and all(0 <= b <= cap for b in budgets)
    if total <= cap:  # the cap cannot bind: proportional up to rounding
        _within_one_of_exact_share(weights, total, budgets)
