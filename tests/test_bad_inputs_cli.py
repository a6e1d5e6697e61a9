"""Issue 20's bad inputs of `vidtok synth`, `vidtok calibrate`, `vidtok eval` and `--model`:
each refused (or handled) with a message that says the problem and the fix."""

import json
import shutil

import pytest

from vidtok.cli import SHIPPED, UsageError, load_model, main
from vidtok.harness.analysis import calibrate
from vidtok.harness.evaluate import EvalConfig, evaluate
from vidtok.testbed.events import KINDS, write_event_split
from vidtok.testbed.synth import write_split
from vidtok.testbed.toy import load_default

STALE = "did not match predictions.jsonl"


# 1. an empty --kinds (or an empty item) is refused, not taken for the default kinds
@pytest.mark.parametrize("kinds, message", [("", "no question kinds given"), (" ", "no question kinds given"),
                                            ("needle,,majority", "empty kind"), ("needle,", "empty kind")])
def test_synth_refuses_empty_kinds(capsys, tmp_path, kinds, message):
    out = tmp_path / "split"
    assert main(["synth", str(out), "--task", "events", "--count", "2", "--kinds", kinds]) == 2
    err = capsys.readouterr().err
    assert message in err and ", ".join(KINDS) in err  # the valid kinds, to pick from
    assert not (out / "questions.jsonl").exists()


def test_event_split_api_refuses_no_kinds(tmp_path):
    with pytest.raises(ValueError, match="no question kinds given"):
        write_event_split(tmp_path / "split", 0, 2, kinds=())
    assert not (tmp_path / "split" / "questions.jsonl").exists()


def test_synth_kinds_with_spaces_still_work(capsys, tmp_path):
    assert main(["synth", str(tmp_path), "--task", "events", "--count", "2", "--kinds", "needle, majority"]) == 0
    records = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["needle", "majority"]


# 2. an empty split is called empty (with its file), before any model is loaded
def test_calibrate_on_an_empty_split_says_it_is_empty(capsys, tmp_path):
    (tmp_path / "questions.jsonl").write_text("\n")
    # a model that does not exist: had it been loaded first, the error would be "no model at"
    assert main(["calibrate", str(tmp_path), "--model", str(tmp_path / "no-model"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and str(tmp_path / "questions.jsonl") in err and "vidtok synth" in err
    assert "no model at" not in err and "labelled split" not in err


def test_calibrate_api_on_no_records_says_empty():
    with pytest.raises(ValueError, match="empty split"):
        calibrate(None, None, [])


# 3. an identical copy of a split evaluated into the same results is not "an earlier run stopped"
@pytest.fixture(scope="module")
def toy():
    model, tokenizer, assistant, note = load_default()
    assert note is None
    return model, tokenizer, assistant


def test_eval_on_a_copy_of_the_split_does_not_claim_a_stopped_run(toy, tmp_path):
    original, copy, out = tmp_path / "split", tmp_path / "elsewhere" / "split", tmp_path / "eval"
    write_split(original, seed=3, count=2)
    shutil.copytree(original, copy)

    def run(split):
        notes = []
        config = EvalConfig(split=str(split), out=str(out), methods=["visionzip"], guides=["none"], retentions=[0.25], limit=2)
        return evaluate(config, *toy, progress=False, log=notes.append), notes

    first = {s["method"]: s for s in run(original)[0]}["visionzip"]
    _, notes = run(copy)
    assert not any(STALE in n for n in notes), notes
    results = out / "visionzip-none-r0.25" / "results.json"
    stored = json.loads(results.read_text())
    assert stored["split"] == str(copy)  # rewritten quietly: it names the path the numbers now come from
    assert stored["accuracy"] == first["accuracy"] and stored["samples"] == 2

    # a results.json that genuinely disagrees with predictions.jsonl is still rebuilt, and said so
    stored["accuracy"] = 0.123 if stored["accuracy"] != 0.123 else 0.456
    results.write_text(json.dumps(stored))
    _, notes = run(copy)
    assert any(STALE in n for n in notes), notes
    assert json.loads(results.read_text())["accuracy"] == first["accuracy"]


# 4. a shipped model's asset folder name is accepted; an unknown name lists the shipped ones
def test_asset_folder_name_is_a_shipped_name():
    assert SHIPPED["toy-main"] == "toy-main"
    model, tokenizer = load_model("toy-main")
    assert model is not None and tokenizer is not None


def test_unknown_model_name_lists_the_shipped_ones():
    with pytest.raises(UsageError, match="no model at") as raised:
        load_model("nonexistent")
    assert all(name in str(raised.value) for name in ("toy", "toy-assistant", "toy-qwen2.5-vl", "toy-v2"))
