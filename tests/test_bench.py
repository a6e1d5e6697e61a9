import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidtok import adapter_for
from vidtok import flops
from vidtok.harness.bench import STAGES, BenchConfig, PeakMemory, build_model, expand_runs, measure, run_bench, table
from vidtok.compressors import DyToK, VisionZip
from vidtok.pipeline import _Timer, device_sync
from vidtok.testbed.toy import build_tokenizer, build_toy_model


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def eager_model():
    # eager attention: its QK^T and AV are plain matmuls the counter sees (the CPU sdpa kernel is not registered)
    model = build_toy_model("test", seed=0)
    model.set_attn_implementation("eager")
    return model


@torch.no_grad()
def test_llm_prefill_formula_matches_a_count(eager_model):
    seq = 57
    embeds = torch.randn(1, seq, eager_model.config.text_config.hidden_size)
    got = counted(lambda: eager_model(inputs_embeds=embeds, logits_to_keep=1))
    assert got == flops.llm_prefill_flops(eager_model.config, seq)


@torch.no_grad()
def test_vision_formula_matches_a_count(eager_model):
    pixels = torch.randn(1, 3, 3, 64, 64)
    got = counted(lambda: eager_model.model.get_video_features(pixels))
    # the toy towers keep SigLIP's attention-pooling head, which LLaVA-OV checkpoints disable: count it apart
    head = counted(lambda: eager_model.model.vision_tower.head(torch.randn(3, 64, eager_model.config.vision_config.hidden_size)))
    assert got - head == flops.vision_flops(eager_model.config, 3)


@torch.no_grad()
def test_guide_formula_matches_a_count(eager_model):
    tokenizer = build_tokenizer()
    adapter = adapter_for(eager_model)
    pixels = torch.randn(2, 3, 64, 64)
    encoded = adapter.encode_video(pixels)
    ids = adapter.input_ids(tokenizer, "what shape is red ?", 2 * 16 + 1)
    embeds = torch.cat([encoded.features.flatten(0, 1), encoded.newline])
    seq = ids.shape[1]
    for deepest in (0, 1, 2):
        got = counted(lambda d=deepest: adapter.token_attention(ids, embeds, [d]))
        # The capture runs sdpa, whose CPU kernel the counter does not see: take the S x S attention
        # of the `deepest` whole layers out of the formula (the eager test above checks that term),
        # and add the one row of scores the capture computes, 2 * H * d * N_visual.
        t = eager_model.config.text_config
        head_dim = t.hidden_size // t.num_attention_heads
        unseen = deepest * 4 * seq * seq * t.num_attention_heads * head_dim
        row = 2 * t.num_attention_heads * head_dim * (2 * 16)
        assert got == flops.guide_flops(eager_model.config, seq, deepest) - unseen + row


def test_timer_synchronises_both_ends_of_every_stage():
    calls = []
    seconds = {}
    timer = _Timer(seconds, sync=lambda: calls.append("sync"))
    with timer("a"):
        calls.append("work")
    assert calls == ["sync", "work", "sync"] and seconds["a"] >= 0
    assert device_sync(torch.device("cuda")) is torch.cuda.synchronize
    assert device_sync(torch.device("cpu")) is None


def test_peak_memory_cuda_path(monkeypatch):
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1234)
    with PeakMemory(torch.device("cuda")) as memory:
        pass
    assert memory.peak == 1234


def test_peak_rss_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        before = PeakMemory.rss()
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
        del block
    assert memory.peak >= before + 48 * 2**20


def test_every_stage_is_timed_once_per_call(monkeypatch):
    import vidtok.pipeline as pipeline

    seen = []
    original = pipeline._Timer.__call__

    def call(self, stage):
        seen.append(stage)
        return original(self, stage)

    monkeypatch.setattr(pipeline._Timer, "__call__", call)
    model, assistant, tokenizer = build_toy_model("test"), build_toy_model("test", seed=1), build_tokenizer()
    method = DyToK(VisionZip(0.25), guide=assistant)
    m = measure(model, tokenizer, torch.randn(4, 3, 64, 64), "what shape is red ?", method, 4, 2)
    assert sorted(seen) == sorted(["decode", "vision", "guide_vision", "guide", "compress", "prefill", "decode_tokens"])
    assert set(m["seconds"]) == set(seen)


def test_bench_end_to_end(tmp_path):
    config = BenchConfig(
        name="t",
        main={"toy": "test"},
        guide={"toy": "test", "share_vision": True},
        frames=4,
        runs=[{"method": "visionzip", "guide": "none", "retentions": [0.5]}, {"method": "visionzip", "guide": "assistant", "retentions": [0.25]}],
        repeats=2,
        warmup=1,
        decode_tokens=2,
    )
    report = run_bench(config, tmp_path, log=lambda *a: None)
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["full", "visionzip", "visionzip"]  # full is always measured
    assert report["shared_vision_tower"] is True
    full = rows[0]
    assert full["ttft_speedup"] == 1.0 and full["prefill_flops"]["guide"] == 0
    for r in rows:
        assert len(r["repeats"]) == 2
        assert r["ttft_seconds"] > 0 and r["peak_rss_mb"] > 0
        assert r["ttft_speedup"] == pytest.approx(full["ttft_seconds"] / r["ttft_seconds"])
        assert set(STAGES) <= set(r["stage_seconds"])
        low, high = r["llm_side_seconds_range"]
        assert low <= r["llm_side_seconds"] <= high and low > 0
    guided = rows[2]
    assert guided["prefill_flops"]["guide"] > 0 and guided["stage_seconds"]["guide"] > 0
    assert rows[1]["prefill_flops"]["llm"] < full["prefill_flops"]["llm"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__ and len(saved["rows"]) == 3
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "ttft" in table(rows)


def test_bench_config_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "main": {"toy": "test"}, "frame": 3}))
    with pytest.raises(ValueError, match="unknown bench config keys"):
        BenchConfig.load(path)
    rows = expand_runs(BenchConfig(name="x", main={"toy": "test"}, runs=[{"method": "uniform", "retentions": [0.5]}]))
    assert rows[0]["method"] == "full" and rows[1]["retention"] == 0.5


def test_geometry_from_config():
    model = build_model(
        {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
         "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}},
        0, torch.float32, "cpu",
    )
    assert adapter_for(model).tokens_per_frame == 1
    assert not model.config.vision_config.vision_use_head


@torch.no_grad()
def test_qwen_vision_formula_matches_a_count():
    from vidtok.testbed.toy import build_qwen_toy_model

    model = build_qwen_toy_model("test", seed=0)
    model.set_attn_implementation("eager")
    adapter = adapter_for(model)
    video = adapter.pixels(torch.randn(4, 3, 80, 48))  # 2 groups of 10 x 6 patches: windows of unequal sizes
    grid = adapter._grid(video)
    got = counted(lambda: model.model.get_video_features(adapter._patchify(video), video_grid_thw=torch.tensor([grid])))
    assert got == flops.qwen_vision_flops(model.config, grid)


def test_bench_runs_a_qwen_geometry(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1, 3]}
    config = BenchConfig(name="q", main={"family": "qwen2_5_vl", "vision": vision, "text": text, "frame_size": 64},
                         guide={"text": {**text, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}, "share_vision": True},
                         frames=4, runs=[{"method": "visionzip", "guide": "none", "retentions": [0.25]},
                                         {"method": "visionzip", "guide": "assistant", "retentions": [0.25]},
                                         {"method": "fastv", "guide": "inline", "retentions": [0.25]}],
                         repeats=1, warmup=0, decode_tokens=2)
    report = run_bench(config, tmp_path, log=lambda *a: None)
    full, static, guided, fastv = report["rows"]
    # 64-px frames are resized by the processor's default rule (no checkpoint folder): 320 px, 20 x 20 tokens per group
    assert report["shared_vision_tower"] is True and full["visual_tokens_in"] == 2 * 20 * 20
    assert static["prefill_flops"]["compress"] > 0 and static["prefill_flops"]["vision"] == full["prefill_flops"]["vision"]
    assert 0 < guided["prefill_flops"]["guide"] and guided["stage_seconds"]["guide_vision"] > 0
    assert fastv["visual_tokens_kept"] == 200 and fastv["prefill_flops"]["guide"] == 0


def test_a_length_sweep_measures_each_length_and_stops_where_told(tmp_path):
    config = BenchConfig(name="s", main={"toy": "test"}, guide={"toy": "test", "share_vision": True}, sweep_frames=[4, 2],
                         runs=[{"method": "visionzip", "guide": "assistant", "retentions": [0.25]}], repeats=1, warmup=0, decode_tokens=1)
    report = run_bench(config, tmp_path, log=lambda *a: None)
    assert report["complete"] is True and report["stopped"] is None
    assert [p["frames"] for p in report["sweep"]] == [2, 4]  # ascending
    for point in report["sweep"]:
        full, guided = point["rows"]
        assert full["frames"] == guided["frames"] == point["frames"]
        assert full["visual_tokens_in"] == point["frames"] * 16 and guided["visual_tokens_kept"] == point["frames"] * 4
        assert guided["stage_seconds"]["guide"] > 0 and guided["ttft_speedup"] == pytest.approx(full["ttft_seconds"] / guided["ttft_seconds"])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["complete"] is True and len(saved["sweep"]) == 2

    config.point_seconds = 1e-6  # nothing after the first length can fit
    report = run_bench(config, tmp_path / "stopped", log=lambda *a: None)
    assert [p["frames"] for p in report["sweep"]] == [2]
    assert report["stopped"]["frames"] == 4 and "over the" in report["stopped"]["reason"]
    with pytest.raises(ValueError, match="sweep_frames must be a list of whole numbers"):
        BenchConfig(name="x", main={"toy": "test"}, sweep_frames=[16, 0])


def test_goal_report_reads_the_default_guide_rows():
    from vidtok.harness.bench import goal_report

    def row(guide, retention, seconds, layers=None, guide_seconds=0.0, method="visionzip"):
        return {"method": method, "guide": guide, "retention": retention, "llm_side_seconds": seconds, "llm_side_speedup": 56.0 / seconds,
                "layers": layers, "guide_pool": 1, "default_guide": guide != "none" and layers is None, "description": f"{guide}-{layers}-{retention}",
                "stage_seconds": {"guide": guide_seconds, "guide_vision": 0.0}}

    rows = [row("none", 1.0, 56.0, method="full"), row("none", 0.25, 10.0), row("assistant", 0.25, 14.0, guide_seconds=4.0),
            row("assistant", 0.25, 11.2, layers="1", guide_seconds=1.2), row("none", 0.1, 4.0), row("assistant", 0.1, 4.8, guide_seconds=0.8)]
    report = goal_report(rows, {"0.25": 4.6, "0.1": 11, "0.05": 20})
    quarter = report["0.25"]
    assert quarter["reached"] is False and quarter["short_by"] == pytest.approx(4.6 - 4.0)
    assert quarter["best_row"]["layers"] == "1" and quarter["rows_reaching"] == ["assistant-1-0.25"]  # a non-default setting, beside
    # the why, by hand: 56 / 4.6 = 12.17 s for all of guide + compression + prefill, 10 s of it the static row's
    assert quarter["guide_allowance_seconds"] == pytest.approx(56 / 4.6 - 10.0) and quarter["default_guide_seconds"] == 4.0
    assert "leaves the guide 2.17 s (3.9% of the full prefill)" in quarter["why"] and "took 4.00 s" in quarter["why"]
    tenth = report["0.1"]
    assert tenth["reached"] is True and tenth["short_by"] == 0.0 and tenth["guide_allowance_seconds"] == pytest.approx(56 / 11 - 4.0)
    assert report["0.05"]["default_guide_speedup"] is None and "why" not in report["0.05"]  # no rows at that retention: nothing invented
    slow = goal_report([rows[0], row("none", 0.25, 13.0), row("assistant", 0.25, 14.0, guide_seconds=1.0)], {"0.25": 4.6})["0.25"]
    assert slow["guide_allowance_seconds"] < 0 and slow["why"].startswith("compression + prefill alone already miss the goal")


def test_bench_command_prints_the_goal_verdict_and_why(tmp_path, capsys):
    from vidtok.cli import main

    config = {"name": "t", "main": {"toy": "test"}, "guide": {"toy": "test", "share_vision": True}, "frames": 4, "repeats": 1, "warmup": 0,
              "decode_tokens": 1, "runs": [{"method": "visionzip", "guide": "none", "retentions": [0.25]},
                                           {"method": "visionzip", "guide": "assistant", "retentions": [0.25]}], "goal": {"0.25": 1000}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["bench", str(tmp_path / "c.json"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "bench.json").read_text())["goal"]["0.25"]
    assert report["reached"] is False and "why" in report  # no toy prefill is 1000x faster than full
    assert f"goal at 0.25: LLM-side >= 1000x, default guide {report['default_guide_speedup']:.2f}x: short by" in printed
    assert report["why"] in printed


def test_the_guide_pass_builds_no_prompt_by_prompt_matrix():
    """At 4,112 prompt tokens one [heads, S, S] float32 matrix of the toy is 270 MB; the guide pass
    (the LLM up to the guide layer through the sdpa kernel, the last row's attention read) must
    stay far below one."""
    model = build_toy_model("test", seed=0)
    tokenizer = build_tokenizer()
    adapter = adapter_for(model)
    frames = 256
    features = torch.randn(frames * adapter.tokens_per_frame + 1, model.config.text_config.hidden_size)
    ids = adapter.input_ids(tokenizer, "what shape is red ?", features.shape[0])
    heads, length = model.config.text_config.num_attention_heads, ids.shape[1]
    matrix = heads * length * length * 4
    with torch.no_grad():
        adapter.token_attention(ids, features, [0, 1])  # warm: allocator pools, kernels
        with PeakMemory(torch.device("cpu")) as memory:
            before = PeakMemory.rss()
            weights = adapter.token_attention(ids, features, [0, 1])
    assert weights.shape == (2, frames * adapter.tokens_per_frame)
    assert memory.peak - before < matrix / 3, (memory.peak - before, matrix)


def test_the_sweep_extrapolates_from_the_measured_growth():
    from vidtok.harness.bench import predict_seconds

    assert predict_seconds([(16, 10.0)], 32)[0] == pytest.approx(40.0)  # one point: the square of the length
    seconds, how = predict_seconds([(16, 10.0), (32, 20.0)], 64)  # measured linear growth continues
    assert seconds == pytest.approx(40.0) and "length^1.00" in how
    assert predict_seconds([(16, 10.0), (32, 30.0)], 64)[0] == pytest.approx(90.0)
    assert predict_seconds([(16, 10.0), (32, 9.0)], 64)[0] == pytest.approx(18.0)  # never below linear
