"""Qwen2.5-VL: tiny models built in code; inputs checked against the model's own rules written out here."""

import json
import math

import numpy as np
import pytest
import torch

import vidtok
from vidtok import Composed, DyToK, FastV, Full, Random, Uniform, VisionZip, adapter_for, generate, prepare
from vidtok.testbed.toy import QWEN_SPECIALS, build_qwen_toy_model, build_tokenizer

from helpers import assert_unchanged, snapshot

Q = "what shape is red ?"
FRAMES = 6  # three temporal groups of 4x4 merged tokens (64-px frames, 8-px patches, 2x2 merge)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("qwen2_5_vl")


def _warmed(seed):
    model = build_qwen_toy_model("test", seed=seed)
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture
def model():
    return _warmed(0)


@pytest.fixture
def assistant():
    return _warmed(1)


@pytest.fixture
def pixels():
    return torch.randn(FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# the model's own rules, written out independently of vidtok ---------------------------------

def reference_patches(pixels, patch=8, merge=2, temporal=2):
    """The processor's patchify: [T*h*w, C*tp*p*p] in (group, block row, block col, row, col) order."""
    frames, channels, height, width = pixels.shape
    t, h, w = frames // temporal, height // patch, width // patch
    out = []
    for g in range(t):
        for br in range(h // merge):
            for bc in range(w // merge):
                for r in range(merge):
                    for c in range(merge):
                        y, x = (br * merge + r) * patch, (bc * merge + c) * patch
                        block = pixels[g * temporal : (g + 1) * temporal, :, y : y + patch, x : x + patch]  # [tp, C, p, p]
                        out.append(block.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(out), (t, h, w)


def reference_positions(before, groups, height, width, interval, after):
    """The original Qwen rule, token by token: text +1; vision (s + floor(t*interval), s + h, s + w);
    text after a vision block at its largest position + 1."""
    rows = [[i, i, i] for i in range(before)]
    start = before
    for g in range(groups):
        for y in range(height):
            for x in range(width):
                rows.append([start + math.floor(g * interval), start + y, start + x])
    nxt = max(max(r) for r in rows[before:]) + 1
    rows += [[nxt + i] * 3 for i in range(after)]
    return torch.tensor(rows).T[:, None, :]


def reference_inputs(model, tokenizer, pixels, seconds_per_frame=0.5):
    specials = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    patches, (t, h, w) = reference_patches(pixels)
    tokens = t * (h // 2) * (w // 2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    at = ids.index(specials["<|video_pad|>"])
    assert ids[at - 1] == specials["<|vision_start|>"] and ids[at + 1] == specials["<|vision_end|>"]
    ids = ids[:at] + [specials["<|video_pad|>"]] * tokens + ids[at + 1 :]
    interval = model.config.vision_config.tokens_per_second * 2 * seconds_per_frame
    positions = reference_positions(at, t, h // 2, w // 2, interval, len(ids) - at - tokens)
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": patches,
            "video_grid_thw": torch.tensor([[t, h, w]]), "position_ids": positions}


def test_full_inputs_equal_the_independent_construction(model, tokenizer, pixels):
    reference = reference_inputs(model, tokenizer, pixels)
    prepared = prepare(model, tokenizer, pixels, Q, None)
    assert torch.equal(prepared.inputs["input_ids"], reference["input_ids"])
    assert torch.equal(prepared.inputs["position_ids"], reference["position_ids"])
    adapter = adapter_for(model)
    assert torch.equal(adapter._patchify(adapter.pixels(pixels)), reference["pixel_values_videos"])
    assert prepared.plan.unit == "temporal_group" and prepared.plan.frames == 3 and prepared.plan.tokens_per_frame == 16


def test_text_after_the_video_starts_past_its_temporal_extent(model, tokenizer):
    # 12 groups at 2 tokens/s x 1 s per group: temporal positions reach start + 22, far past the 4x4
    # grid's spatial extent (start + 3); transformers' get_rope_index starts the text at start + 4
    pixels = torch.randn(24, 3, 64, 64)
    prepared = prepare(model, tokenizer, pixels, Q, None)
    positions = prepared.inputs["position_ids"][:, 0]
    ids = prepared.inputs["input_ids"][0]
    video = (ids == model.config.video_token_id).nonzero().squeeze(1)
    last = int(video[-1])
    assert int(positions[:, last + 1].min()) == int(positions[:, video].max()) + 1
    mm = (ids == model.config.video_token_id).int()[None] * 2
    theirs, _ = model.model.get_rope_index(ids[None], mm, video_grid_thw=torch.tensor([[12, 8, 8]]),
                                           second_per_grid_ts=torch.tensor([1.0]))
    assert int(theirs[0, 0, last + 1]) < int(positions[0, last + 1])  # the disagreement vidtok avoids


METHODS = [None, Full(), Uniform(1.0), Random(1.0), VisionZip(1.0), FastV(1.0, layer=1), DyToK(VisionZip(1.0)), DyToK(FastV(1.0), guide="inline")]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_retention_one_reproduces_the_unmodified_model_exactly(model, tokenizer, pixels, method):
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected_logits = model(**reference).logits
        expected = model.generate(**reference, max_new_tokens=6, do_sample=False)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        assert torch.equal(model(**prepared.inputs).logits, expected_logits)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, expected)


@pytest.mark.parametrize("guide", ["self", "assistant"])
@pytest.mark.parametrize("base", [VisionZip(1.0), Uniform(1.0), Random(1.0), FastV(1.0)], ids=str)
def test_retention_one_with_a_guide_is_exact_too(model, assistant, tokenizer, pixels, base, guide):
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected = model.generate(**reference, max_new_tokens=4, do_sample=False)
    method = DyToK(base, guide="self" if guide == "self" else assistant)
    assert torch.equal(generate(model, tokenizer, pixels, Q, method, max_new_tokens=4, do_sample=False).sequences, expected)


@pytest.mark.parametrize(
    "method",
    [Uniform(0.3), Random(0.25, seed=2), VisionZip(0.25), DyToK(VisionZip(0.25)), DyToK(Uniform(0.4), layers=[1, 2]),
     FastV(0.25, layer=1), DyToK(FastV(0.25, layer=2), guide="inline"), DyToK(Composed(encoder=VisionZip(0.5), llm=FastV(0.5)))],
    ids=str,
)
def test_kept_counts_follow_the_budgets_per_temporal_group(model, tokenizer, pixels, method):
    before = snapshot(model)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=3)
    plan = result.plan
    assert plan.unit == "temporal_group" and len(plan.budgets) == 3
    assert [len(k) for k in plan.kept] == plan.budgets and sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept
    assert plan.total_budget == round(method.retention * 3 * 16 + 1e-9)
    assert_unchanged(model, before)
    assert model.model.rope_deltas is None  # vidtok passes positions: the model's cached deltas are never set


def test_compressed_tokens_keep_their_full_layout_positions(model, tokenizer, pixels):
    full = prepare(model, tokenizer, pixels, Q, None)
    prepared = prepare(model, tokenizer, pixels, Q, VisionZip(0.25))
    ids_full, ids = full.inputs["input_ids"][0], prepared.inputs["input_ids"][0]
    video_full = (ids_full == model.config.video_token_id).nonzero().squeeze(1)
    video = (ids == model.config.video_token_id).nonzero().squeeze(1)
    flat = [u * 16 + i for u, kept in enumerate(prepared.plan.kept) for i in kept]
    assert torch.equal(prepared.inputs["position_ids"][:, 0, video], full.inputs["position_ids"][:, 0, video_full[flat]])
    # the text after the video keeps its full-layout positions too, so decoding continues them
    assert torch.equal(prepared.inputs["position_ids"][:, 0, video[-1] + 1 :], full.inputs["position_ids"][:, 0, video_full[-1] + 1 :])


def test_visionzip_signals_match_a_reference_from_the_ranking_block(model, pixels):
    """Attention received and keys recomputed from the last full-attention block's own inputs, put into
    raster order by matching the merger's window-order output with the pooled output (not vidtok's code)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    adapter = adapter_for(model)
    video = adapter.pixels(pixels)
    block = model.model.visual.blocks[max(model.config.vision_config.fullatt_block_indexes)].attn
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.model.get_video_features(adapter._patchify(video), video_grid_thw=torch.tensor([[3, 8, 8]]), return_dict=True)
    finally:
        handle.remove()
    x, cu = seen["x"], seen["cu_seqlens"].tolist()
    q, k, _ = block.qkv(x).reshape(x.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    received = torch.cat([((q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(-1, -2)) * block.scaling).softmax(-1).mean((0, 1))
                          for a, b in zip(cu[:-1], cu[1:])])
    keys = k.mean(1)
    # window order -> raster order: the merged window-order rows that equal each pooled output row
    merged = model.model.visual.merger(out.last_hidden_state)
    pooled = out.pooler_output[0]
    order = torch.stack([(merged - row).abs().sum(-1).argmin() for row in pooled])
    assert torch.allclose(merged[order], pooled)
    expected_attention = received.reshape(-1, 4).mean(1)[order].reshape(3, 16)
    expected_keys = keys.reshape(-1, 4, keys.shape[-1]).mean(1)[order].reshape(3, 16, -1)
    with torch.no_grad():
        signals = adapter.encode_video(video, signals=True).signals
    assert torch.allclose(signals.attention, expected_attention, atol=1e-6)
    assert torch.allclose(signals.metric, expected_keys, atol=1e-5)


def test_fastv_on_qwen_equals_the_masked_reference(model, tokenizer, pixels):
    from test_fastv import MaskedReference

    method = DyToK(FastV(0.25, layer=1), guide="self")
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        logits = model(**prepared.inputs).logits[0, -1]
    ids = prepared.inputs["input_ids"]
    visual = (ids[0] == model.config.video_token_id).nonzero().squeeze(1).tolist()
    kept = {visual[u * 16 + i] for u, k in enumerate(prepared.plan.kept) for i in k}
    dropped = [p for p in visual if p not in kept]
    with torch.no_grad(), MaskedReference(model, 1, dropped):
        reference = model(**prepared.inputs).logits[0, -1]
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    result = generate(model, tokenizer, pixels, Q, method, **settings)
    with torch.no_grad(), MaskedReference(model, 1, dropped):
        expected = model.generate(**prepare(model, tokenizer, pixels, Q, method).inputs, **settings)
    assert torch.equal(result.sequences, expected)


def test_frames_resolution_and_bad_pixels(model, tokenizer):
    adapter = adapter_for(model)
    odd = adapter.pixels(torch.randn(5, 3, 64, 64))
    assert odd.shape[0] == 6 and torch.equal(odd.pixels[5], odd.pixels[4])  # the last frame repeated, as the processor does
    with pytest.raises(vidtok.VideoError, match="not multiples of 16"):
        adapter.pixels(torch.randn(4, 3, 60, 64))
    with pytest.raises(vidtok.VideoError, match="aspect ratio"):
        adapter.pixels(np.zeros((2, 2, 500, 3), dtype=np.uint8))
    with pytest.raises(vidtok.VideoError, match="NaN"):
        adapter.pixels(torch.full((2, 3, 64, 64), float("nan")))
    with pytest.raises(vidtok.VideoError, match="4 frames, 3 were asked for"):
        adapter.pixels(torch.randn(4, 3, 64, 64), frames=3)
    assert adapter.pixels(adapter.pixels(torch.randn(5, 3, 64, 64)), frames=5).shape[0] == 6  # its own padded output


def smart_resize_rule(height, width, factor, low, high):
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > high:
        beta = math.sqrt(height * width / high)
        return max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    if h * w < low:
        beta = math.sqrt(low / (height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def saved(model, tokenizer, folder, min_pixels=32 * 32, max_pixels=96 * 96):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}))
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.mark.parametrize("size", [(20, 24), (64, 64), (200, 120), (70, 33)])
def test_frames_are_resized_by_the_models_rule(model, tokenizer, tmp_path, size):
    loaded = saved(model, tokenizer, tmp_path)
    adapter = adapter_for(loaded)
    assert (adapter.min_pixels, adapter.max_pixels) == (32 * 32, 96 * 96)  # read from the checkpoint folder
    frames = np.random.default_rng(0).integers(0, 256, size=(4, *size, 3), dtype=np.uint8)
    video = adapter.pixels(frames)
    assert tuple(video.shape[2:]) == smart_resize_rule(*size, 16, 32 * 32, 96 * 96)
    assert 32 * 32 <= video.shape[2] * video.shape[3] <= 96 * 96 or min(video.shape[2:]) == 16


def test_cli_runs_a_saved_qwen_checkpoint(model, tokenizer, tmp_path, capsys):
    from vidtok.cli import main
    from vidtok.video import write_video

    folder = tmp_path / "qwen"
    saved(model, tokenizer, folder, min_pixels=64 * 64, max_pixels=64 * 64)
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8))
    for args in (["--method", "visionzip", "--guide", "self", "--frames", "5"], ["--method", "fastv", "--guide", "inline", "--frames", "8"]):
        assert main(["run", str(clip), Q, "--model", str(folder), "--json", "--retention", "0.25", *args]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["unit"] == "temporal_group" and record["frames"] == (3 if "5" in args else 4)
        assert sum(record["budgets"]) == record["total_budget"] == record["visual_tokens_kept"]
    assert main(["run", str(clip), Q, "--model", str(folder), "--fps", "2", "--json", "--method", "uniform", "--guide", "none"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["frames"] == 2  # 9 frames at 4 fps = 2.25 s; 2 fps -> 4 frames -> 2 groups


def test_an_assistant_of_another_family_or_layout_is_refused(model, tokenizer, pixels):
    from vidtok.testbed.toy import build_toy_model

    with pytest.raises(ValueError, match="does not match the main model"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=build_toy_model("test")))
    other = build_qwen_toy_model("test", seed=2, patch_size=4)
    with pytest.raises(ValueError, match="patch_size 8 vs 4"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=other))


def test_an_assistant_with_the_same_vision_blocks_runs_only_its_merger(model, tokenizer, pixels):
    from vidtok.testbed.toy import qwen_toy_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen_toy_config("test")
    config.text_config.hidden_size = 16  # a narrower LLM: its merger maps into 16 wide
    config.text_config.intermediate_size = 32
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 2, 1  # head_dim 8, as the mrope sections need
    config.vision_config.out_hidden_size = 16
    torch.manual_seed(3)
    small = Qwen2_5_VLForConditionalGeneration(config).eval()
    mine = {k: v for k, v in model.model.visual.state_dict().items() if not k.startswith("merger.")}
    small.model.visual.load_state_dict(mine, strict=False)
    main, guide = adapter_for(model), adapter_for(small)
    assert main.same_vision_tower(guide) and not main.same_vision_tower(adapter_for(build_qwen_toy_model("test", seed=5)))
    video = main.pixels(pixels)
    with torch.no_grad():
        encoded = main.encode_video(video)
        shared = guide.project(encoded.vision_hidden, encoded).features
        own = guide.encode_video(video).features
    assert shared.shape == own.shape == (3, 16, 16) and torch.allclose(shared, own, atol=1e-6)
    plan = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=small), max_new_tokens=2).plan
    assert "guide_vision" in plan.seconds and sum(plan.budgets) == 12
    # two videos in one tower call: each one's blocks' output, split back, is what its own call gives the assistant
    other = main.pixels(pixels.roll(1, 0))
    with torch.no_grad():
        joint = main.encode_videos([video, other], signals=True)
        for alone, together in zip((main.encode_video(video, signals=True), main.encode_video(other, signals=True)), joint):
            assert torch.allclose(alone.vision_hidden, together.vision_hidden, atol=1e-5)
            assert torch.allclose(alone.features, together.features, atol=1e-5)
            assert torch.allclose(alone.signals.attention, together.signals.attention, atol=1e-6)
            assert torch.allclose(guide.project(together.vision_hidden, together).features, guide.project(alone.vision_hidden, alone).features,
                                  atol=1e-5)


def test_eval_calibrate_and_viz_on_a_qwen_checkpoint(model, tokenizer, tmp_path, capsys):
    from vidtok.cli import main
    from vidtok.harness.analysis import calibrate
    from vidtok.harness.evaluate import EvalConfig, evaluate
    from vidtok.testbed.synth import read_split, write_split

    loaded = saved(model, tokenizer, tmp_path / "qwen", min_pixels=64 * 64, max_pixels=64 * 64)
    write_split(tmp_path / "split", seed=5, count=3)
    config = EvalConfig(split=str(tmp_path / "split"), out=str(tmp_path / "out"), methods=["visionzip", "fastv"], guides=["none", "self"],
                        retentions=[0.25])
    summaries = evaluate(config, loaded, tokenizer, progress=False)
    assert len(summaries) == 5 and all(s["samples"] == 3 and s["failed"] == 0 for s in summaries)
    assert all(s["needle_survival"] is not None for s in summaries)  # needle frame -> its temporal group
    assert {s["mean_kept_tokens"] for s in summaries if s["method"] != "full"} == {32.0}  # 8 groups x 16 x 0.25
    result = calibrate(loaded, tokenizer, read_split(tmp_path / "split"))
    assert result["guide_layers"] and len(result["prior"]["layers"]) == 3
    out = tmp_path / "viz.png"
    assert main(["viz", str(tmp_path / "split" / "videos" / "00000.mp4"), Q, "--model", str(tmp_path / "qwen"), "--frames", "16",
                 "--guide", "self", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_strided_guide_is_refused_with_a_clear_error(model, tokenizer, pixels):
    """A subsampled view of a Qwen video needs its own grid and times; not built: said, not guessed."""
    with pytest.raises(ValueError, match="guide_stride is not supported for qwen2_5_vl; use guide_stride=1"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide_stride=2))
