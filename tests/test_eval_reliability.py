"""`vidtok eval` never reports stale numbers and never loses finished work (shipped toy models, tiny splits)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vidtok.harness.evaluate import EvalConfig, ResultMismatchError, evaluate
from vidtok.testbed.synth import write_split
from vidtok.testbed.toy import load_default


@pytest.fixture(scope="module")
def toy():
    model, tokenizer, assistant, note = load_default()
    assert note is None
    return model, tokenizer, assistant


@pytest.fixture
def split(tmp_path):
    out = tmp_path / "split"
    write_split(out, seed=99, count=6)
    return out


def _config(split, out, **kwargs):
    return EvalConfig(split=str(split), out=str(out), methods=["visionzip"], guides=["none"], retentions=[0.125], **kwargs)


def _rows(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def _numbers(summaries):
    keep = ("method", "guide", "retention", "samples", "failed", "accuracy", "accuracy_ci95", "needle_survival", "mean_kept_tokens")
    return [{k: s[k] for k in keep} for s in summaries]


def test_a_limited_run_is_never_reported_as_the_whole_split(toy, split, tmp_path):
    out = tmp_path / "eval"
    limited = evaluate(_config(split, out, limit=2), *toy, progress=False)
    assert all(s["samples"] == 2 for s in limited)
    with pytest.raises(ResultMismatchError, match=r"limit 2 -> null.*--overwrite"):
        evaluate(_config(split, out), *toy, progress=False)
    assert json.loads((out / "visionzip-none-r0.125" / "results.json").read_text())["samples"] == 2  # refused: nothing touched
    notes = []
    full = evaluate(_config(split, out), *toy, progress=False, overwrite=True, log=notes.append)
    assert all(s["samples"] == 6 for s in full) and any("recomputing" in n for n in notes)
    assert len(_rows(out / "full-none-r1")) == 6


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda split, config: (split / "questions.jsonl").write_text((split / "questions.jsonl").read_text().replace('"answer": "', '"answer": "x')), "split_sha256"),
        (lambda split, config: config.__setattr__("layers", "0"), "guide_layers"),
        (lambda split, config: config.__setattr__("seed", 5), "seed"),
    ],
)
def test_any_change_of_identity_is_refused(toy, split, tmp_path, change, field):
    config = EvalConfig(split=str(split), out=str(tmp_path), methods=["random"], guides=["self"], retentions=[0.25], limit=2, layers="1")
    evaluate(config, *toy, progress=False)
    change(split, config)
    with pytest.raises(ResultMismatchError, match=field):
        evaluate(config, *toy, progress=False)


def test_another_model_is_refused(toy, split, tmp_path):
    import copy

    import torch

    model, tokenizer, assistant = toy
    evaluate(_config(split, tmp_path, limit=1), model, tokenizer, assistant, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ResultMismatchError, match="model"):
        evaluate(_config(split, tmp_path, limit=1), other, tokenizer, assistant, progress=False)


def test_results_of_an_older_vidtok_are_not_reused(toy, split, tmp_path):
    folder = tmp_path / "full-none-r1"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"method": "full", "accuracy": 1.0, "samples": 200}))
    with pytest.raises(ResultMismatchError, match="without an identity record"):
        evaluate(_config(split, tmp_path), *toy, progress=False)


def test_a_torn_last_line_is_named_and_its_sample_recomputed(toy, split, tmp_path):
    reference = evaluate(_config(split, tmp_path / "ref", limit=3), *toy, progress=False)
    out = tmp_path / "eval"
    evaluate(_config(split, out, limit=3), *toy, progress=False)
    predictions = out / "visionzip-none-r0.125" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(lines[:2]) + lines[2][:25])  # killed while writing sample 2
    (out / "full-none-r1" / "results.json").write_text('{"method": "fu')  # a summary cut short
    notes = []
    resumed = evaluate(_config(split, out, limit=3), *toy, progress=False, log=notes.append)
    assert any(f"{predictions} line 3 is truncated" in n for n in notes)
    assert any("full-none-r1/results.json is damaged" in n for n in notes)
    assert _numbers(resumed) == _numbers(reference)
    assert [r["index"] for r in _rows(out / "visionzip-none-r0.125")] == [0, 1, 2]


def test_failed_samples_are_recorded_and_the_run_goes_on(toy, split, tmp_path, capsys):
    video = split / "videos" / "00001.mp4"
    original = video.read_bytes()
    video.write_bytes(b"not a video")
    records = [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()]
    records[3]["needle_frame"] = 99
    (split / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from vidtok.cli import main

    out = tmp_path / "eval"
    assert main(["eval", str(split), "--methods", "visionzip", "--guides", "none", "--retentions", "0.125", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "2 sample(s) failed" in stdout
    summary = json.loads((out / "visionzip-none-r0.125" / "results.json").read_text())
    assert summary["samples"] == 4 and summary["failed"] == 2
    reasons = {f["index"]: f["reason"] for f in summary["failures"]}
    assert "cannot read video" in reasons[1] and "needle_frame 99 is outside the video's 16 frames" in reasons[3]
    # a failed sample is retried on the next run (the video is fixed); the others are not recomputed
    video.write_bytes(original)
    again = evaluate(_config(split, out), *toy, progress=False)
    assert [(s["samples"], s["failed"]) for s in again] == [(5, 1), (5, 1)]
    assert len(_rows(out / "visionzip-none-r0.125")) == 6 + 2  # the two retries appended, nothing else


def test_a_second_eval_on_the_same_folder_is_refused(toy, split, tmp_path):
    import fcntl

    with open(tmp_path / ".vidtok-eval.lock", "a+") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match=r"another vidtok eval \(pid 4242\)"):
            evaluate(_config(split, tmp_path), *toy, progress=False)


def _kill_when(command, env, path, lines):
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while process.poll() is None:
            if path.is_file() and path.read_text().count("\n") >= lines:
                os.kill(process.pid, signal.SIGKILL)  # by its own pid: nothing else is touched
                break
            time.sleep(0.01)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return process.returncode, stderr


@pytest.mark.parametrize("batch", ["1", "2"])
def test_killed_twice_then_resumed_equals_an_uninterrupted_run(toy, tmp_path, batch):
    split = tmp_path / "split"
    write_split(split, seed=98, count=8)  # room after the kill points, so a busy machine's late kill still lands mid-run
    guides = ["none", "assistant"]
    reference = evaluate(
        EvalConfig(split=str(split), out=str(tmp_path / "ref"), methods=["visionzip"], guides=guides, retentions=[0.125]),
        *toy, progress=False,
    )  # fmt: skip
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "vidtok.cli", "eval", str(split), "--methods", "visionzip", "--guides", ",".join(guides),
               "--retentions", "0.125", "--out", str(out), "--quiet", "--batch-size", batch]  # fmt: skip
    first = out / "full-none-r1" / "predictions.jsonl"
    for lines in (1, 3):
        code, stderr = _kill_when(command, dict(os.environ), first, lines)
        assert code == -signal.SIGKILL, f"the run was not interrupted (exit {code}): {stderr}"
        assert not (out / "visionzip-assistant-r0.125" / "results.json").exists()
    done = len(_rows(out / "full-none-r1"))
    assert 3 <= done < 8
    # as if the kill had landed mid-write as well
    torn = out / "visionzip-assistant-r0.125" / "predictions.jsonl"
    with open(torn, "a") as f:
        f.write('{"index": 7, "id": 7, "pred')
    notes = []
    resumed = evaluate(
        EvalConfig(split=str(split), out=str(out), methods=["visionzip"], guides=guides, retentions=[0.125]),
        *toy, progress=False, log=notes.append,
    )  # fmt: skip
    assert any(str(torn) in n and "truncated" in n for n in notes)
    assert _numbers(resumed) == _numbers(reference)
    for name in ("full-none-r1", "visionzip-none-r0.125", "visionzip-assistant-r0.125"):
        rows, ref = _rows(out / name), _rows(tmp_path / "ref" / name)
        assert sorted(r["index"] for r in rows) == list(range(8)), f"{name}: every sample exactly once"
        assert [(r["prediction"], r["budgets"], r["needle_kept"]) for r in sorted(rows, key=lambda r: r["index"])] == [
            (r["prediction"], r["budgets"], r["needle_kept"]) for r in ref
        ]


def test_results_json_always_agrees_with_the_predictions(toy, split, tmp_path, monkeypatch):
    """A run stopped (kill, full disk) after a retried sample was appended but before results.json
    was rewritten: the next plain run must not report the old results.json."""
    import errno

    import vidtok.harness.evaluate as ev

    video = split / "videos" / "00001.mp4"
    original = video.read_bytes()
    video.write_bytes(b"not a video")
    out = tmp_path / "eval"
    assert [(s["samples"], s["failed"]) for s in evaluate(_config(split, out, limit=3), *toy, progress=False)] == [(2, 1), (2, 1)]
    video.write_bytes(original)
    real = ev.atomic_write_json

    def full_disk(path, data):
        if str(path).endswith("results.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ev, "atomic_write_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        evaluate(_config(split, out, limit=3), *toy, progress=False)
    monkeypatch.setattr(ev, "atomic_write_json", real)
    assert len(_rows(out / "visionzip-none-r0.125")) == 4  # the retry is in predictions.jsonl, results.json is old
    notes = []
    again = evaluate(_config(split, out, limit=3), *toy, progress=False, log=notes.append)
    assert [(s["samples"], s["failed"]) for s in again] == [(3, 0), (3, 0)]
    for name in ("full-none-r1", "visionzip-none-r0.125"):
        stored = json.loads((out / name / "results.json").read_text())
        assert (stored["samples"], stored["failed"]) == (3, 0)
    assert any("did not match" in n for n in notes)
    # a run with nothing new leaves results.json exactly as it is
    before = (out / "full-none-r1" / "results.json").read_bytes()
    assert _numbers(evaluate(_config(split, out, limit=3), *toy, progress=False)) == _numbers(again)
    assert (out / "full-none-r1" / "results.json").read_bytes() == before


def test_a_record_with_half_a_needle_label_is_a_failed_sample(toy, split, tmp_path, capsys):
    records = [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()]
    del records[1]["needle_token"]
    (split / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from vidtok.cli import main

    args = ["eval", str(split), "--methods", "visionzip", "--guides", "none", "--retentions", "0.125", "--limit", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0 and main(args) == 0  # and again: the failure is retried, never an internal error
    assert "1 sample(s) failed" in capsys.readouterr().out
    summary = json.loads((tmp_path / "visionzip-none-r0.125" / "results.json").read_text())
    assert summary["samples"] == 2 and "needle_frame but no needle_token" in summary["failures"][0]["reason"]


@pytest.mark.parametrize("line", ["{}", '{"index": "1"}', '{"index": 1}', "[1]"])
def test_a_prediction_line_that_is_not_a_prediction_is_named_and_recomputed(toy, split, tmp_path, line):
    reference = evaluate(_config(split, tmp_path / "ref", limit=3), *toy, progress=False)
    out = tmp_path / "eval"
    evaluate(_config(split, out, limit=3), *toy, progress=False)
    predictions = out / "visionzip-none-r0.125" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text(lines[0] + line + "\n" + lines[2])
    notes = []
    resumed = evaluate(_config(split, out, limit=3), *toy, progress=False, log=notes.append)
    assert any(f"{predictions} line 2 is damaged" in n for n in notes), notes
    assert _numbers(resumed) == _numbers(reference)
    assert sorted(r["index"] for r in _rows(out / "visionzip-none-r0.125")) == [0, 1, 2]
    notes.clear()
    evaluate(_config(split, out, limit=3), *toy, progress=False, log=notes.append)
    assert not notes  # the damaged line was cut out of the file, not just skipped


def _count_forwards(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_configurations_share_one_encode_per_tower_and_answer_as_alone(toy, split, tmp_path, monkeypatch):
    """Every configuration on a video reuses one vision encode (per tower and signal need) and one
    guide pass per guide; each prediction, budget and weight equals a call that shares nothing."""
    from vidtok import adapter_for, generate
    from vidtok.compressors import build_method
    from vidtok.testbed.synth import read_split

    model, tokenizer, assistant = toy
    config = EvalConfig(split=str(split), out=str(tmp_path / "shared"), methods=["visionzip", "uniform"], guides=["none", "self", "assistant"],
                        retentions=[0.125, 0.25], limit=2)
    calls, handle = _count_forwards(model.model.vision_tower)
    try:
        evaluate(config, model, tokenizer, assistant, progress=False)
    finally:
        handle.remove()
    # 13 configurations (full + 2 x 3 x 2) per video; the tower (sdpa) runs once per video, its
    # VisionZip signals read for all: the configurations that read none get bitwise the same features
    assert len(calls) == 2
    sharing = json.loads((tmp_path / "shared" / "sharing.json").read_text())
    assert sharing["videos"] == 2 and sharing["configurations"] == 26 and sharing["computed"]["vision"] == 2
    # per video one self and one assistant pass over that one encoding, where every guided
    # configuration would run its own (8 per video)
    assert sharing["computed"]["guide"] == 2 * 2 and sharing["computed"]["guide_vision"] == 2
    assert sharing["saved_seconds"]["vision"] > 0
    records = read_split(split)[:2]
    for folder in (tmp_path / "shared").iterdir():
        if not folder.is_dir():
            continue
        identity = json.loads((folder / "identity.json").read_text())
        method, guide, retention = identity["method"], identity["guide"], identity["retention"]
        built = build_method(method, None if method == "full" else retention, guide, assistant, identity["guide_layers"], seed=0)
        for row, record in zip(_rows(folder), records):
            pixels = adapter_for(model).pixels(record["video"], record.get("frames"))  # as the evaluation decodes it
            alone = generate(model, tokenizer, pixels, record["question"], built, max_new_tokens=2)
            assert row["prediction"] == (alone.text.split() or [""])[0] and row["budgets"] == alone.plan.budgets
            assert row["frame_weights"] == alone.plan.frame_weights


def test_a_video_cache_refuses_another_video_or_sampling(toy):
    import numpy as np

    from vidtok import VideoCache, VisionZip, prepare

    model, tokenizer, _ = toy
    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    cache = VideoCache(frames)
    prepare(model, tokenizer, frames, "what shape is red ?", VisionZip(0.25), cache=cache)
    with pytest.raises(ValueError, match="belongs to another video"):
        prepare(model, tokenizer, frames + 1, "what shape is red ?", VisionZip(0.25), cache=cache)
    prepare(model, tokenizer, frames.copy(), "what shape is red ?", VisionZip(0.25), cache=cache)  # the same content: the same video
    with pytest.raises(ValueError, match="sampled with frames, fps"):
        prepare(model, tokenizer, frames, "what shape is red ?", VisionZip(0.25), frames=4, cache=cache)
