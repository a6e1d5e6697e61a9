"""FastV inside the LLM: tokens physically dropped from layer K on, checked against an independent
reference that keeps every token and masks the dropped keys in layers >= K."""

import json
import re

import pytest
import torch
from transformers import DynamicCache

import vidtok
from vidtok import Composed, DyToK, FastV, VisionZip, adapter_for, generate, prepare
from vidtok import flops
from vidtok.compressors.fastv import fastv_keep
from vidtok.models.base import cache_keyword

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
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name before transformers 5.24
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
        model(**prepared.inputs, **{cache_keyword(model): cache}, use_cache=True)
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
    # and the model answers as an unmodified one afterwards: every position has its logits again
    full = prepare(model, tokenizer, pixels, Q, None)
    with torch.no_grad():
        logits = model(**full.inputs).logits
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


# --- CLI, eval and bench --------------------------------------------------------------------

def run_json(capsys, *args):
    from vidtok.cli import main

    assert main(["run", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_runs_fastv_static_inline_and_composed(capsys):
    static = run_json(capsys, "--method", "fastv", "--guide", "none")
    assert static["method"] == "fastv" and static["layer"] == 2 and static["guide"] is None
    assert sum(static["budgets"]) == static["total_budget"] == static["visual_tokens_kept"] == 64
    assert 0.25 < static["flops_retention"] < 1  # layers 0..1 still see every token
    inline = run_json(capsys, "--method", "fastv", "--guide", "inline", "--layer", "3")
    assert inline["guide"] == "inline" and inline["layer"] == 3 and inline["guide_layers"] == [1]  # calibrated, below 3
    sample = json.loads((__import__("vidtok.testbed.toy").testbed.toy.ASSETS / "sample" / "sample.json").read_text())
    assert inline["budgets"][sample["needle_frame"]] == 16  # the prior finds the needle frame
    composed = run_json(capsys, "--method", "visionzip+fastv", "--vision-retention", "0.5", "--retention", "0.125")
    assert composed["vision_retention"] == 0.5 and sum(composed["vision_budgets"]) == 128 and sum(composed["budgets"]) == 32


def test_cli_match_flops_picks_the_largest_keep_within_the_share(capsys):
    from vidtok.testbed.toy import load_default

    record = run_json(capsys, "--method", "fastv", "--guide", "none", "--match-flops", "0.6", "--layer", "1")
    model = load_default()[0]
    text = model.config.get_text_config()
    visual, kept = record["visual_tokens_in"], record["visual_tokens_kept"]
    tokenizer = load_default()[1]
    prompt = adapter_for(model).input_ids(tokenizer, record["question"], visual + 1).shape[1]
    full = flops.fastv_prefill_flops(text, prompt, prompt, text.num_hidden_layers)
    assert flops.fastv_prefill_flops(text, prompt, prompt - visual + kept, 1) <= 0.6 * full
    assert flops.fastv_prefill_flops(text, prompt, prompt - visual + kept + 1, 1) > 0.6 * full


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "visionzip", "--match-flops", "0.5"], "which applies to fastv, not to visionzip"),
        (["--method", "fastv", "--match-flops", "0.01", "--layer", "3"], "raise the share or use an earlier --layer"),
        (["--method", "fastv", "--layer", "4"], r"outside 1\.\.3"),
        (["--method", "visionzip", "--guide", "inline"], "needs --method fastv"),
        (["--method", "fastv", "--vision-retention", "0.5"], "which applies to ENCODER\\+fastv"),
        (["--method", "visionzip+fastv"], "needs --vision-retention"),
        (["--method", "fastv", "--retention", "1.5"], "retention must be a number in"),
    ],
)
def test_cli_bad_fastv_input_is_one_clear_line(capsys, args, message):
    from vidtok.cli import main

    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_runs_fastv_with_every_prior(tmp_path):
    from vidtok.harness.evaluate import EvalConfig, evaluate
    from vidtok.testbed.synth import write_split
    from vidtok.testbed.toy import load_default

    model, tokenizer, assistant, _ = load_default()
    write_split(tmp_path / "split", seed=5, count=3)
    config = EvalConfig(split=str(tmp_path / "split"), out=str(tmp_path / "out"), methods=["fastv", "visionzip"],
                        guides=["none", "inline", "assistant"], retentions=[0.125])
    summaries = {(s["method"], s["guide"]): s for s in evaluate(config, model, tokenizer, assistant, progress=False)}
    assert ("visionzip", "inline") not in summaries  # the inline prior exists only inside FastV
    for key in [("fastv", "none"), ("fastv", "inline"), ("fastv", "assistant")]:
        assert summaries[key]["samples"] == 3 and summaries[key]["mean_kept_tokens"] == 32
    assert summaries[("fastv", "inline")]["guide_layers"] == [1]


def test_bench_measures_fastv_rows(tmp_path):
    from vidtok.harness.bench import BenchConfig, run_bench

    config = BenchConfig(name="t", main={"toy": "test"}, guide={"toy": "test", "share_vision": True}, frames=4,
                         runs=[{"method": "fastv", "guide": "none", "retentions": [0.25], "layer": 1},
                               {"method": "fastv", "guide": "inline", "retentions": [0.25]},
                               {"method": "fastv", "guide": "assistant", "retentions": [0.25]}],
                         repeats=1, warmup=0, decode_tokens=2)
    rows = run_bench(config, tmp_path, log=lambda *a: None)["rows"]
    full, static, inline, assistant = rows
    assert static["fastv_layer"] == 1 and inline["fastv_layer"] == 2 and static["visual_tokens_kept"] == 16
    assert inline["prefill_flops"]["guide"] == 0 < assistant["prefill_flops"]["guide"]  # the inline prior costs no pass
    assert static["prefill_flops"]["llm"] < inline["prefill_flops"]["llm"] < full["prefill_flops"]["llm"]  # K=1 saves more than K=2
    assert all(r["llm_side_speedup"] > 0 for r in rows)


def test_a_cache_that_places_tokens_by_position_is_refused(model, tokenizer, pixels):
    from transformers import StaticCache

    before = snapshot(model)
    prepared = prepare(model, tokenizer, pixels, Q, FastV(0.25, layer=1))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=256)
    with pytest.raises(RuntimeError, match="needs transformers' DynamicCache"), torch.no_grad(), prepared.apply():
        model(**prepared.inputs, **{cache_keyword(model): cache}, use_cache=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("guide", ["self", "inline"])
def test_dytok_cap_and_floor_shape_fastvs_split(model, tokenizer, pixels, guide):
    plan = generate(model, tokenizer, pixels, Q, DyToK(FastV(0.25, layer=2), guide=guide, cap=6, floor=2), max_new_tokens=2).plan
    assert sum(plan.budgets) == 16 and all(2 <= b <= 6 for b in plan.budgets)
    assert plan.vision_retention == 1.0  # nothing is dropped before the LLM


def eager_attentions(model, inputs):
    """Every layer's full attention matrix from an eager forward (independent of vidtok's seam)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_keeps_the_tokens_the_last_query_attends_most(model, tokenizer, pixels, layer):
    """The choice itself, against eager attention: the last row at layer K-1, mean over heads, global top-k."""
    result = generate(model, tokenizer, pixels, Q, FastV(0.25, layer=layer), max_new_tokens=1)
    full = prepare(model, tokenizer, pixels, Q, None)
    ids = full.inputs["input_ids"][0]
    visual = (ids == model.config.video_token_id).nonzero().squeeze(1)[:-1]
    scores = eager_attentions(model, full.inputs)[layer - 1][0, :, -1, visual].mean(0)
    top = set(torch.sort(scores, descending=True, stable=True).indices[:16].tolist())
    assert {f * 16 + i for f, kept in enumerate(result.plan.kept) for i in kept} == top


def test_inline_weights_are_the_attention_below_layer_k(model, tokenizer, pixels):
    """Inline frame weights from eager attention: the last row at each inline layer, renormalised over
    the visual keys (the softmax over them alone), mean over heads, per frame, over layers."""
    plan = generate(model, tokenizer, pixels, Q, DyToK(FastV(0.25, layer=2), guide="inline", layers=[0, 1]), max_new_tokens=1).plan
    full = prepare(model, tokenizer, pixels, Q, None)
    ids = full.inputs["input_ids"][0]
    visual = (ids == model.config.video_token_id).nonzero().squeeze(1)[:-1]
    attentions = eager_attentions(model, full.inputs)
    per_layer = []
    for layer in (0, 1):
        rows = attentions[layer][0, :, -1, visual]
        per_layer.append((rows / rows.sum(-1, keepdim=True)).mean(0).reshape(FRAMES, 16).mean(1))
    expected = torch.stack(per_layer).mean(0)
    expected = expected / expected.sum()
    assert torch.allclose(torch.tensor(plan.frame_weights), expected, atol=1e-5)


def test_dytok_retention_sets_what_fastv_keeps(model, tokenizer, pixels):
    plan = generate(model, tokenizer, pixels, Q, DyToK(FastV(0.25, layer=1), retention=0.125, guide="inline"), max_new_tokens=1).plan
    assert plan.retention == 0.125 and plan.total_budget == sum(plan.budgets) == 8


def test_fastv_misuse_is_refused_before_any_work(model, tokenizer, pixels, monkeypatch):
    import vidtok.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_guide_pass", lambda *a, **k: pytest.fail("the guide ran"))
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, tokenizer, pixels, Q, FastV(0.25, layer=1), use_cache=False)
    for method in (DyToK(FastV(0.25, layer=1), guide="inline", cap=2), DyToK(FastV(0.25, layer=1), guide="self", floor=5)):
        with pytest.raises(ValueError, match="cap|floor"):
            prepare(model, tokenizer, pixels, Q, method)
    with pytest.raises(ValueError, match="guide_pool"):
        DyToK(FastV(0.25), guide="inline", guide_pool=2)
    with pytest.raises(ValueError, match="guide_stride"):
        DyToK(FastV(0.25), guide="inline", guide_stride=2)
