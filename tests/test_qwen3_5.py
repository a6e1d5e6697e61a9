"""Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's timestamped video layout in front of a hybrid LLM
(linear-attention layers between attention layers). Tiny models built in code; references
written out here."""

import json

import numpy as np
import pytest
import torch

from vidtok import DyToK, FastV, Full, Random, Uniform, VisionZip, adapter_for, generate, prepare
from vidtok.harness.analysis import calibrate
from vidtok.testbed.toy import build_qwen3_toy_model, build_tokenizer

from helpers import assert_unchanged, snapshot
from test_qwen3_vl import PER_GROUP, Q, reference_inputs

LINEAR, ATTENTION = [0, 2], [1, 3]  # the toy's layer_types alternate, linear first


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("qwen3_5")


@pytest.fixture(params=["qwen3_5", "qwen3_5_moe"])
def model(request):
    model = build_qwen3_toy_model(request.param, seed=0)
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture
def pixels():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_toy_is_hybrid(model):
    types = model.config.text_config.layer_types
    assert [i for i, t in enumerate(types) if t == "linear_attention"] == LINEAR
    assert not hasattr(model.model.language_model.layers[0], "self_attn")  # no attention weights to read there
    assert adapter_for(model).attention_layers == ATTENTION


def test_full_inputs_equal_the_independent_construction(model, tokenizer, pixels):
    reference = reference_inputs(model, tokenizer, pixels)
    prepared = prepare(model, tokenizer, pixels, Q, None)
    assert torch.equal(prepared.inputs["input_ids"], reference["input_ids"])
    assert torch.equal(prepared.inputs["position_ids"], reference["position_ids"])
    ids = reference["input_ids"]
    theirs, _ = model.model.get_rope_index(ids, (ids == model.config.video_token_id).int() * 2, video_grid_thw=reference["video_grid_thw"])
    assert torch.equal(theirs, reference["position_ids"])


METHODS = [None, Full(), Uniform(1.0), Random(1.0), VisionZip(1.0), FastV(1.0, layer=2), DyToK(VisionZip(1.0), guide="self"),
           DyToK(FastV(1.0, layer=2), guide="self"), DyToK(FastV(1.0, layer=2), guide="inline")]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_retention_one_reproduces_the_unmodified_model_exactly(model, tokenizer, pixels, method):
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected_logits = model(**reference).logits
        expected = model.generate(**reference, max_new_tokens=5, do_sample=False)
    before = snapshot(model)
    prepared = prepare(model, tokenizer, pixels, Q, method)
    with torch.no_grad(), prepared.apply():
        assert torch.equal(model(**prepared.inputs).logits, expected_logits)
    assert torch.equal(generate(model, tokenizer, pixels, Q, method, max_new_tokens=5, do_sample=False).sequences, expected)
    assert_unchanged(model, before)
    assert model.model.rope_deltas is None


@pytest.mark.parametrize("method", [Uniform(0.3), VisionZip(0.25), DyToK(VisionZip(0.25)), FastV(0.25, layer=2),
                                    DyToK(FastV(0.25, layer=2), guide="inline")], ids=str)
def test_kept_counts_follow_the_budgets_and_guides_read_attention_layers(model, tokenizer, pixels, method):
    before = snapshot(model)
    plan = generate(model, tokenizer, pixels, Q, method, max_new_tokens=3).plan
    assert plan.unit == "temporal_group" and [len(k) for k in plan.kept] == plan.budgets
    assert sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept == round(method.retention * 3 * PER_GROUP)
    if plan.guide is not None:  # the default guide layers: the last third of the attention layers (self), those below K (inline)
        assert plan.guide_layers == ([3] if plan.guide == "self" else [1])
    assert_unchanged(model, before)


def test_linear_attention_layers_are_refused_where_attention_is_read(model, tokenizer, pixels):
    with pytest.raises(ValueError, match=r"guide layer\(s\) \[0, 2\] have no softmax attention.*attention layers \[1, 3\]"):
        prepare(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide="self", layers="0-2"))
    with pytest.raises(ValueError, match=r"at layer 2, a linear-attention layer.*just after an attention layer: \[2\]"):
        prepare(model, tokenizer, pixels, Q, FastV(0.25, layer=3))
    with pytest.raises(ValueError, match=r"guide layer\(s\) \[0\]"):
        prepare(model, tokenizer, pixels, Q, DyToK(FastV(0.25, layer=2), guide="inline", layers=[0]))


def cache_free_reference(model, ids, video, positions, keep, layer):
    """FastV's definition on a hybrid LLM, computed with no cache and no vidtok code: layers below
    `layer` on every token; from `layer` on, every layer (attention and linear) on the `keep`
    positions only, in order, at their full-layout positions. Masking dropped keys is no
    reference here: a linear layer's recurrence and causal convolution still run through a masked
    token (its decay, its convolution neighbours), so only removing the tokens defines the method.
    Returns the last position's logits."""
    lm = model.model.language_model
    hidden = lm.embed_tokens(ids)
    hidden[ids == model.config.video_token_id] = video
    cos, sin = lm.rotary_emb(hidden, positions)
    for i, decoder_layer in enumerate(lm.layers):
        if i == layer:
            hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
        length = hidden.shape[1]
        causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        mask = causal if model.config.text_config.layer_types[i] == "full_attention" else None
        hidden = decoder_layer(hidden, position_embeddings=(cos, sin), attention_mask=mask, position_ids=None, cache=None)
    return model.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize("guide", [None, "self", "inline"])
def test_fastv_before_linear_layers_decodes_as_the_cache_free_reference(model, tokenizer, pixels, guide):
    """Prefill and every cached decoding step (linear layers continuing their recurrent and
    convolution state from the kept tokens) equal the cache-free recomputation."""
    method = FastV(0.25, layer=2) if guide is None else DyToK(FastV(0.25, layer=2), guide=guide)
    steps = 6
    result = generate(model, tokenizer, pixels, Q, method, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        video = model.model.get_video_features(reference["pixel_values_videos"], video_grid_thw=reference["video_grid_thw"]).pooler_output[0]
    ids, positions = reference["input_ids"], reference["position_ids"]
    pads = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
    kept_pads = pads[[g * PER_GROUP + i for g, k in enumerate(result.plan.kept) for i in k]]
    prompt_keep = [p for p in range(ids.shape[1]) if p not in set(pads.tolist()) or p in set(kept_pads.tolist())]
    assert len(prompt_keep) == ids.shape[1] - len(pads) + result.plan.total_budget
    sequence = ids
    for step in range(steps):
        keep = torch.tensor(prompt_keep + list(range(ids.shape[1], sequence.shape[1])))
        with torch.no_grad():
            logits = cache_free_reference(model, sequence, video, positions, keep, 2)
        if step == 0:
            prepared = prepare(model, tokenizer, pixels, Q, method)
            with torch.no_grad(), prepared.apply():
                assert torch.allclose(model(**prepared.inputs).logits[0, -1], logits, atol=1e-5, rtol=0)
        token = logits.argmax().view(1, 1)
        sequence = torch.cat([sequence, token], dim=1)
        positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
    assert torch.equal(result.sequences, sequence)


def test_calibration_scores_only_attention_layers(model, tokenizer, tmp_path):
    from vidtok.testbed.synth import read_split, write_split

    records = read_split(write_split(tmp_path / "calib", seed=7, count=4, frames=6))
    result = calibrate(model, tokenizer, records)
    assert [row["layer"] for row in result["prior"]["layers"]] == ATTENTION
    assert set(result["guide_layers"]) <= set(ATTENTION) and result["guide_layers"]
    assert set(result["range_scores"]) == {"1-1", "1-3", "3-3"}


def test_cli_runs_a_saved_checkpoint(model, tokenizer, tmp_path, capsys):
    from vidtok.cli import main
    from vidtok.video import write_video

    folder = tmp_path / "qwen3_5"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 6 * 64 * 64, "longest_edge": 6 * 64 * 64}}))
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8))
    for args in (["--method", "visionzip", "--guide", "self"], ["--method", "fastv", "--guide", "inline", "--layer", "2"]):
        assert main(["run", str(clip), Q, "--model", str(folder), "--json", "--retention", "0.25", "--frames", "6", *args]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["unit"] == "temporal_group" and record["frames"] == 3 and record["tokens_per_frame"] == PER_GROUP
        assert sum(record["budgets"]) == record["total_budget"] == 12
    assert main(["run", str(clip), Q, "--model", str(folder), "--json", "--method", "fastv", "--layer", "3", "--frames", "6"]) != 0
    assert "linear-attention layer" in capsys.readouterr().err


def test_a_dense_and_an_moe_qwen3_5_guide_each_other(model, tokenizer, pixels):
    other = build_qwen3_toy_model("qwen3_5" if model.config.model_type == "qwen3_5_moe" else "qwen3_5_moe", seed=3)
    reference = reference_inputs(model, tokenizer, pixels)
    with torch.no_grad():
        expected = model.generate(**reference, max_new_tokens=3, do_sample=False)
    assert torch.equal(generate(model, tokenizer, pixels, Q, DyToK(VisionZip(1.0), guide=other), max_new_tokens=3).sequences, expected)
    plan = generate(model, tokenizer, pixels, Q, DyToK(VisionZip(0.25), guide=other), max_new_tokens=1).plan
    assert plan.guide == "assistant" and plan.guide_layers == [3] and sum(plan.budgets) == 12
