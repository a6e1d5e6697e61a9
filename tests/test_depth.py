"""Depth scaling in `vidtok bench` (harness.depth): a few layers run, the released depth reported."""

import copy
import json

import pytest
import torch

from vidtok.harness.bench import BenchConfig, run_bench
from vidtok.harness.depth import LayerClock, text_layers, vision_layers
from vidtok.testbed.toy import build_qwen_toy_model, build_tokenizer

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2}
VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 8, "window_size": 32,
          "fullatt_block_indexes": [1, 3]}
GUIDE = {**TEXT, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 4}
RUNS = [{"method": "visionzip", "guide": "assistant", "retentions": [0.25]}, {"method": "visionzip", "guide": "self", "retentions": [0.25]},
        {"method": "fastv", "guide": "inline", "retentions": [0.25]}]


def _config(name, text, vision, guide, scale=False):
    main = {"family": "qwen2_5_vl", "vision": vision, "text": text, "frame_size": 64}
    assistant = {"text": guide, "share_vision": True}
    if scale:
        main["scale_to"] = {"text": {"num_hidden_layers": 6}, "vision": {"depth": 4, "fullatt_block_indexes": [1, 3]}}
        assistant["scale_to"] = {"text": {"num_hidden_layers": 4}}
    return BenchConfig(name=name, main=main, guide=assistant, frames=4, runs=RUNS, repeats=1, warmup=0, decode_tokens=2)


def test_the_scaled_arithmetic():
    clock = LayerClock([])
    clock.calls = [(0, 1.0), (1, 3.0), (2, 2.0)]
    out = clock.scaled(10.0, {"low": (range(2), 4), "high": (range(2, 3), 1)})
    assert out["seconds"] == pytest.approx(10 - 6 + 2.0 * 4 + 2.0 * 1)
    assert out["groups"]["low"] == {"layers_run": 2, "calls": 2, "mean_seconds": 2.0, "target_layers": 4}
    clock.calls = [(0, 1.0), (1, 1.0), (0, 3.0), (1, 3.0)]  # each layer twice (two videos in one stage): both calls count per layer
    assert clock.scaled(8.0, {"all": (range(2), 3)})["seconds"] == pytest.approx(8 - 8 + 2.0 * 2 * 3)
    clock.calls = [(0, 1.0), (5, 4.0)]  # a call in no group stays in the fixed part, as measured
    assert clock.scaled(10.0, {"all": (range(1), 2)})["seconds"] == pytest.approx(10 - 1 + 1.0 * 2)
    clock.calls = [(0, 1.0)]  # a group the target runs but the run never timed: an error, not a silent zero
    with pytest.raises(ValueError, match="no call of the high layers"):
        clock.scaled(1.0, {"low": (range(1), 1), "high": (range(1, 2), 1)})


@torch.no_grad()
def test_the_clock_times_every_layer_and_leaves_the_model_as_it_was():
    model = build_qwen_toy_model("test", seed=0)
    ids = torch.tensor([build_tokenizer("qwen2_5_vl")("what shape is red ?")["input_ids"]])
    reference = model(input_ids=ids).logits
    layers = text_layers(model)
    clock = LayerClock(layers)
    with clock.watch():
        timed = model(input_ids=ids).logits
    assert torch.equal(timed, reference)
    assert [i for i, _ in clock.calls] == list(range(len(layers))) and all(t > 0 for _, t in clock.calls)
    with pytest.raises(RuntimeError, match="mid-forward"):
        with LayerClock(layers + vision_layers(model)).watch():
            raise RuntimeError("mid-forward")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers + vision_layers(model))


def test_a_scaled_run_reports_the_released_depth(tmp_path):
    cut_text, cut_vision, cut_guide = {**TEXT, "num_hidden_layers": 3}, {**VISION, "depth": 2, "fullatt_block_indexes": [1]}, {**GUIDE, "num_hidden_layers": 2}
    scaled = run_bench(_config("s", cut_text, cut_vision, cut_guide, scale=True), tmp_path / "s", log=lambda *a: None)
    deep = run_bench(_config("d", TEXT, VISION, GUIDE), tmp_path / "d", log=lambda *a: None)
    assert scaled["depth_scaling"]["main"]["text"] == {"num_hidden_layers": 6} and "method" in scaled["depth_scaling"]
    for s, d in zip(scaled["rows"], deep["rows"]):
        assert s["prefill_flops"] == d["prefill_flops"]  # the analytic count is the released model's, exactly
    assert (scaled["rows"][1]["guide_layers"], scaled["rows"][1]["run_guide_layers"]) == ([3], [1])  # the last third of 4, of 2
    assisted, self_guided, fastv = (row["repeats"][0]["depth_scaling"] for row in scaled["rows"][1:])
    windowed, full = assisted["vision"]["groups"]["vision (windowed)"], assisted["vision"]["groups"]["vision (full attention)"]
    assert (windowed["layers_run"], windowed["target_layers"], full["layers_run"], full["target_layers"]) == (1, 2, 1, 2)
    # a guide pass runs the layers below its deepest guide layer: 1 of the cut assistant's 2, 3 of the released 4 (last third)
    assert assisted["guide"]["groups"]["guide"] == {**assisted["guide"]["groups"]["guide"], "layers_run": 1, "calls": 1, "target_layers": 3}
    assert self_guided["guide"]["groups"]["guide"]["target_layers"] == 5  # the main model's last third of 6: layers 4-5
    assert assisted["prefill"]["groups"]["all"]["target_layers"] == 6
    groups = fastv["prefill"]["groups"]
    assert (groups["below FastV's layer"]["target_layers"], groups["from FastV's layer"]["target_layers"]) == (2, 4)
    assert groups["from FastV's layer"]["layers_run"] == 1
    for row in scaled["rows"]:
        repeat = row["repeats"][0]
        for stage, detail in repeat["depth_scaling"].items():
            expected = detail["measured"] - detail["layers_seconds"] + sum(g["mean_seconds"] * g["calls"] / g["layers_run"] * g["target_layers"]
                                                                           for g in detail["groups"].values())
            assert repeat["seconds"][stage] == pytest.approx(expected) and repeat["measured_seconds"][stage] == detail["measured"]
        assert row["stage_seconds"]["prefill"] == repeat["seconds"]["prefill"]  # one repeat: the median is the scaled figure


@pytest.mark.parametrize("change, message", [
    (lambda c: c["main"].update(scale_to={"text": {"depth": 6}}), r"unknown keys \['depth'\] in main.scale_to.text"),
    (lambda c: c["main"].update(scale_to={"text": {"num_hidden_layers": 0}}), "num_hidden_layers must be a whole number >= 1"),
    (lambda c: c["main"].update(scale_to={"vision": {"depth": 8, "fullatt_block_indexes": [9]}}), r"fullatt_block_indexes\[0\] must be"),
    (lambda c: c["main"]["vision"].update(fullatt_block_indexes=[0, 1, 2, 3]) or c["main"].update(scale_to={"vision": {"depth": 8}}),
     "the run needs at least one of each"),
    (lambda c: c.update(main={"toy": "test", "scale_to": {}}), "scale_to describe a geometry"),
    (lambda c: c.update(batch_sizes=[1, 2]), "depth scaling"),
])
def test_bad_scaling_configs_are_refused_with_the_fix(tmp_path, change, message):
    data = {"name": "x", "main": {"family": "qwen2_5_vl", "vision": copy.deepcopy(VISION), "text": dict(TEXT), "frame_size": 64,
                                  "scale_to": {"text": {"num_hidden_layers": 12}}},
            "runs": [{"method": "visionzip", "retentions": [0.25]}]}
    change(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        BenchConfig.load(path)
