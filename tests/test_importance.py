import copy

import pytest
import torch

from vidtok import adapter_for, frame_weights, last_token_attention, parse_layers
from vidtok.testbed.toy import build_toy_model

from helpers import FRAMES, assert_unchanged, snapshot

QUESTION = "what shape is red ?"


def reference_weights(model, tokenizer, pixels, layers):
    """Slow reference: an eager copy of the model, full attention matrices, renormalised over the visual keys."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    adapter = adapter_for(eager)
    ids = adapter.input_ids(tokenizer, QUESTION, FRAMES * adapter.tokens_per_frame + 1)
    out = eager(input_ids=ids, pixel_values_videos=pixels[None], output_attentions=True)
    visual = (ids[0] == adapter.video_token_id).nonzero().squeeze(1)[:-1]
    per_layer = []
    for layer in layers:
        row = out.attentions[layer][0, :, -1, :].double()  # [H, S]: softmax over every key
        vis = row[:, visual]
        vis = vis / vis.sum(-1, keepdim=True)  # softmax restricted to the visual keys
        per_layer.append(vis.mean(0).reshape(FRAMES, -1).mean(-1))
    weights = torch.stack(per_layer).mean(0)
    return weights / weights.sum()


@pytest.mark.parametrize("layers", [[0], [2], [0, 1, 2], [1, 2]])
def test_capture_matches_eager_reference(model, tokenizer, pixels, layers):
    adapter = adapter_for(model)
    encoded = adapter.encode_video(pixels)
    features, newline, _ = encoded.features, encoded.newline, encoded.signals
    ids = adapter.input_ids(tokenizer, QUESTION, FRAMES * adapter.tokens_per_frame + 1)
    token_weights = adapter.token_attention(ids, torch.cat([features.flatten(0, 1), newline]), layers)
    ours = frame_weights(token_weights, FRAMES)
    reference = reference_weights(model, tokenizer, pixels, layers)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, torch.full_like(ours, 1 / FRAMES), atol=1e-4)  # the test can tell frames apart


def test_guide_pass_stops_at_deepest_layer_and_skips_lm_head(model, tokenizer, pixels):
    adapter = adapter_for(model)
    encoded = adapter.encode_video(pixels)
    features, newline, _ = encoded.features, encoded.newline, encoded.signals
    ids = adapter.input_ids(tokenizer, QUESTION, FRAMES * adapter.tokens_per_frame + 1)
    ran = []
    layers = model.model.language_model.layers
    handles = [layer.mlp.register_forward_hook(lambda *a, i=i: ran.append(("mlp", i))) for i, layer in enumerate(layers)]
    handles += [layer.self_attn.register_forward_pre_hook(lambda *a, i=i: ran.append(("attn", i))) for i, layer in enumerate(layers)]
    handles.append(model.lm_head.register_forward_hook(lambda *a: ran.append(("lm_head",))))
    try:
        adapter.token_attention(ids, torch.cat([features.flatten(0, 1), newline]), [1])
    finally:
        for h in handles:
            h.remove()
    # layer 0 runs whole; layer 1 stops inside its attention; layer 2 and the LM head never run
    assert ran == [("attn", 0), ("mlp", 0), ("attn", 1)]


def test_capture_leaves_model_unchanged(model, tokenizer, pixels):
    before = snapshot(model)
    adapter = adapter_for(model)
    encoded = adapter.encode_video(pixels, signals=True)
    features, newline, _ = encoded.features, encoded.newline, encoded.signals
    ids = adapter.input_ids(tokenizer, QUESTION, FRAMES * adapter.tokens_per_frame + 1)
    adapter.token_attention(ids, torch.cat([features.flatten(0, 1), newline]), [0, 2])
    assert_unchanged(model, before)


def test_last_token_attention_groups_kv_heads():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    visual = torch.tensor([1, 2, 3])
    out = last_token_attention(query, key, visual, 8**-0.5)
    expected = []
    for h in range(4):
        scores = key[0, h // 2, visual] @ query[0, h, -1] * 8**-0.5
        expected.append(scores.softmax(0))
    torch.testing.assert_close(out[0], torch.stack(expected).mean(0))
    assert out.sum().item() == pytest.approx(1.0)


def test_default_layers_are_the_last_third():
    assert parse_layers(None, 24) == list(range(16, 24))
    assert parse_layers(None, 3) == [2]
    assert parse_layers("1-2", 3) == [1, 2]
    assert parse_layers([-1, 0], 3) == [0, 2]


@pytest.mark.parametrize("layers", ["3", [5], "0-3", "a-b", [], "16.23"])
def test_layers_outside_the_guide_are_errors(layers):
    with pytest.raises(ValueError, match="layer"):
        parse_layers(layers, 3)


def test_importance_from_assistant_uses_its_own_weights(tokenizer, pixels):
    main, other = build_toy_model("test", seed=0), build_toy_model("test", seed=1)
    a, b = adapter_for(main), adapter_for(other)
    ids = a.input_ids(tokenizer, QUESTION, FRAMES * a.tokens_per_frame + 1)
    encoded = a.encode_video(pixels)
    fa, na, _ = encoded.features, encoded.newline, encoded.signals
    encoded = b.encode_video(pixels)
    fb, nb, _ = encoded.features, encoded.newline, encoded.signals
    wa = a.token_attention(ids, torch.cat([fa.flatten(0, 1), na]), [2])
    wb = b.token_attention(ids, torch.cat([fb.flatten(0, 1), nb]), [2])
    assert not torch.allclose(wa, wb)
