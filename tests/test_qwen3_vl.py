"""Qwen3-VL and Qwen3-VL-MoE: tiny models built in code; the timestamped layout, positions and
DeepStack checked against the model's own rules written out here, not vidtok's code."""

import json
import math

import numpy as np
import pytest
import torch

from vidtok import Composed, DyToK, FastV, Full, Random, Uniform, VisionZip, adapter_for, generate, prepare
from vidtok.pipeline import fastv_retention_for_flops
from vidtok.testbed.toy import build_qwen3_toy_model, build_qwen_toy_model, build_tokenizer

from helpers import assert_unchanged, snapshot
from test_qwen2_5_vl import reference_patches

Q = "what shape is red ?"
FRAMES = 6  # three temporal groups of 4x4 merged tokens (64-px frames, 8-px patches, 2x2 merge)
PER_GROUP = 16
FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("qwen3_vl")


def _warmed(model_type, seed):
    model = build_qwen3_toy_model(model_type, seed=seed)
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture(params=FAMILIES)
def model(request):
    return _warmed(request.param, 0)


@pytest.fixture
def pixels():
    return torch.randn(FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# the model's own rules, written out independently of vidtok ---------------------------------

def reference_inputs(model, tokenizer, pixels, frame_times=None):
    """The released Qwen3-VL processor's layout: the template's start/pad/end becomes, per group,
    "<t seconds>" (mean of the group's first and last frame time, one decimal) + start + pads + end;
    positions token by token: text +1, a group's block (s, s + row, s + col), text after it at the
    block's largest position + 1."""
    patches, (t, h, w) = reference_patches(pixels)
    per_group = (h // 2) * (w // 2)
    times = frame_times or [i * 0.5 for i in range(pixels.shape[0])]  # frames given as pixels: 2 fps
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]}],
                                         add_generation_prompt=True, tokenize=False)
    triple = "<|vision_start|> <|video_pad|> <|vision_end|>"
    assert text.count(triple) == 1
    blocks = "".join(f"<{(times[2 * g] + times[2 * g + 1]) / 2:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_group + "<|vision_end|>"
                     for g in range(t))
    ids = tokenizer(text.replace(triple, blocks), add_special_tokens=False)["input_ids"]
    start = model.config.vision_start_token_id
    rows, position, i = [], 0, 0
    while i < len(ids):
        rows.append([position] * 3)
        position += 1
        if ids[i] == start:
            block = [[position, position + y, position + x] for y in range(h // 2) for x in range(w // 2)]
            rows += block
            position = max(max(r) for r in block) + 1
            i += 1 + per_group
        else:
            i += 1
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": patches,
            "video_grid_thw": torch.tensor([[t, h, w]]), "position_ids": torch.tensor(rows).T[:, None, :]}


def test_full_inputs_equal_the_independent_construction(model, tokenizer, pixels):
    reference = reference_inputs(model, tokenizer, pixels)
    prepared = prepare(model, tokenizer, pixels, Q, None)
    assert torch.equal(prepared.inputs["input_ids"], reference["input_ids"])
    assert torch.equal(prepared.inputs["position_ids"], reference["position_ids"])
    assert prepared.plan.unit == "temporal_group" and prepared.plan.frames == 3 and prepared.plan.tokens_per_frame == PER_GROUP
    text = tokenizer.decode(prepared.inputs["input_ids"][0])
    assert [text.count(f"< 0 . {d} seconds >") for d in (2, 7)] == [1, 0] and text.count("seconds") == 3  # 0.25 s prints 0.2
    # for one-step blocks transformers' own rule agrees with the original one
    ids = reference["input_ids"]
    theirs, _ = model.model.get_rope_index(ids, (ids == model.config.video_token_id).int() * 2, video_grid_thw=reference["video_grid_thw"])
    assert torch.equal(theirs, reference["position_ids"])


def test_timestamps_come_from_the_sampled_frames_times(model, tokenizer, tmp_path):
    from vidtok.video import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8), fps=4)
    adapter = adapter_for(model)
    video = adapter.pixels(str(clip), frames=5)  # indices 0 2 4 6 8 at 4 fps; the 5th frame repeated
    assert video.shape[0] == 6
    assert adapter.timestamps(video) == pytest.approx([(0 + 0.5) / 2, (1.0 + 1.5) / 2, (2.0 + 2.0) / 2])


METHODS = [None, Full(), Uniform(1.0), Random(1.0), VisionZip(1.0), FastV(1.0, layer=2), DyToK(VisionZip(1.0), guide="self"),
           DyToK(Uniform(1.0), guide="self"), DyToK(FastV(1.0, layer=2), guide="self"), DyToK(FastV(1.0, layer=2), guide="inline")]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_retention_one_reproduces_the_unmodified_model_exactly(model, tokenizer, pixels, method):
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():  # the model's own vision path: pixels in, DeepStack computed inside
        expected_logits = model(**reference).logits
        expected = model.generate(**reference, max_new_tokens=5, do_sample=False)
    before = snapshot(model)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        assert torch.equal(model(**prepared.inputs).logits, expected_logits)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=5, do_sample=False)
    assert torch.equal(result.sequences, expected)
    assert_unchanged(model, before)
    assert model.model.rope_deltas is None


def test_an_assistant_of_the_same_layout_guides_and_another_family_is_refused(model, tokenizer, pixels):
    assistant = _warmed(model.config.model_type, 1)
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected = model.generate(**reference, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate(model, tokenizer, pixels, Q, DyToK(VisionZip(1.0), guide=assistant), max_new_tokens=4).sequences, expected)
    result = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=assistant), max_new_tokens=2)
    assert sum(result.plan.budgets) == 12
    with pytest.raises(ValueError, match="does not match the main model"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.5), guide=build_qwen_toy_model("test")))
    other = _warmed("qwen3_vl" if model.config.model_type == "qwen3_vl_moe" else "qwen3_vl_moe", 2)  # dense <-> MoE
    assert torch.equal(generate(model, tokenizer, pixels, Q, DyToK(VisionZip(1.0), guide=other), max_new_tokens=4).sequences, expected)


@pytest.mark.parametrize(
    "method",
    [Uniform(0.3), Random(0.25, seed=2), VisionZip(0.25), DyToK(VisionZip(0.25)), Uniform(0.02), FastV(0.25, layer=2),
     DyToK(FastV(0.25, layer=3), guide="inline"), DyToK(Composed(encoder=VisionZip(0.5), llm=FastV(0.5, layer=2)))],
    ids=str,
)
def test_kept_counts_budgets_and_the_compressed_layout(model, tokenizer, pixels, method):
    """Kept counts equal the budgets; the compressed prompt is the full one minus the dropped
    placeholders, every remaining token at its full-layout position; DeepStack features are the
    model's own, cut to exactly the kept tokens."""
    before = snapshot(model)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=3)
    plan = result.plan
    assert plan.unit == "temporal_group" and len(plan.budgets) == 3
    assert [len(k) for k in plan.kept] == plan.budgets and sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept
    assert plan.total_budget == round(method.retention * 3 * PER_GROUP + 1e-9)
    assert_unchanged(model, before)

    full = reference_inputs(model, tokenizer, pixels)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad():
        own = model.model.get_video_features(full["pixel_values_videos"], video_grid_thw=full["video_grid_thw"], return_dict=True)
    # what reaches the LLM: every token under FastV alone, else what the encoder-side compressor
    # makes of the model's own features (its kept indices and, for VisionZip, its merges)
    base = method.base if isinstance(method, DyToK) else method
    encoder = base.encoder if isinstance(base, Composed) else None if isinstance(base, FastV) else base
    signals = adapter_for(model).encode_video(adapter_for(model).pixels(pixels), signals=True).signals
    budgets = prepared.plan.vision_budgets or prepared.plan.budgets

    def received(features):
        features = features.reshape(3, PER_GROUP, -1)
        if encoder is None:
            return features.flatten(0, 1), [list(range(PER_GROUP))] * 3
        return encoder.compress(features, budgets, signals)

    _, kept = received(own.pooler_output[0])
    pads = (full["input_ids"][0] == model.config.video_token_id).nonzero().squeeze(1)
    keep = torch.ones(full["input_ids"].shape[1], dtype=torch.bool)
    keep[pads] = False
    keep[pads[[g * PER_GROUP + i for g, k in enumerate(kept) for i in k]]] = True
    assert torch.equal(prepared.inputs["input_ids"][0], full["input_ids"][0, keep])
    assert torch.equal(prepared.inputs["position_ids"][:, 0], full["position_ids"][:, 0, keep])
    given = prepared.inputs["mm_encoder_outputs"]["video"]
    assert len(given.deepstack_features) == len(own.deepstack_features) == 2
    for mine, theirs in zip([given.pooler_output, *given.deepstack_features], [own.pooler_output, *own.deepstack_features]):
        assert torch.allclose(mine[0], received(theirs[0])[0], atol=1e-6, rtol=0)


def test_a_group_with_budget_zero_keeps_its_timestamp_and_an_empty_block(model, tokenizer, pixels):
    prepared = prepare(model, tokenizer, pixels, Q, Uniform(1 / 48))  # one token for three groups
    assert sorted(prepared.plan.budgets) == [0, 0, 1]
    ids = prepared.inputs["input_ids"][0].tolist()
    start, end = model.config.vision_start_token_id, model.config.vision_end_token_id
    assert ids.count(start) == ids.count(end) == 3 and tokenizer.decode(ids).count("seconds") == 3
    empty = [i for i, t in enumerate(ids) if t == start and ids[i + 1] == end]
    assert len(empty) == 2
    with torch.no_grad():
        model(**prepared.inputs)  # a valid prompt for the model's own forward


def test_fastv_before_the_deepstack_layers_is_a_clear_error(model, tokenizer, pixels):
    for method in (FastV(0.5, layer=1), DyToK(FastV(0.5, layer=1), guide="inline")):
        with pytest.raises(ValueError, match="DeepStack adds vision features .* layers 0-1; use a FastV layer >= 2"):
            prepare(model, tokenizer, pixels, Q, method)
    with pytest.raises(ValueError, match="FastV layer >= 2"):
        fastv_retention_for_flops(model, tokenizer, Q, pixels, layer=1, share=0.5)


def test_fastv_on_qwen3_equals_the_masked_reference(model, tokenizer, pixels):
    from test_fastv import MaskedReference

    method = DyToK(FastV(0.25, layer=2), guide="self")
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        logits = model(**prepared.inputs).logits[0, -1]
    ids = prepared.inputs["input_ids"]
    visual = (ids[0] == model.config.video_token_id).nonzero().squeeze(1).tolist()
    kept = {visual[u * PER_GROUP + i] for u, k in enumerate(prepared.plan.kept) for i in k}
    dropped = [p for p in visual if p not in kept]
    with torch.no_grad(), MaskedReference(model, 2, dropped):
        reference = model(**prepared.inputs).logits[0, -1]
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    result = generate(model, tokenizer, pixels, Q, method, **settings)
    with torch.no_grad(), MaskedReference(model, 2, dropped):
        expected = model.generate(**prepare(model, tokenizer, pixels, Q, method).inputs, **settings)
    assert torch.equal(result.sequences, expected)


def test_visionzip_signals_match_a_reference_from_the_last_block(model, pixels):
    """Attention received and keys recomputed from the last vision block's own inputs, per group."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    adapter = adapter_for(model)
    video = adapter.pixels(pixels)
    block = model.model.visual.blocks[-1].attn
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_video_features(adapter._patchify(video), video_grid_thw=torch.tensor([[3, 8, 8]]))
    finally:
        handle.remove()
    x, cu = seen["x"], seen["cu_seqlens"].tolist()
    q, k, _ = block.qkv(x).reshape(x.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    received = torch.cat([((q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(-1, -2)) * block.scaling).softmax(-1).mean((0, 1))
                          for a, b in zip(cu[:-1], cu[1:])])
    expected_attention = received.reshape(3, PER_GROUP, 4).mean(-1)  # patches arrive merge-block-major: 4 per token
    expected_keys = k.mean(1).reshape(3, PER_GROUP, 4, -1).mean(2)
    with torch.no_grad():
        signals = adapter.encode_video(video, signals=True).signals
    assert torch.allclose(signals.attention, expected_attention, atol=1e-6)
    assert torch.allclose(signals.metric, expected_keys, atol=1e-5)


def video_resize_rule(frames, height, width, factor, low, high):
    """Qwen3VLVideoProcessor's smart_resize: the pixel budget covers frames x height x width."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h, w, t = round(height / factor) * factor, round(width / factor) * factor, round(frames / 2) * 2
    if t * h * w > high:
        beta = math.sqrt(frames * height * width / high)
        return max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    if t * h * w < low:
        beta = math.sqrt(low / (frames * height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def saved(model, tokenizer, folder, min_pixels, max_pixels):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}))
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.mark.parametrize("frames,size", [(4, (20, 24)), (4, (64, 64)), (6, (200, 120)), (8, (70, 33)), (3, (64, 64))])
def test_frames_are_resized_by_the_video_level_rule(model, tokenizer, tmp_path, frames, size):
    low, high = 4 * 32 * 32, 4 * 64 * 64
    adapter = adapter_for(saved(model, tokenizer, tmp_path, low, high))
    assert (adapter.min_pixels, adapter.max_pixels) == (low, high)  # read from the checkpoint folder
    video = adapter.pixels(np.random.default_rng(0).integers(0, 256, size=(frames, *size, 3), dtype=np.uint8))
    assert tuple(video.shape[2:]) == video_resize_rule(frames, *size, 16, low, high)
    assert video.shape[0] == frames + frames % 2


def test_cli_runs_a_saved_checkpoint(model, tokenizer, tmp_path, capsys):
    from vidtok.cli import main
    from vidtok.video import write_video

    folder = tmp_path / "qwen3"
    saved(model, tokenizer, folder, min_pixels=6 * 64 * 64, max_pixels=6 * 64 * 64)
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8))
    for args in (["--method", "visionzip", "--guide", "self", "--frames", "6"], ["--method", "fastv", "--guide", "inline", "--layer", "3", "--frames", "6"]):
        assert main(["run", str(clip), Q, "--model", str(folder), "--json", "--retention", "0.25", *args]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["unit"] == "temporal_group" and record["frames"] == 3 and record["tokens_per_frame"] == PER_GROUP
        assert sum(record["budgets"]) == record["total_budget"] == record["visual_tokens_kept"] == 12
    assert main(["run", str(clip), Q, "--model", str(folder), "--json", "--method", "fastv", "--layer", "1", "--frames", "6"]) != 0
    assert "FastV layer >= 2" in capsys.readouterr().err


def test_an_odd_count_of_frames_given_as_arrays_repeats_the_last_time(model):
    adapter = adapter_for(model)
    video = adapter.pixels(np.zeros((5, 64, 64, 3), dtype=np.uint8))  # taken as 2 fps; the 6th frame repeats the 5th
    assert adapter.timestamps(video) == pytest.approx([0.25, 1.25, 2.0])


def test_frame_times_come_from_the_decoded_frames_when_the_header_has_no_count(tmp_path):
    import av

    from vidtok.video import read_clip_times

    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 6, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the case: no frame count in the header
    frames, times = read_clip_times(path, 4)
    assert times == pytest.approx([0.0, 13 / 4, 26 / 4, 39 / 4])  # indices 0, 13, 26, 39 of the 40 decoded
    assert abs(int(frames[1].mean()) - 13 * 6) <= 6


def test_eval_and_bench_on_a_saved_checkpoint(model, tokenizer, tmp_path):
    from vidtok.harness.bench import BenchConfig, run_bench
    from vidtok.harness.evaluate import EvalConfig, evaluate
    from vidtok.testbed.synth import write_split

    folder = tmp_path / "ck"
    loaded = saved(model, tokenizer, folder, min_pixels=4 * 64 * 64, max_pixels=4 * 64 * 64)
    split = write_split(tmp_path / "split", seed=1, count=2, frames=4)
    with pytest.raises(ValueError, match="FastV layer >= 2"):  # refused before any sample, not sample by sample
        evaluate(EvalConfig(split=str(split), out=str(tmp_path / "e1"), methods=["fastv"], guides=["none"], retentions=[0.5], layer=1),
                 loaded, tokenizer, progress=False)
    assert not (tmp_path / "e1" / "fastv-none-r0.5").exists()
    summaries = evaluate(EvalConfig(split=str(split), out=str(tmp_path / "e2"), methods=["visionzip", "fastv"], guides=["none", "self"],
                                    retentions=[0.5]), loaded, tokenizer, progress=False)
    assert all(s["samples"] == 2 and s["failed"] == 0 for s in summaries)
    config = BenchConfig(name="q3", main={"path": str(folder)}, frames=4, repeats=1, warmup=0, decode_tokens=1,
                         runs=[{"method": "visionzip", "guide": "self", "retentions": [0.25]}])
    rows = run_bench(config, tmp_path / "b", log=lambda *a: None)["rows"]
    assert [r["method"] for r in rows] == ["full", "visionzip"] and rows[1]["visual_tokens_kept"] == 8
    assert rows[1]["prefill_flops"] is None and rows[1]["ttft_seconds"] > 0  # timed; FLOPs are not modelled for this family


def test_fps_sampling_counts_frames_as_the_video_processor_does(model, tmp_path):
    from vidtok.video import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, size=(40, 64, 64, 3), dtype=np.uint8), fps=4)  # 10 s
    adapter = adapter_for(model)
    # int(10 s x fps) frames, at least min_frames (4), at most the clip's 40
    for fps, expected in ((0.1, 4), (1, 10), (1.5, 15), (2, 20), (8, 40)):
        video = adapter.pixels(str(clip), fps=fps)
        assert video.shape[0] == expected + expected % 2, fps
