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
    fastv      = K layer(S) + (L - K) layer(S_kept) + 2 ht V              (tokens dropped from layer K on)

Pure functions of the configs: the pipeline uses the FastV terms for a plan's `flops_retention`.
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


def text_layer_flops(text_config, seq: float) -> float:
    """One decoder layer of the LLM at sequence length `seq` (a float is allowed: the equal-FLOPs solve)."""
    t = text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return layer_flops(seq, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, head_dim, t.intermediate_size, 3)


def llm_prefill_flops(config, seq: int, lm_head_positions: int = 1) -> int:
    t = config.text_config
    return t.num_hidden_layers * text_layer_flops(t, seq) + 2 * lm_head_positions * t.hidden_size * t.vocab_size


def fastv_prefill_flops(text_config, seq: int, kept_seq: int, layer: int) -> float:
    """The LLM prefill with layers 0..layer-1 at `seq` tokens and the rest at `kept_seq` (LM head excluded)."""
    return layer * text_layer_flops(text_config, seq) + (text_config.num_hidden_layers - layer) * text_layer_flops(text_config, kept_seq)


def equal_flops_retention(text_config, text_tokens: int, visual_tokens: int, flops: float) -> float:
    """The retention r a vision-side method would need for an LLM prefill of `flops` (LM head excluded):
    every layer at text_tokens + r * visual_tokens. The cost grows with r, so bisection finds it."""
    full = text_config.num_hidden_layers * text_layer_flops(text_config, text_tokens + visual_tokens)
    if flops >= full:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if text_config.num_hidden_layers * text_layer_flops(text_config, text_tokens + mid * visual_tokens) < flops:
            low = mid
        else:
            high = mid
    return high


def fastv_keep_for_flops(text_config, text_tokens: int, visual_tokens: int, layer: int, share: float) -> int:
    """The most visual tokens FastV can keep from `layer` on so that its prefill costs at most `share` of
    the uncompressed prefill (LM head excluded). Raises when even keeping none costs more."""
    if not 0 < share <= 1:
        raise ValueError(f"a FLOPs share must be in (0, 1], got {share!r}")
    seq = text_tokens + visual_tokens
    budget = share * fastv_prefill_flops(text_config, seq, seq, text_config.num_hidden_layers)
    floor = fastv_prefill_flops(text_config, seq, text_tokens, layer)
    if floor > budget:
        raise ValueError(
            f"a FLOPs share of {share:g} is below what FastV costs with no visual token kept after layer {layer} "
            f"({floor / budget * share:.3f} of the full prefill); raise the share or use an earlier --layer"
        )
    low, high = 0, visual_tokens  # largest kept count within budget
    while low < high:
        mid = (low + high + 1) // 2
        if fastv_prefill_flops(text_config, seq, text_tokens + mid, layer) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def guide_flops(config, seq: int, deepest: int) -> int:
    """The guide pass: layers 0..deepest-1 whole, then q/k/v of layer `deepest` (its attention is one row)."""
    t, head_dim = _text(config)
    layer = text_layer_flops(t, seq)
    qkv = 2 * seq * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * head_dim
    return deepest * layer + qkv


def visionzip_signal_flops(config, frames: int) -> int:
    """Attention received in the feature layer, recomputed from its query/key: QK^T per frame."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    return frames * 2 * patches * patches * v.hidden_size


def qwen_vision_flops(config, grid: tuple[int, int, int]) -> int:
    """Qwen2.5-VL's vision encoder on a (groups, h, w) patch grid: patch embedding, every block
    (qkv, proj, gated MLP; attention within each window, or within each group in the
    full-attention blocks) and the 2x2 merger into the LLM's width."""
    from transformers.vision_utils import get_vision_window_index

    import torch

    v = config.vision_config
    groups, h, w = grid
    n = groups * h * w
    hv, m = v.hidden_size, v.spatial_merge_size
    _, cu = get_vision_window_index(torch.tensor([[groups, h, w]]), m, v.window_size, v.patch_size)
    windows = (cu[1:] - cu[:-1]).tolist()
    dense = 2 * n * hv * 4 * hv + 2 * n * hv * v.intermediate_size * 3
    total = 2 * n * 3 * v.temporal_patch_size * v.patch_size**2 * hv
    for block in range(v.depth):
        spans = [h * w] * groups if block in v.fullatt_block_indexes else windows
        total += dense + sum(4 * s * s * hv for s in spans)
    merged = n // m**2
    return total + 2 * merged * (hv * m**2) * (hv * m**2 + v.out_hidden_size)


def qwen_visionzip_signal_flops(config, grid: tuple[int, int, int]) -> int:
    """Attention received in the ranking block, recomputed from its query/key: QK^T per group."""
    groups, h, w = grid
    return groups * 2 * (h * w) ** 2 * config.vision_config.hidden_size
