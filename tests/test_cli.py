import json

import pytest

from vidtok.cli import main

KEYS = {"answer", "method", "guide", "retention", "frames", "tokens_per_frame", "total_budget", "budgets",
        "frame_weights", "visual_tokens_in", "visual_tokens_kept", "seconds"}


def run_json(capsys, *args):
    assert main(["run", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_run_answers_the_sample(capsys):
    record = run_json(capsys)
    assert KEYS <= record.keys()
    sample = json.loads((__import__("vidtok.testbed.toy").testbed.toy.ASSETS / "sample" / "sample.json").read_text())
    assert record["answer"] == sample["answer"]
    assert record["guide"] == "assistant" and record["method"] == "visionzip"
    assert sum(record["budgets"]) == record["total_budget"] == record["visual_tokens_kept"]
    assert record["frame_weights"][sample["needle_frame"]] == max(record["frame_weights"])
    assert "note" not in record


@pytest.mark.parametrize(
    "args",
    [["--method", "full"], ["--method", "uniform", "--guide", "none", "--retention", "0.5"], ["--method", "random", "--guide", "self", "--layers", "1-2"]],
)
def test_methods_and_guides(capsys, args):
    record = run_json(capsys, *args)
    assert sum(record["budgets"]) == record["visual_tokens_kept"]
    if "--layers" in args:
        assert record["guide_layers"] == [1, 2]


def test_readable_report(capsys):
    assert main(["run", "--retention", "0.125"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "kept 32 of 256" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--retention", "0"], "retention"),
        (["--retention", "1.5"], "retention"),
        (["--layers", "7"], "outside the guide"),
        (["--method", "full", "--guide", "self"], "nothing for a guide"),
        (["--model", "/nonexistent"], "no model at"),
        (["--frames", "40"], "ask for 16 frames or fewer"),
        (["/nonexistent.mp4", "what ?"], "no video file"),
        (["--guide", "assistant", "--model", "src/vidtok/testbed/assets/toy-main"], "needs --assistant"),
        (["--guide", "none", "--floor", "1"], "--floor sets the fewest tokens a unit keeps, which applies to guide self, assistant or inline"),
            (["--method", "visionzip", "--layer", "3"], "--layer sets FastV's layer (tokens are dropped from it on), which applies to fastv"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, args, message):
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_video(capsys, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert main(["run", str(bad), "what ?"]) == 2
    assert "cannot read video" in capsys.readouterr().err


def test_assistant_with_another_tokenizer_is_refused(capsys, tmp_path):
    from vidtok.testbed.toy import build_tokenizer, build_toy_model

    model = build_toy_model("assistant")
    model.save_pretrained(tmp_path)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(tmp_path)
    assert main(["run", "--assistant", str(tmp_path)]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_unsupported_model_folder(capsys, tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path)]) == 2
    assert "supported: llava_onevision" in capsys.readouterr().err


def test_any_saved_checkpoint_loads_by_path(capsys, tmp_path):
    from vidtok.testbed.toy import build_tokenizer, build_toy_model

    build_toy_model("test", seed=3).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    record = run_json(capsys, "--model", str(tmp_path), "--guide", "self", "--retention", "0.5", "--max-new-tokens", "2")
    assert record["model"] == str(tmp_path) and record["guide"] == "self"
    assert record["visual_tokens_kept"] == 128 and record["guide_layers"] == [2]  # last third of 3 layers


def test_without_shipped_weights_the_default_says_its_answers_are_meaningless(capsys, tmp_path, monkeypatch):
    import shutil

    import vidtok.testbed.toy as toy

    shutil.copytree(toy.ASSETS / "sample", tmp_path / "sample")
    monkeypatch.setattr(toy, "ASSETS", tmp_path)
    record = run_json(capsys, "--max-new-tokens", "2")
    assert "meaningless" in record["note"] and record["guide"] == "self"


def test_shipped_toy_models_are_named_like_folders(capsys):
    record = run_json(capsys, "--model", "toy-llava-ov", "--assistant", "toy-llava-ov-assistant", "--guide", "assistant")
    assert record["guide"] == "assistant" and record["model"] == "toy-llava-ov"
    assert main(["run", "--model", "toy-qwen2.5-vl-nope"]) == 2  # not a shipped name, not a folder: one clear line
    assert "no model at" in capsys.readouterr().err
