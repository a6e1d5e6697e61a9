"""`vidtok bench` configs are checked whole before any model is built: each bad key is one ValueError
(exit 2 on the command line) naming the file, the key path, the value given and what is expected."""

import json
from pathlib import Path

import pytest
import torch

import vidtok.harness.bench as bench
from vidtok.cli import main
from vidtok.harness.bench import BenchConfig, run_bench

CONFIGS = sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.json"))
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
QWEN_VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 8, "fullatt_block_indexes": [1, 3]}


def base(**changes) -> dict:
    config = {"name": "t", "main": {"toy": "test"}, "guide": {"toy": "test", "share_vision": True}, "frames": 4, "repeats": 1, "warmup": 0,
              "decode_tokens": 1, "runs": [{"method": "full"}, {"method": "visionzip", "guide": "assistant", "retentions": [0.25]}]}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def runs(*extra) -> list:
    return [{"method": "full"}, {"method": "visionzip", "retentions": [0.5]}, *extra]


def write(tmp_path, config, name="c.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Every refusal here comes before a model is built."""
    def build(*_, **__):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(bench, "build_model", build)


# (config, the message's parts: the key path and value, and what is expected)
BAD = [
    (base(decode_tokens=-3), ["decode_tokens -3 in", "whole number >= 1"]),  # ran, and reported a negative decode throughput
    (base(decode_tokens=0), ["decode_tokens 0 in"]),
    (base(frames=-2), ["frames -2 in", "whole number >= 1"]),  # "negative dimensions are not allowed"
    (base(frames=2.5), ["frames 2.5 in"]),
    (base(repeats=0), ["repeats 0 in", ">= 1"]),  # statistics.median of nothing
    (base(warmup=True), ["warmup True in"]),
    (base(seed="7"), ["seed '7' in"]),
    (base(dtype="float8"), ["dtype 'float8' in", "float32, float16, bfloat16"]),
    (base(device="tpu"), ["device 'tpu' in", "cpu, cuda, cuda:N or auto"]),
    (base(name=""), ["name '' in"]),
    (base(point_seconds=0), ["point_seconds 0 in", "positive number of seconds"]),
    (base(sweep_frames=[16, 0]), ["sweep_frames [16, 0] in", "list of whole numbers >= 1"]),
    (base(goal={"0.25": -1}), ["goal['0.25'] -1 in", "positive LLM-side speedup"]),
    (base(goal={"a quarter": 4}), ["goal['a quarter']", "retentions in (0, 1]"]),
    (base(goal={"0.25": 4}, sweep_frames=[2, 4]), ["goal {'0.25': 4} in", "drop goal or sweep_frames"]),
    (base(runs=0.25), ["runs 0.25 in", "non-empty list"]),
    (base(runs=[]), ["runs [] in", "non-empty list"]),
    (base(runs=runs("visionzip")), ["runs[2] 'visionzip' in", "an object"]),
    (base(runs=runs({"guide": "none"})), ["runs[2].method is missing", "visionzip"]),
    (base(runs=runs({"method": "visionzap"})), ["runs[2].method 'visionzap' in", "full, uniform, random, visionzip"]),
    (base(runs=runs({"method": "visionzip+fastv"})), ["runs[2].method 'visionzip+fastv'", "composed method"]),
    (base(runs=runs({"method": "visionzip", "guide": "sef"})), ["runs[2].guide 'sef' in", "none, self, assistant, inline"]),
    (base(runs=runs({"method": "visionzip", "retentions": [0.25, 1.5]})), ["runs[2].retentions[1] 1.5 in", "(0, 1]"]),
    (base(runs=runs({"method": "visionzip", "retentions": 0.25})), ["runs[2].retentions 0.25 in", "list"]),  # 'float' object is not iterable
    (base(runs=runs({"method": "visionzip", "retentions": [0]})), ["runs[2].retentions[0] 0 in"]),  # "high <= 0"
    (base(runs=runs({"method": "visionzip", "retention": [0.5]})), ["unknown keys ['retention'] in runs[2]", "retentions"]),
    (base(runs=runs({"method": "full", "retentions": [0.5]})), ["runs[2].retentions [0.5] in", "full keeps every token"]),
    (base(runs=runs({"method": "full", "guide": "self"})), ["runs[2] in", "nothing for a guide to do"]),
    (base(runs=runs({"method": "visionzip", "guide": "self", "guide_pool": 0})), ["runs[2].guide_pool 0 in", ">= 1"]),
    (base(runs=runs({"method": "visionzip", "layer": 3})), ["runs[2]", "runs[2].layer", "fastv"]),  # silently ignored before
    (base(runs=runs({"method": "fastv", "layer": 3})), ["runs[2].layer 3 in", "in 1..2"]),  # the toy's LLM has 3 layers
    (base(runs=runs({"method": "visionzip", "guide": "self", "layers": "1-9"})), ["runs[2].layers '1-9' in", "outside"]),
    (base(runs=runs({"method": "keyframe", "guide": "none"})), ["runs[2] in", "keyframe"]),
    (base(runs=runs({"method": "visionzip", "guide": "inline"})), ["runs[2] in", "inline"]),
    (base(guide=None), ["runs[1].guide 'assistant' in", '"guide" spec']),  # was found only after the main model was built
    (base(main={"toy": "test", "path": "x"}), ["main {", "names one model"]),
    (base(main={}), ["main {} in", "names one model"]),
    (base(main={"toy": "huge"}), ["main.toy 'huge' in", "assistant, test"]),
    (base(main={"toy": "test", "family": "qwen2_5_vl"}), ["main {", "go with text"]),
    (base(main={"text": TEXT, "family": "qwen3"}), ["main.family 'qwen3' in", "qwen2_5_vl"]),
    (base(main=["toy"]), ["main ['toy'] in", "an object"]),
    (base(main={"path": 3}), ["main.path 3 in"]),
    (base(guide={"toy": "test", "share_vision": "yes"}), ["guide.share_vision 'yes' in", "true or false"]),
    (base(guide={"toy": "main", "share_vision": True}), ["guide.share_vision True in", "hidden_size 32 vs 96"]),  # a state_dict error
    (base(main={"vision": VISION, "text": {k: v for k, v in TEXT.items() if k != "hidden_size"}}),
     ["main.text.hidden_size is missing"]),
    (base(main={"vision": VISION, "text": {**TEXT, "hidden_size": -32}}), ["main.text.hidden_size -32 in", ">= 1"]),
    (base(main={"vision": VISION, "text": {**TEXT, "hiden_size": 32}}), ["unknown keys ['hiden_size'] in main.text"]),
    (base(main={"vision": VISION, "text": {**TEXT, "hidden_act": 3}}), ["main.text.hidden_act 3 in", "a string"]),
    (base(main={"vision": VISION, "text": {**TEXT, "num_attention_heads": 5}}), ["main.text.num_attention_heads 5 in", "divisor of hidden_size 32"]),
    (base(main={"vision": VISION, "text": {**TEXT, "hidden_size": 28}}), ["main.text.num_attention_heads 4 in", "even"]),
    (base(main={"vision": VISION, "text": {**TEXT, "num_key_value_heads": 3}}), ["main.text.num_key_value_heads 3 in", "divisor of num_attention_heads 4"]),
    (base(main={"vision": VISION, "text": {k: v for k, v in TEXT.items() if k != "num_key_value_heads"}}),
     ["main.text.num_key_value_heads is missing", "default 32"]),
    (base(main={"vision": VISION, "text": {**TEXT, "vocab_size": 10}}), ["main.text.vocab_size 10 in", ">= 28"]),
    (base(main={"vision": {**VISION, "num_attention_heads": 5}, "text": TEXT}), ["main.vision.num_attention_heads 5 in", "divisor of hidden_size 32"]),
    (base(main={"vision": {**VISION, "patch_size": 40}, "text": TEXT}), ["main.vision.patch_size 40 in", "image_size 28"]),
    (base(guide=None, runs=runs(), main={"family": "qwen2_5_vl", "vision": {**QWEN_VISION, "hidden_size": 20}, "text": TEXT}),
     ["main.vision.num_heads 2 in", "multiple of 4"]),
    (base(guide=None, runs=runs(), main={"family": "qwen2_5_vl", "vision": {**QWEN_VISION, "fullatt_block_indexes": [1, 7]}, "text": TEXT}),
     ["main.vision.fullatt_block_indexes[1] 7 in", "in 0..3"]),
    (base(main={"family": "qwen2_5_vl", "vision": QWEN_VISION, "text": TEXT}), ["guide.toy 'test' in", "LLaVA-OV"]),
]


@pytest.mark.parametrize("config, parts", BAD, ids=[" ".join(p)[:50] for _, p in BAD])
def test_a_bad_key_names_the_file_the_key_and_the_rule(tmp_path, config, parts):
    path = write(tmp_path, config)
    with pytest.raises(ValueError) as error:
        BenchConfig.load(path)
    message = str(error.value)
    assert all(part in message for part in parts), message
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("key", ["name", "main"])
def test_a_missing_required_key_is_named(tmp_path, key):  # was a dataclass __init__() message
    config = base()
    del config[key]
    with pytest.raises(ValueError, match=f"{key} is missing in .*c.json: add \"{key}\""):
        BenchConfig.load(write(tmp_path, config))


@pytest.mark.parametrize("text, expected", [
    ("{ not json", "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 3"),
    ("[1, 2]", "must hold one JSON object, {\"name\": ..., \"main\": ...}; it holds an array"),
    ("", "is not valid JSON"),
])
def test_a_file_that_is_no_json_object_is_refused(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="bench config") as error:
        BenchConfig.load(path)
    assert expected in str(error.value) and str(path) in str(error.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read the bench config .*nope.json: No such file or directory; examples are in benchmarks/configs/"):
        BenchConfig.load(tmp_path / "nope.json")


def test_direct_construction_is_checked_the_same(tmp_path):
    with pytest.raises(ValueError, match=r"runs\[0\].retentions\[0\] 2 in the bench config: retentions\[0\] must be a number in \(0, 1\]"):
        BenchConfig(name="x", main={"toy": "test"}, runs=[{"method": "visionzip", "retentions": [2]}])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_committed_config_is_valid(path):
    assert BenchConfig.load(path).name == path.stem


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])  # no folder; a folder without config.json
def test_a_checkpoint_path_must_be_a_local_folder_with_a_config(tmp_path, make):
    folder = make(tmp_path)
    path = write(tmp_path, base(main={"path": str(folder)}, guide=None, runs=runs()))
    config = BenchConfig.load(path)  # the folder is the machine's business: checked when the bench starts, before any model
    with pytest.raises(ValueError) as error:
        run_bench(config, tmp_path / "out")
    message = str(error.value)
    assert f"main.path {str(folder)!r} in {path}: cannot load the checkpoint" in message  # was a hub "Repo id must be in the form"
    assert ("no such folder" if folder.name == "missing" else "no config.json") in message and "vidtok never downloads" in message


def test_the_cli_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    path = write(tmp_path, base(decode_tokens=-3))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vidtok: error: decode_tokens -3 in {path}: decode_tokens must be a whole number >= 1") and err.count("\n") == 1
    path = write(tmp_path, base(runs=runs({"method": "visionzip", "retentions": 0.5})))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "runs[2].retentions 0.5 in" in capsys.readouterr().err
    path = write(tmp_path, base(main={"path": str(tmp_path / "missing")}, guide=None, runs=runs()))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "vidtok never downloads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("device, expected", [
    ("tpu", "--device 'tpu': expected one of cpu, cuda, cuda:N or auto"),
    ("cuda:x", "--device 'cuda:x': expected one of cpu, cuda, cuda:N or auto"),
    ("cuda", "--device 'cuda': "),
    ("cuda:1", "--device 'cuda:1': "),
])
def test_a_device_this_machine_lacks_is_a_user_error(tmp_path, capsys, monkeypatch, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, whatever this one is
    path = write(tmp_path, base())
    assert main(["bench", str(path), "--device", device, "--out", str(tmp_path / "out")]) == 2  # was 1, "internal error"
    err = capsys.readouterr().err
    assert err.startswith(f"vidtok: error: {expected}") and err.count("\n") == 1, err
    assert "cpu" in err and "internal error" not in err


def test_the_config_device_is_checked_like_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write(tmp_path, base(device="cuda"))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"vidtok: error: device in {path} 'cuda': " in capsys.readouterr().err
    with pytest.raises(ValueError, match="'cuda:0': .*use cpu or auto"):
        run_bench(BenchConfig.load(write(tmp_path, base(device="cuda:0"))), tmp_path / "out")
    # the flag overrides the file: a CUDA config still runs on a CPU machine with --device cpu (here: up to the model build)
    with pytest.raises(AssertionError, match="a model was built"):
        main(["bench", str(path), "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet", "--debug"])
