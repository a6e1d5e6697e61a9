"""Batched inference equals one item at a time: answers, plans and logits, every family and method."""

import pytest
import torch

import vidtok
from vidtok import Composed, DyToK, FastV, Full, Uniform, VisionZip
from vidtok.testbed.toy import build_qwen3_toy_model, build_qwen_toy_model, build_tokenizer, build_toy_model

from helpers import assert_unchanged, snapshot

QUESTIONS = ["what shape is red ?", "which object is the blue one ?", "what colour is the shape ?", "is the green object a shape ?"]


def _warm(model, family):
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        if family == "llava_onevision":
            model.model.get_video_features(torch.zeros(1, 1, 3, 64, 64))
        else:
            model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


def _build(family, seed):
    if family == "llava_onevision":
        return _warm(build_toy_model("test", seed=seed), family)
    if family == "qwen2_5_vl":
        return _warm(build_qwen_toy_model("test", seed=seed), family)
    return _warm(build_qwen3_toy_model(family, seed=seed), family)


FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    return name, _build(name, 0), _build(name, 1), build_tokenizer(name)


def _videos(count=4, frames=4):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(frames, 3, 64, 64, generator=generator) for _ in range(count)]


def _methods(assistant):
    return {
        "full": None,
        "visionzip": VisionZip(0.25),
        "uniform-self": DyToK(Uniform(0.3), guide="self"),
        "visionzip-assistant": DyToK(VisionZip(0.25), guide=assistant),
        "fastv": FastV(0.25, layer=2),
        "fastv-inline": DyToK(FastV(0.25, layer=2), guide="inline"),
        "fastv-assistant": DyToK(FastV(0.25, layer=2), guide=assistant),
        "composed": DyToK(Composed(encoder=VisionZip(0.5), llm=FastV(0.5, layer=2)), guide="self"),
    }


PLAN_KEYS = ("budgets", "kept", "total_budget", "visual_tokens_kept", "vision_budgets", "guide_layers")
GENERATION = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def _same(batched, alone):
    assert batched.text == alone.text
    assert torch.equal(batched.sequences, alone.sequences)
    for key in PLAN_KEYS:
        assert getattr(batched.plan, key) == getattr(alone.plan, key), key
    if alone.plan.frame_weights is None:
        assert batched.plan.frame_weights is None
    else:
        assert torch.allclose(torch.tensor(batched.plan.frame_weights), torch.tensor(alone.plan.frame_weights), atol=1e-5)
    assert batched.logits.shape == alone.logits.shape
    assert torch.allclose(batched.logits[0], alone.logits[0], atol=1e-4), (batched.logits[0] - alone.logits[0]).abs().max()


METHOD_NAMES = ["full", "visionzip", "uniform-self", "visionzip-assistant", "fastv", "fastv-inline", "fastv-assistant", "composed"]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_batch_equals_one_item_at_a_time(family, name):
    kind, model, assistant, tokenizer = family
    method = _methods(assistant)[name]
    videos = _videos()
    before, guide_before = snapshot(model), snapshot(assistant)
    batched = vidtok.generate(model, tokenizer, videos, QUESTIONS, method, **GENERATION)
    assert len(batched) == 4 and all(r.plan.batch_size == 4 for r in batched)
    for video, question, result in zip(videos, QUESTIONS, batched):
        _same(result, vidtok.generate(model, tokenizer, video, question, method, **GENERATION))
    assert_unchanged(model, before)
    assert_unchanged(assistant, guide_before)


def test_retention_one_in_a_batch_is_the_unmodified_models_batch(family):
    kind, model, _, tokenizer = family
    videos = _videos(3)
    full = vidtok.generate(model, tokenizer, videos, QUESTIONS[:3], None, **GENERATION)
    ones = vidtok.generate(model, tokenizer, videos, QUESTIONS[:3], DyToK(VisionZip(1.0), guide="self"), **GENERATION)
    for a, b in zip(full, ones):
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logits, b.logits)


def test_mixed_frame_counts_batch_and_fastv_groups_them():
    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    generator = torch.Generator().manual_seed(5)
    videos = [torch.randn(n, 3, 64, 64, generator=generator) for n in (4, 6, 4, 2)]
    for method in (VisionZip(0.25), FastV(0.25, layer=2), DyToK(FastV(0.25, layer=2), guide="inline")):
        batched = vidtok.generate(model, tokenizer, videos, QUESTIONS, method, **GENERATION)
        for video, question, result in zip(videos, QUESTIONS, batched):
            _same(result, vidtok.generate(model, tokenizer, video, question, method, **GENERATION))


def test_one_video_many_questions_is_decoded_and_encoded_once():
    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    video = _videos(1)[0]
    results = vidtok.generate(model, tokenizer, video, QUESTIONS, DyToK(VisionZip(0.25), guide="self"), **GENERATION)
    assert sum("vision" in r.plan.seconds for r in results) == 1  # the others reuse it
    assert all("vision_reused" in r.plan.seconds for r in results[1:])
    for question, result in zip(QUESTIONS, results):
        _same(result, vidtok.generate(model, tokenizer, video, question, DyToK(VisionZip(0.25), guide="self"), **GENERATION))


def test_a_call_that_raises_mid_batch_leaves_the_models_unchanged():
    model, assistant, tokenizer = _build("llava_onevision", 0), _build("llava_onevision", 1), build_tokenizer("llava_onevision")
    before, guide_before = snapshot(model), snapshot(assistant)
    videos = _videos()
    videos[2] = torch.randn(4, 3, 32, 32)  # the wrong size for this model: item 2 fails after items 0 and 1 were read
    with pytest.raises(ValueError, match="pixel values must be"):
        vidtok.generate(model, tokenizer, videos, QUESTIONS, DyToK(FastV(0.25, layer=2), guide=assistant))
    assert_unchanged(model, before)
    assert_unchanged(assistant, guide_before)


@pytest.mark.parametrize(
    "videos, questions, message",
    [
        ("two", "what shape is red ?", "2 videos with one question string: pass a list of questions"),
        ("two", QUESTIONS[:3], "2 videos for 3 questions"),
        ("two", [], "an empty batch"),
        ("two", ["what shape is red ?", ""], "non-empty string"),
    ],
)
def test_bad_batches_are_clear_errors(videos, questions, message, tmp_path):
    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    paths = [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    given = paths if videos == "two" else videos
    with pytest.raises(ValueError, match=message):
        vidtok.generate(model, tokenizer, given, questions, VisionZip(0.25))


def test_full_batches_with_full_method_objects(family):
    kind, model, _, tokenizer = family
    videos = _videos(2)
    a = vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], Full(), **GENERATION)
    b = vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], None, **GENERATION)
    assert [r.text for r in a] == [r.text for r in b]


@pytest.mark.parametrize("guide", ["self", "assistant"])
def test_a_shared_guide_pass_equals_separate_passes(family, guide):
    kind, model, assistant, tokenizer = family
    method = DyToK(VisionZip(0.25), guide="self" if guide == "self" else assistant)
    video = _videos(1)[0]
    results = vidtok.generate(model, tokenizer, video, QUESTIONS[:3], method, **GENERATION)
    for question, result in zip(QUESTIONS, results):
        shared = result.plan.guide_shared
        assert shared["questions"] == 3 and shared["prefix_tokens"] < shared["prompt_tokens"]
        assert shared["prefix_tokens"] > result.plan.visual_tokens_in  # the whole video ran once
        _same(result, vidtok.generate(model, tokenizer, video, question, method, **GENERATION))


def test_a_batch_that_does_not_fit_is_refused_with_the_size_that_fits(monkeypatch):
    import vidtok.pipeline as pipeline

    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    videos = _videos()
    one = vidtok.prepare(model, tokenizer, videos[0], QUESTIONS[0], None)
    length = one.inputs["input_ids"].shape[1]
    config = model.config.get_text_config()
    per_item = (2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * (length + 8)
                + length * (6 * config.hidden_size + 3 * config.intermediate_size)) * 4
    monkeypatch.setattr(pipeline, "free_memory", lambda device: int(2.5 * per_item))  # room for two items of this length
    with pytest.raises(ValueError, match="use a batch of at most 2"):
        vidtok.generate(model, tokenizer, videos, [QUESTIONS[0]] * 4, None, max_new_tokens=8)
    assert len(vidtok.generate(model, tokenizer, videos[:2], [QUESTIONS[0]] * 2, None, max_new_tokens=8)) == 2


def test_a_list_of_frames_is_one_video_and_a_list_of_videos_needs_questions():
    import numpy as np

    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    frames = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    alone = vidtok.generate(model, tokenizer, frames, QUESTIONS[0], None, max_new_tokens=2)
    batched = vidtok.generate(model, tokenizer, frames, QUESTIONS, None, max_new_tokens=2)  # 4 frames, 4 questions: one video
    assert alone.plan.frames == 4 and batched[0].plan.frames == 4 and batched[0].text == alone.text
    with pytest.raises(ValueError, match="2 videos with one question string"):
        vidtok.generate(model, tokenizer, _videos(2), QUESTIONS[0], None)


def test_several_samples_per_item_are_one_at_a_time():
    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    videos = _videos(2)
    with pytest.raises(ValueError, match="num_return_sequences=2 in a batch"):
        vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], None, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    one = vidtok.generate(model, tokenizer, videos[0], QUESTIONS[0], None, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    assert one.sequences.shape[0] == 2


def test_stopping_other_than_the_end_token_is_one_at_a_time():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    with pytest.raises(ValueError, match="a batch stops each item at its end token only"):
        vidtok.generate(model, tokenizer, _videos(2), QUESTIONS[:2], None, stopping_criteria=StoppingCriteriaList([Never()]))
    vidtok.generate(model, tokenizer, _videos(1)[0], QUESTIONS[0], None, stopping_criteria=StoppingCriteriaList([Never()]), max_new_tokens=2)


def test_a_guide_batch_that_does_not_fit_is_refused(monkeypatch):
    import vidtok.pipeline as pipeline

    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    monkeypatch.setattr(pipeline, "free_memory", lambda device: 1000)
    with pytest.raises(ValueError, match="a batch of 4 guide prompts of up to"):
        vidtok.generate(model, tokenizer, _videos(), QUESTIONS, DyToK(VisionZip(0.25), guide="self"))


def test_caches_in_a_batch_are_one_per_item_or_one_for_all():
    model, tokenizer = _build("llava_onevision", 0), build_tokenizer("llava_onevision")
    videos = _videos(2)
    with pytest.raises(ValueError, match="3 caches for 2 questions"):
        vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], None, cache=[None, None, None])
    caches = [vidtok.VideoCache(v) for v in videos]
    first = vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], VisionZip(0.25), cache=caches, max_new_tokens=2)
    again = vidtok.generate(model, tokenizer, videos, QUESTIONS[2:4], VisionZip(0.25), cache=caches, max_new_tokens=2)
    assert all("vision_reused" in r.plan.seconds for r in again) and not any("vision_reused" in r.plan.seconds for r in first)
    with pytest.raises(ValueError, match="belongs to another video"):  # one cache given for two different videos
        vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], None, cache=caches[0])


def test_one_encode_through_a_cache_serves_every_method(family):
    name, model, assistant, tokenizer = family
    video = _videos(1)[0]

    def run(vision_attention):
        cache = vidtok.VideoCache(video, signals=True)
        model.set_attn_implementation({"vision_config": vision_attention})
        try:
            for key, method in _methods(assistant).items():
                shared = vidtok.generate(model, tokenizer, video, QUESTIONS[1], method, cache=cache, **GENERATION)
                alone = vidtok.generate(model, tokenizer, video, QUESTIONS[1], method, **GENERATION)
                assert torch.equal(shared.sequences, alone.sequences) and torch.equal(shared.logits, alone.logits), key
                assert shared.plan.kept == alone.plan.kept, key
        finally:
            model.set_attn_implementation({"vision_config": "sdpa"})
        return cache.computed["vision"]

    # reading VisionZip's signals runs the stock sdpa kernel: on an sdpa tower one encode (signals read) serves all
    assert run("sdpa") == 1
    # an eager tower's plain encode is not that kernel: a method that reads no signals gets its own, exact encode
    assert run("eager") == 2


def test_signals_are_read_for_every_encode_only_when_the_cache_asks(family, monkeypatch):
    name, model, assistant, tokenizer = family
    adapter = vidtok.adapter_for(model)
    asked = []
    original = type(adapter).encode_videos
    monkeypatch.setattr(type(adapter), "encode_videos", lambda self, videos, signals=False: asked.append(signals) or original(self, videos, signals))
    videos = _videos(2)
    for caches in (None, [vidtok.VideoCache(v) for v in videos], [vidtok.VideoCache(v, signals=True) for v in videos]):
        vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], Uniform(0.5), cache=caches, max_new_tokens=1)
    vidtok.generate(model, tokenizer, videos, QUESTIONS[:2], VisionZip(0.5), max_new_tokens=1)
    assert asked == [False, False, True, True]


def test_a_cached_encode_is_not_served_after_the_towers_kernel_changes(family):
    name, model, assistant, tokenizer = family
    video = _videos(1)[0]
    cache = vidtok.VideoCache(video)
    vidtok.generate(model, tokenizer, video, QUESTIONS[0], Uniform(0.5), cache=cache, max_new_tokens=1)
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        shared = vidtok.generate(model, tokenizer, video, QUESTIONS[0], Uniform(0.5), cache=cache, **GENERATION)
        alone = vidtok.generate(model, tokenizer, video, QUESTIONS[0], Uniform(0.5), **GENERATION)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    assert cache.computed["vision"] == 2 and torch.equal(shared.logits, alone.logits)
