import pytest
import torch

import vidtok
from vidtok import DyToK, Full, Random, Uniform, VisionZip, adapter_for, generate, prepare
from vidtok.testbed.toy import build_toy_model

from helpers import FRAMES, assert_unchanged, snapshot

Q = "what shape is red ?"
FULL_METHODS = [
    None,
    Full(),
    Uniform(retention=1.0),
    Random(retention=1.0),
    VisionZip(retention=1.0),
    DyToK(VisionZip(retention=1.0)),
]


def unmodified_inputs(model, tokenizer, pixels):
    adapter = adapter_for(model)
    ids = adapter.input_ids(tokenizer, Q, FRAMES * adapter.tokens_per_frame + 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels[None]}


@pytest.mark.parametrize("method", FULL_METHODS, ids=str)
def test_retention_one_reproduces_the_unmodified_model_exactly(model, tokenizer, pixels, method):
    reference = unmodified_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected_logits = model(**reference).logits
        expected_tokens = model.generate(**reference, max_new_tokens=6, do_sample=False)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad():
        logits = model(**prepared.inputs).logits
    assert torch.equal(logits, expected_logits)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, expected_tokens)
    assert result.plan.visual_tokens_kept == result.plan.visual_tokens_in


@pytest.mark.parametrize(
    "method",
    [Uniform(0.3), Random(0.2, seed=4), VisionZip(0.25), DyToK(VisionZip(0.25)), DyToK(Uniform(0.4), layers="1-2", floor=1)],
    ids=str,
)
def test_kept_tokens_and_placeholders_follow_the_budgets(model, tokenizer, pixels, method):
    prepared = prepare(model, tokenizer, pixels, Q, method)
    plan = prepared.plan
    adapter = adapter_for(model)
    assert plan.total_budget == round(method.retention * FRAMES * adapter.tokens_per_frame + 1e-9)
    assert sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept
    assert [len(k) for k in plan.kept] == plan.budgets
    placeholders = int((prepared.inputs["input_ids"] == model.config.video_token_id).sum())
    assert placeholders == sum(plan.budgets) + 1
    with torch.no_grad():
        out = model(**prepared.inputs)
    assert torch.isfinite(out.logits).all()
    if isinstance(method, DyToK):
        assert plan.frame_weights is not None and abs(sum(plan.frame_weights) - 1) < 1e-5
        if method.floor:
            assert min(plan.budgets) >= method.floor


def test_compressed_tokens_are_the_kept_features(model, tokenizer, pixels):
    """Uniform keeps features unchanged: what reaches the LLM is exactly features[f, kept[f]]."""
    encoded = adapter_for(model).encode_video(pixels)
    features, newline, _ = encoded.features, encoded.newline, encoded.signals
    prepared = prepare(model, tokenizer, pixels, Q, Uniform(0.25))
    expected = torch.cat([features[f, k] for f, k in enumerate(prepared.plan.kept)] + [newline])
    got = prepared.inputs["mm_encoder_outputs"]["video"].pooler_output[0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("base", [Uniform(0.3), VisionZip(0.25), Random(0.4, seed=2)], ids=str)
def test_dytok_with_uniform_weights_equals_the_base_alone(model, tokenizer, pixels, base, monkeypatch):
    import vidtok.pipeline as pipeline

    monkeypatch.setattr(pipeline, "frame_weights", lambda token_weights, frames: torch.full((frames,), 1.0 / frames))
    alone = prepare(model, tokenizer, pixels, Q, base)
    wrapped = prepare(model, tokenizer, pixels, Q, DyToK(base))
    assert wrapped.plan.budgets == alone.plan.budgets
    assert wrapped.plan.kept == alone.plan.kept
    assert torch.equal(wrapped.inputs["input_ids"], alone.inputs["input_ids"])
    assert torch.equal(
        wrapped.inputs["mm_encoder_outputs"]["video"].pooler_output, alone.inputs["mm_encoder_outputs"]["video"].pooler_output
    )


def test_dytok_budgets_follow_the_guide(model, tokenizer, pixels, monkeypatch):
    import vidtok.pipeline as pipeline

    monkeypatch.setattr(pipeline, "frame_weights", lambda token_weights, frames: torch.tensor([0.7, 0.1, 0.1, 0.1]))
    plan = prepare(model, tokenizer, pixels, Q, DyToK(Uniform(0.5))).plan
    assert plan.budgets == [16, 6, 5, 5]


@pytest.mark.parametrize("method", [VisionZip(0.25), DyToK(VisionZip(0.25)), Full()], ids=str)
def test_model_unchanged_after_call(model, tokenizer, pixels, method):
    before = snapshot(model)
    generate(model, tokenizer, pixels, Q, method, max_new_tokens=2)
    assert_unchanged(model, before)


def test_model_unchanged_after_a_call_that_raised(model, tokenizer, pixels, monkeypatch):
    import vidtok.compressors.visionzip as vz

    before = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    # raise inside the guide pass, while the capture implementation is switched on
    with pytest.raises(ValueError):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), layers=[7]))
    monkeypatch.setattr(vidtok.importance, "last_token_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25)))
    monkeypatch.setattr(vz, "visionzip_frames", boom)
    with pytest.raises(RuntimeError, match="boom"):
        prepare(model, tokenizer, pixels, Q, VisionZip(0.25))
    assert_unchanged(model, before)


def test_two_models_do_not_affect_each_other(model, assistant, tokenizer, pixels):
    before = snapshot(assistant)
    with torch.no_grad():
        alone = assistant(**unmodified_inputs(assistant, tokenizer, pixels)).logits
    prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25)))
    with torch.no_grad():
        after = assistant(**unmodified_inputs(assistant, tokenizer, pixels)).logits
    assert torch.equal(alone, after)
    assert_unchanged(assistant, before)


def test_assistant_guide(model, assistant, tokenizer, pixels):
    before_main, before_assistant = snapshot(model), snapshot(assistant)
    result = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=assistant, layers=[1]), max_new_tokens=2)
    assert result.plan.guide == "assistant" and result.plan.guide_layers == [1]
    self_guided = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), layers=[1])).plan
    assert self_guided.frame_weights != result.plan.frame_weights
    assert "assistant" not in dict(model.named_modules())  # never attached to the main model
    assert_unchanged(model, before_main)
    assert_unchanged(assistant, before_assistant)


def test_assistant_with_another_frame_layout_is_refused(model, tokenizer, pixels):
    other = build_toy_model("test", seed=1, image_size=32)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=other))


def test_assistant_of_another_family_is_refused(model, tokenizer, pixels):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    with pytest.raises(vidtok.UnsupportedModelError, match="supported: llava_onevision"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=text_only))
    with pytest.raises(vidtok.UnsupportedModelError):
        prepare(text_only, tokenizer, pixels, Q, VisionZip(0.25))


def test_sampled_generation_runs(model, tokenizer, pixels):
    torch.manual_seed(0)
    result = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25)), max_new_tokens=4, do_sample=True, top_k=5)
    prompt = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25))).inputs["input_ids"].shape[1]
    assert prompt < result.sequences.shape[1] <= prompt + 4


def test_uint8_frames_and_files_are_accepted(model, tokenizer, frames_uint8, tmp_path):
    from vidtok.video import write_video

    from_array = prepare(model, tokenizer, frames_uint8, Q, Uniform(0.5)).plan
    path = tmp_path / "clip.mp4"
    write_video(path, frames_uint8)
    from_file = prepare(model, tokenizer, path, Q, Uniform(0.5), frames=FRAMES).plan
    assert from_array.frames == from_file.frames == FRAMES


@pytest.mark.parametrize(
    "video, kwargs, message",
    [
        (torch.zeros(0, 3, 64, 64), {}, "zero frames"),
        (torch.zeros(4, 3, 32, 32), {}, "pixel values"),
        ("/nonexistent.mp4", {"frames": 4}, "no video file"),
    ],
)
def test_bad_video_input(model, tokenizer, video, kwargs, message):
    with pytest.raises(vidtok.VideoError, match=message):
        prepare(model, tokenizer, video, Q, Uniform(0.5), **kwargs)


def test_too_many_frames_and_empty_question(model, tokenizer, frames_uint8, tmp_path):
    from vidtok.video import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, frames_uint8)
    with pytest.raises(vidtok.VideoError, match="ask for 4 frames or fewer"):
        prepare(model, tokenizer, path, Q, Uniform(0.5), frames=8)
    with pytest.raises(ValueError, match="question"):
        prepare(model, tokenizer, path, "  ", Uniform(0.5), frames=4)
    with pytest.raises(TypeError, match="method"):
        prepare(model, tokenizer, path, Q, "visionzip", frames=4)


def test_tiny_retention_is_an_error(model, tokenizer, pixels):
    with pytest.raises(ValueError, match="keeps no token"):
        prepare(model, tokenizer, pixels, Q, Uniform(0.001))


def test_floor_larger_than_budget_is_an_error(model, tokenizer, pixels):
    with pytest.raises(ValueError, match="below"):
        prepare(model, tokenizer, pixels, Q, DyToK(Uniform(0.1), floor=4))


def test_shared_vision_tower_is_run_once_with_the_same_result(model, assistant, tokenizer, pixels):
    assistant.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    calls = []
    handles = [m.model.vision_tower.register_forward_hook(lambda *a: calls.append(1)) for m in (model, assistant)]
    try:
        shared = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=assistant, layers=[2])).plan
        assert len(calls) == 1
        calls.clear()
        separate = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=assistant, layers=[2], share_vision=False)).plan
        assert len(calls) == 2
    finally:
        for h in handles:
            h.remove()
    assert shared.budgets == separate.budgets
    torch.testing.assert_close(torch.tensor(shared.frame_weights), torch.tensor(separate.frame_weights), atol=1e-6, rtol=0)


def test_different_vision_towers_are_not_shared(model, assistant):
    assert not adapter_for(model).same_vision_tower(adapter_for(assistant))
    assert adapter_for(model).same_vision_tower(adapter_for(model))


def test_coarse_guide_grid(model, tokenizer, pixels):
    adapter = adapter_for(model)
    features = torch.randn(2, 16, 3)
    pooled = adapter.pool_frames(features, 2)
    grid = features.reshape(2, 4, 4, 3)
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))
    assert torch.allclose(pooled[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)))
    plan = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide_pool=2)).plan
    assert sum(plan.budgets) == plan.total_budget and len(plan.frame_weights) == FRAMES
    with pytest.raises(ValueError, match="guide_pool"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide_pool=3))


def _spread_reference(seen, stride, units):
    """Written from the rule: unit i lies between seen units i // stride and the next; linear
    between them, the last seen one's weight past it; then normalised."""
    out = []
    for i in range(units):
        j = i // stride
        if j + 1 < len(seen):
            t = (i - j * stride) / stride
            out.append(seen[j] * (1 - t) + seen[j + 1] * t)
        else:
            out.append(seen[j])
    total = sum(out)
    return [w / total for w in out]


@pytest.mark.parametrize("stride,units", [(2, 4), (2, 5), (3, 16), (4, 32), (5, 7)])
def test_strided_guide_weights_spread_as_written(stride, units):
    from vidtok.importance import spread_weights

    seen = torch.rand(-(-units // stride), generator=torch.Generator().manual_seed(units)) + 0.01
    got = spread_weights(seen, stride, units)
    assert torch.allclose(got, torch.tensor(_spread_reference(seen.tolist(), stride, units)), atol=1e-6)
    assert torch.allclose(got[::stride] / got[::stride].sum(), seen / seen.sum(), atol=1e-6)  # the seen units keep their ratios
    with pytest.raises(ValueError, match="weights for every"):
        spread_weights(seen[:-1], stride, units)


def test_strided_guide_is_the_guide_on_every_kth_frame(model, tokenizer, pixels):
    """The guide with stride 2 on 4 frames weighs frames 0 and 2 as the guide does on a video of
    just those two frames, and frames 1 and 3 by interpolation."""
    from vidtok.importance import spread_weights

    strided = prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide_stride=2)).plan
    alone = prepare(model, tokenizer, pixels[::2], Q, DyToK(VisionZip(0.25))).plan
    expected = spread_weights(torch.tensor(alone.frame_weights), 2, FRAMES)
    assert torch.allclose(torch.tensor(strided.frame_weights), expected, atol=1e-5)
    assert sum(strided.budgets) == strided.total_budget
    assert "guide_stride=2" in str(DyToK(VisionZip(0.25), guide_stride=2))
    with pytest.raises(ValueError, match="stride below 4"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide_stride=4))
    with pytest.raises(ValueError, match="guide_stride must be a positive int"):
        DyToK(VisionZip(0.25), guide_stride=0)


def test_checkpoint_normalisation_is_used(tmp_path, tokenizer):
    import json

    from transformers import LlavaOnevisionForConditionalGeneration

    build_toy_model("test").save_pretrained(tmp_path)
    assert adapter_for(LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)).image_mean == (0.5, 0.5, 0.5)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    adapter = adapter_for(LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path))
    assert adapter.image_mean == (0.1, 0.2, 0.3) and adapter.image_std == (1, 2, 3)


def test_bfloat16_models_run(model, assistant, tokenizer, pixels):
    model, assistant = model.to(torch.bfloat16), assistant.to(torch.bfloat16)
    result = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=assistant), max_new_tokens=2)
    assert sum(result.plan.budgets) == result.plan.total_budget
    assert abs(sum(result.plan.frame_weights) - 1) < 1e-4


def test_an_assistant_with_a_padded_vocabulary_guides_and_a_smaller_one_is_refused(model, assistant, tokenizer, pixels):
    # released pairs share one tokenizer but pad their embedding tables differently (LLaVA-OV 0.5B 151936 rows, 7B 152128)
    rows = assistant.get_input_embeddings().num_embeddings
    assistant.resize_token_embeddings(rows + 64)
    plan = vidtok.generate(model, tokenizer, pixels, "what colour?", vidtok.DyToK(vidtok.VisionZip(0.25), guide=assistant), max_new_tokens=1).plan
    assert plan.guide == "assistant" and sum(plan.budgets) == plan.total_budget
    assistant.resize_token_embeddings(len(tokenizer) - 1)
    with pytest.raises(ValueError, match="fewer than the main tokenizer's"):
        vidtok.generate(model, tokenizer, pixels, "what colour?", vidtok.DyToK(vidtok.VisionZip(0.25), guide=assistant))


def test_a_cache_holds_the_preprocessed_pixels_and_drops_them_when_the_frames_change(model, tokenizer, frames_uint8, monkeypatch):
    from vidtok import VideoCache

    adapter_class = type(adapter_for(model))
    calls = []
    original = adapter_class.pixels
    monkeypatch.setattr(adapter_class, "pixels", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cache = VideoCache(frames_uint8)
    first = generate(model, tokenizer, frames_uint8, "what colour?", VisionZip(0.25), cache=cache, max_new_tokens=1)
    again = generate(model, tokenizer, frames_uint8, "what shape?", Uniform(0.25), cache=cache, max_new_tokens=1)
    assert len(calls) == 1 and "decode_reused" in again.plan.seconds and "decode" in first.plan.seconds
    frames_uint8[0] = 255 - frames_uint8[0]  # overwritten in place: the held pixels describe the old frames
    changed = generate(model, tokenizer, frames_uint8, "what shape?", Uniform(0.25), cache=cache, max_new_tokens=1)
    fresh = generate(model, tokenizer, frames_uint8.copy(), "what shape?", Uniform(0.25), max_new_tokens=1)
    assert len(calls) == 3 and torch.equal(changed.sequences, fresh.sequences) and cache.refreshed == 1


@pytest.mark.parametrize("pixel_format, size", [("yuv420p", (48, 80)), ("yuv444p", (64, 64))])
def test_decoded_frames_are_pyav_own_rgb_conversion(tmp_path, pixel_format, size):
    # read_frames converts with one reformatter per video (fast); the reference converts each frame on its own
    import av
    import numpy as np

    from vidtok.video import read_frames

    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.height, stream.width = size
        stream.pix_fmt = pixel_format
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        reference = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    got = read_frames(path, 6)
    assert got.shape == (6, *size, 3) and all(np.array_equal(a, b) for a, b in zip(got, reference))
