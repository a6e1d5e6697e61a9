"""FastV inside the LLM: tokens physically dropped from layer K on, checked against an independent
reference that keeps every token and masks the dropped keys in layers >= K."""

import pytest
import torch
from transformers import DynamicCache

import vidtok
from vidtok import Composed, DyToK, FastV, VisionZip, adapter_for, generate, prepare
from vidtok import flops
from vidtok.compressors.fastv import fastv_keep

from helpers import FRAMES, assert_unchanged, snapshot

Q = "what shape is red ?"
LAYERS = 3  # the test model's LLM depth


def dropped_positions(model, input_ids, plan, encoder_kept=None):
    """Prompt positions of the visual tokens the plan says were dropped. The prompt holds, frame by
    frame, the tokens the encoder side kept (`encoder_kept`, grid indices; all of them by default)."""
    encoder_kept = encoder_kept or [list(range(plan.tokens_per_frame))] * plan.frames
    visual = (input_ids[0] == model.config.video_token_id).nonzero().squeeze(1)[:-1].tolist()  # the trailing newline stays
    assert len(visual) == sum(map(len, encoder_kept))
    dropped, at = [], 0
    for grid, kept in zip(encoder_kept, plan.kept):
        dropped += [visual[at + j] for j, i in enumerate(grid) if i not in set(kept)]
        at += len(grid)
    return dropped


def encoder_kept(model, tokenizer, pixels, method):
    """What the encoder side of a composed method kept, from the encoder compressor run alone."""
    base = method.base if isinstance(method, DyToK) else method
    if not isinstance(base, Composed):
        return None
    alone = DyToK(base.encoder, guide=method.guide, layers=method.layers) if isinstance(method, DyToK) else base.encoder
    return prepare(model, tokenizer, pixels, Q, alone).plan.kept


class MaskedReference:
    """Every token kept, but in layers >= K the dropped positions are masked out as keys: what FastV
    must equal if dropping is exact. Written from the rule, not from vidtok's code."""

    def __init__(self, model, layer, dropped):
        self.layers = model.model.language_model.layers[layer:]
        self.dropped = torch.tensor(dropped, dtype=torch.long)

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache")
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        queries = past + torch.arange(hidden.shape[1])
        keys = torch.arange(past + hidden.shape[1])
        allowed = keys[None, :] <= queries[:, None]
        allowed[:, self.dropped] = False
        return args, {**kwargs, "attention_mask": allowed[None, None]}

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self.hook, with_kwargs=True) for layer in self.layers]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


METHODS = {
    "static-K1": FastV(0.25, layer=1),
    "static-K2": FastV(0.3, layer=LAYERS - 1),
    "self-K1": DyToK(FastV(0.25, layer=1), guide="self", layers=[2]),
    "self-K2": DyToK(FastV(0.25, layer=LAYERS - 1), guide="self", layers=[1, 2]),
    "inline-K1": DyToK(FastV(0.25, layer=1), guide="inline"),
    "inline-K2": DyToK(FastV(0.2, layer=LAYERS - 1), guide="inline", layers=[0, 1]),
    "visionzip+fastv-self": DyToK(Composed(encoder=VisionZip(0.5), llm=FastV(0.5, layer=1)), guide="self"),
    "visionzip+fastv-static": Composed(encoder=VisionZip(0.5), llm=FastV(0.5, layer=2)),
}


@pytest.mark.parametrize("name", METHODS)
def test_fastv_equals_the_masked_reference(model, tokenizer, pixels, name):
    method = METHODS[name]
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        logits = model(**prepared.inputs).logits[0, -1]
    layer, ids = prepared.plan.layer, prepared.inputs["input_ids"]
    grid = encoder_kept(model, tokenizer, pixels, method)
    with torch.no_grad(), MaskedReference(model, layer, dropped_positions(model, ids, prepared.plan, grid)):
        reference = model(**prepared.inputs).logits[0, -1]
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0), (logits - reference).abs().max()
    # with the dropped tokens visible, the answer changes: the reference is not vacuous
    with torch.no_grad():
        assert not torch.allclose(model(**prepared.inputs).logits[0, -1], reference, atol=1e-5)

    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}
    result = generate(model, tokenizer, pixels, Q, method, **settings)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), MaskedReference(model, layer, dropped_positions(model, ids, result.plan, grid)):
        expected = model.generate(**prepared.inputs, **settings)
    assert expected.shape[1] - prepared.inputs["input_ids"].shape[1] == 10
    assert torch.equal(result.sequences, expected)


def test_kept_counts_equal_the_budgets_and_the_cache_holds_only_kept_tokens(model, tokenizer, pixels):
    method = DyToK(FastV(0.25, layer=1), guide="self", layers=[2])
    prepared = prepare(model, tokenizer, pixels, Q, method)
    plan = prepared.plan
    budgets_before = list(plan.budgets)  # a self pass decides the split before the prefill
    per_frame = adapter_for(model).tokens_per_frame
    expected = vidtok.allocate_budgets(plan.frame_weights, round(0.25 * FRAMES * per_frame), per_frame)
    assert budgets_before == expected
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad(), prepared.apply():
        model(**prepared.inputs, cache=cache, use_cache=True)
    assert plan.budgets == budgets_before == [len(k) for k in plan.kept]
    assert sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept == 16
    prompt = prepared.inputs["input_ids"].shape[1]
    assert cache.layers[0].keys.shape[-2] == prompt
    for layer in range(1, LAYERS):
        assert cache.layers[layer].keys.shape[-2] == prompt - FRAMES * per_frame + 16


def test_static_fastv_is_a_global_top_k(model, tokenizer, pixels):
    plan = generate(model, tokenizer, pixels, Q, FastV(0.25, layer=1), max_new_tokens=2).plan
    assert sum(plan.budgets) == plan.total_budget == 16 and plan.guide is None and plan.layer == 1
    assert len(set(plan.budgets)) > 1  # not an even split: ranked over the whole video
    assert plan.vision_retention == 1.0 and 0 < plan.flops_retention < 1


def test_inline_prior_is_recorded(model, tokenizer, pixels):
    plan = generate(model, tokenizer, pixels, Q, DyToK(FastV(0.25, layer=2), guide="inline"), max_new_tokens=2).plan
    assert plan.guide == "inline" and plan.guide_layers == [0, 1]
    assert abs(sum(plan.frame_weights) - 1) < 1e-6
    assert plan.budgets == vidtok.allocate_budgets(plan.frame_weights, 16, 16)


def test_composed_reports_both_shares(model, tokenizer, pixels):
    method = DyToK(Composed(encoder=VisionZip(0.5), llm=FastV(0.5, layer=1)), guide="self")
    assert method.retention == 0.25
    plan = generate(model, tokenizer, pixels, Q, method, max_new_tokens=2).plan
    assert plan.method == "visionzip+fastv" and plan.vision_retention == 0.5 and plan.retention == 0.25
    assert sum(plan.vision_budgets) == 32 and sum(plan.budgets) == 16
    assert all(b <= v for b, v in zip(plan.budgets, plan.vision_budgets))
    # FastV kept a subset of what the encoder kept, so the plan's indices are frame-grid indices
    assert all(len(set(k)) == len(k) and all(0 <= i < 16 for i in k) for k in plan.kept)


@pytest.mark.parametrize("method", [FastV(1.0, layer=1), DyToK(FastV(1.0, layer=2), guide="inline")], ids=str)
def test_retention_one_reproduces_the_unmodified_model_exactly(model, tokenizer, pixels, method):
    reference = prepare(model, tokenizer, pixels, Q, None)
    with torch.no_grad():
        expected_logits = model(**reference.inputs).logits
        expected = model.generate(**reference.inputs, max_new_tokens=6, do_sample=False)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        assert torch.equal(model(**prepared.inputs).logits, expected_logits)
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, expected)
    assert result.plan.visual_tokens_kept == result.plan.visual_tokens_in


@pytest.mark.parametrize("name", ["static-K1", "inline-K2", "visionzip+fastv-self"])
def test_model_unchanged_after_calls_and_after_a_raise(model, tokenizer, pixels, name):
    before = snapshot(model)
    generate(model, tokenizer, pixels, Q, METHODS[name], max_new_tokens=3)
    assert_unchanged(model, before)
    prepared = prepare(model, tokenizer, pixels, Q, METHODS[name])
    with pytest.raises(RuntimeError, match="in one forward"), torch.no_grad(), prepared.apply():
        model(input_ids=prepared.inputs["input_ids"][:, :5])  # not the prepared prompt
    assert_unchanged(model, before)
    with pytest.raises(KeyboardInterrupt), prepared.apply():
        raise KeyboardInterrupt
    assert_unchanged(model, before)
    # and the model answers as an unmodified one afterwards
    full = prepare(model, tokenizer, pixels, Q, None)
    with torch.no_grad():
        logits = model(**full.inputs).logits
    fresh = snapshot(model)
    assert_unchanged(model, fresh)
    assert logits.shape[1] == full.inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    "method, message",
    [
        (lambda: FastV(0.25, layer=0), "layer must be a whole number >= 1"),
        (lambda: FastV(0.25, layer=1.5), "layer must be a whole number >= 1"),
        (lambda: FastV(0.0), "retention must be a number in"),
        (lambda: FastV(1.5), "retention must be a number in"),
        (lambda: DyToK(VisionZip(0.25), guide="inline"), "needs FastV"),
    ],
)
def test_bad_arguments_are_clear_errors(method, message):
    with pytest.raises(ValueError, match=message):
        method()


@pytest.mark.parametrize(
    "method, message",
    [
        (FastV(0.25, layer=LAYERS), r"outside 1\.\.2"),
        (DyToK(FastV(0.25, layer=1), guide="inline", layers=[1]), "inline layers must be below it"),
        (DyToK(FastV(0.25, layer=2), guide="inline", layers=[2]), "inline layers must be below it"),
        (DyToK(FastV(0.25, layer=2), guide="inline", layers=[5]), "outside the guide's 3 layers"),
    ],
    ids=str,
)
def test_bad_layers_are_refused_before_any_work(model, tokenizer, pixels, method, message):
    with pytest.raises(ValueError, match=message):
        prepare(model, tokenizer, pixels, Q, method)


def slow_keep(scores, lengths, total, budgets):
    """The rule, token by token: highest score first, the earlier token on ties."""
    flat = [(f, i, float(scores[sum(lengths[:f]) + i])) for f in range(len(lengths)) for i in range(lengths[f])]
    kept = [[] for _ in lengths]
    if budgets is None:
        for f, i, _ in sorted(flat, key=lambda t: (-t[2], sum(lengths[: t[0]]) + t[1]))[:total]:
            kept[f].append(i)
    else:
        for f in range(len(lengths)):
            mine = sorted([t for t in flat if t[0] == f], key=lambda t: (-t[2], t[1]))[: budgets[f]]
            kept[f] = [i for _, i, _ in mine]
    return [sorted(k) for k in kept]


@pytest.mark.parametrize("seed", range(6))
def test_fastv_keep_matches_the_slow_rule(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (5,), generator=g).tolist()
    n = sum(lengths)
    scores = torch.randint(0, 4, (n,), generator=g).float()  # many ties
    total = int(torch.randint(0, n + 1, (1,), generator=g))
    assert fastv_keep(scores, lengths, total) == slow_keep(scores, lengths, total, None)
    budgets = [int(torch.randint(0, k + 1, (1,), generator=g)) for k in lengths]
    assert fastv_keep(scores, lengths, sum(budgets), budgets) == slow_keep(scores, lengths, None, budgets)


def test_flops_helpers_invert_each_other(model):
    text = model.config.get_text_config()
    layers = text.num_hidden_layers
    # a vision-side cut to 300 of 1000 visual tokens: every layer at 50 + 300
    cost = flops.fastv_prefill_flops(text, 1050, 350, 0)
    assert abs(flops.equal_flops_retention(text, 50, 1000, cost) - 0.3) < 1e-9
    # FastV at layer 1 keeping k tokens costs more than a vision-side cut to k, less than none at all
    k = flops.fastv_keep_for_flops(text, 50, 1000, 1, 0.5)
    full = flops.fastv_prefill_flops(text, 1050, 1050, layers)
    assert flops.fastv_prefill_flops(text, 1050, 50 + k, 1) <= 0.5 * full < flops.fastv_prefill_flops(text, 1050, 51 + k, 1)
    with pytest.raises(ValueError, match="raise the share or use an earlier --layer"):
        flops.fastv_keep_for_flops(text, 50, 1000, 2, 0.5)
