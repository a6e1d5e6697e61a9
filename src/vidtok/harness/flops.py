"""Analytic FLOPs of a prefill, from the configs (multiply-adds count as 2 FLOPs).

Counted: every matrix product (projections, MLPs, QK^T and AV over the full S x S matrix, as
eager and sdpa's math kernel compute it; a causal kernel that skips the masked half does about
half the attention FLOPs), the patch embedding, the projector and the LM head on the one
position a prefill needs. Not counted: norms, activations, softmax, RoPE and pooling
(elementwise, < 1% here), and the SigLIP pooling head (LLaVA-OneVision checkpoints disable it).

    layer(S)   = 2 S h (2 H d + 2 Hkv d) + 2 S h f m + 4 S^2 H d       (m = 3 gated MLP, 2 plain)
    vision     = F [2 N 3 p^2 hv + L_v layer_v(N) + 2 N (hv ht + ht^2)] (N patches per frame)
    llm(S)     = L layer(S) + 2 ht V
    guide(S')  = D layer(S') + 2 S' h (H d + 2 Hkv d)                   (stops inside layer D's attention)
"""

from __future__ import annotations


def layer_flops(seq: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, mlp_mats: int) -> int:
    projections = 2 * seq * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    mlp = 2 * seq * hidden * ffn * mlp_mats
    attention = 2 * 2 * seq * seq * heads * head_dim
    return projections + mlp + attention


def _text(config):
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return t, head_dim


def vision_flops(config, frames: int) -> int:
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    layer = config.vision_feature_layer if isinstance(config.vision_feature_layer, int) else max(config.vision_feature_layer)
    depth = layer % (v.num_hidden_layers + 1)  # hidden_states[i] needs i encoder layers
    per_frame = 2 * patches * 3 * v.patch_size**2 * v.hidden_size
    per_frame += depth * layer_flops(patches, v.hidden_size, v.num_attention_heads, v.num_attention_heads,
                                     v.hidden_size // v.num_attention_heads, v.intermediate_size, 2)
    return frames * per_frame + frames * projector_flops(config, patches)


def projector_flops(config, tokens: int) -> int:
    hv, ht = config.vision_config.hidden_size, config.text_config.hidden_size
    return 2 * tokens * (hv * ht + ht * ht)


def llm_prefill_flops(config, seq: int, lm_head_positions: int = 1) -> int:
    t, head_dim = _text(config)
    layer = layer_flops(seq, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, head_dim, t.intermediate_size, 3)
    return t.num_hidden_layers * layer + 2 * lm_head_positions * t.hidden_size * t.vocab_size


def guide_flops(config, seq: int, deepest: int) -> int:
    """The guide pass: layers 0..deepest-1 whole, then q/k/v of layer `deepest` (its attention is one row)."""
    t, head_dim = _text(config)
    layer = layer_flops(seq, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, head_dim, t.intermediate_size, 3)
    qkv = 2 * seq * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * head_dim
    return deepest * layer + qkv


def visionzip_signal_flops(config, frames: int) -> int:
    """Attention received in the feature layer, recomputed from its query/key: QK^T per frame."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    return frames * 2 * patches * patches * v.hidden_size
