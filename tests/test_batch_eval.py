"""`vidtok eval --batch-size N` writes what batch size 1 writes (shipped toy models, tiny splits)."""

import json

import pytest

from vidtok.harness.evaluate import EvalConfig, evaluate
from vidtok.testbed.synth import write_split
from vidtok.testbed.toy import load_default


@pytest.fixture(scope="module")
def toy():
    model, tokenizer, assistant, note = load_default()
    assert note is None
    return model, tokenizer, assistant


def _lines(folder):
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return {r["index"]: r for r in rows}  # the last line of a sample wins, as in the summary


def _same_rows(a, b):
    assert a.keys() == b.keys()
    for index in a:
        x, y = a[index], b[index]
        assert ("failed" in x) == ("failed" in y), index
        if "failed" in x:
            assert x["failed"] == y["failed"]
            continue
        assert (x["prediction"], x["budgets"], x["needle_kept"], x["kept_tokens"]) == (y["prediction"], y["budgets"], y["needle_kept"], y["kept_tokens"])
        if x["frame_weights"] is None:
            assert y["frame_weights"] is None
        else:
            assert max(abs(p - q) for p, q in zip(x["frame_weights"], y["frame_weights"])) < 1e-5


def test_batch_size_four_writes_what_batch_size_one_writes(toy, tmp_path):
    split = tmp_path / "split"
    write_split(split, seed=31, count=6)
    # one record the method cannot answer (the tokenizer's video marker in its question): it fails alone
    lines = (split / "questions.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["question"] = "what shape is <video> ?"
    lines[2] = json.dumps(record)
    (split / "questions.jsonl").write_text("\n".join(lines) + "\n")
    settings = dict(split=str(split), methods=["visionzip", "fastv"], guides=["none", "self", "assistant"], retentions=[0.25])
    one = evaluate(EvalConfig(out=str(tmp_path / "one"), **settings), *toy, progress=False, log=lambda *_: None)
    four = evaluate(EvalConfig(out=str(tmp_path / "four"), batch_size=4, **settings), *toy, progress=False, log=lambda *_: None)
    assert [s["accuracy"] for s in one] == [s["accuracy"] for s in four]
    assert all(s["failed"] == 1 and s["failures"][0]["index"] == 2 for s in four)
    for summary in one:
        folder = (tmp_path / "one" / summary["identity"]["method"]).parent
        name = next(p.name for p in folder.iterdir() if p.is_dir() and json.loads((p / "identity.json").read_text()) == summary["identity"])
        _same_rows(_lines(tmp_path / "one" / name), _lines(tmp_path / "four" / name))
    # the same identity: a batch size-1 folder resumes under --batch-size 4 with nothing to do
    again = evaluate(EvalConfig(out=str(tmp_path / "one"), batch_size=4, **settings), *toy, progress=False, log=lambda *_: None)
    assert [s["accuracy"] for s in again] == [s["accuracy"] for s in one]


def test_batch_size_must_be_a_whole_number(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        EvalConfig(split=str(tmp_path), batch_size=0)


def test_a_batch_out_of_memory_is_answered_one_record_at_a_time(toy, tmp_path, monkeypatch):
    import torch

    import vidtok.pipeline as pipeline

    split = tmp_path / "split"
    write_split(split, seed=32, count=4)
    settings = dict(split=str(split), methods=["visionzip"], guides=["none"], retentions=[0.25])
    one = evaluate(EvalConfig(out=str(tmp_path / "one"), **settings), *toy, progress=False, log=lambda *_: None)
    real = pipeline.generate

    def small_memory(model, tokenizer, video, question, *args, **kwargs):
        if isinstance(question, list) and len(question) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokenizer, video, question, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", small_memory)
    four = evaluate(EvalConfig(out=str(tmp_path / "four"), batch_size=4, **settings), *toy, progress=False, log=lambda *_: None)
    assert [s["accuracy"] for s in four] == [s["accuracy"] for s in one] and all(s["failed"] == 0 for s in four)


def test_predictions_are_fsynced_once_per_batch_and_readable_before(toy, tmp_path, monkeypatch):
    import os

    from vidtok.harness import files

    split = tmp_path / "split"
    write_split(split, seed=32, count=6)
    synced, seen = [], []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith("predictions.jsonl"):
            synced.append(path)
        real(fd)

    real_append = files.JsonlLog.append

    def append(self, record, durable=True):
        real_append(self, record, durable)
        # before any fsync the line is already the OS's: another reader (a resume after a kill) sees it
        seen.append(json.loads(self.path.read_text().splitlines()[-1]) == record)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.JsonlLog, "append", append)
    settings = dict(split=str(split), methods=["visionzip"], guides=["none", "assistant"], retentions=[0.25])
    summaries = evaluate(EvalConfig(out=str(tmp_path / "out"), batch_size=4, **settings), *toy, progress=False, log=lambda *_: None)
    assert len(summaries) == 3 and all(seen) and len(seen) == 3 * 6
    # 3 folders x 2 batches (4 + 2 records): one fsync each, not one per line
    assert sorted(synced.count(p) for p in set(synced)) == [2, 2, 2]
