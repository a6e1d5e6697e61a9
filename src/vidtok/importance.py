"""Guide attention -> per-frame importance (SPEC section 1). Pure tensor functions."""

from __future__ import annotations

import numbers
import re

import torch


def last_token_attention(query: torch.Tensor, key: torch.Tensor, visual_index: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of the last query position to the visual keys only, averaged over heads.

    query [B, H, S, d], key [B, Hkv, S, d] (post-RoPE), visual_index [N] positions of the visual
    tokens. The softmax runs over the visual keys only, so text tokens and the trailing newline
    do not dilute the weights. Only one query row is used: nothing of size S x S is built.
    Returns [B, N] in float32.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key heads")
    q = query[:, :, -1, :].float()
    k = key[:, :, visual_index, :].float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q, k) * scaling
    return scores.softmax(dim=-1).mean(dim=1)


def last_token_attention_all_keys(query: torch.Tensor, key: torch.Tensor, visual_index: torch.Tensor, scaling: float) -> torch.Tensor:
    """FastV's ranking: the last query's attention with the softmax over **all** keys (the last
    position sees every earlier one), read at the visual positions, averaged over heads: [B, N]."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key heads")
    q = query[:, :, -1, :].float()
    k = key.float().repeat_interleave(heads // kv_heads, dim=1)
    probs = (torch.einsum("bhd,bhnd->bhn", q, k) * scaling).softmax(dim=-1)
    return probs[:, :, visual_index].mean(dim=1)


def frame_weights(token_weights: torch.Tensor, frames) -> torch.Tensor:
    """[L, N] per-layer token weights -> [F] frame weights summing to 1.

    `frames`: the number of frames (N = F * T, equal frames) or each frame's token count (frames an
    earlier stage left unequal). Mean over the tokens of a frame (a frame with none weighs 0), then
    over layers, then normalised.
    """
    lengths = [token_weights.shape[-1] // frames] * frames if isinstance(frames, int) else list(frames)
    if token_weights.ndim != 2 or (isinstance(frames, int) and token_weights.shape[1] % frames) or sum(lengths) != token_weights.shape[1]:
        raise ValueError(f"expected [layers, {frames} * tokens_per_frame] weights, got {tuple(token_weights.shape)}")
    if isinstance(frames, int):
        per_frame = token_weights.float().reshape(token_weights.shape[0], frames, -1).mean(dim=2).mean(dim=0)
    else:
        chunks = token_weights.float().split(lengths, dim=1)
        per_frame = torch.stack([c.mean(dim=1).mean(dim=0) if c.shape[1] else c.new_zeros(()) for c in chunks])
    return per_frame / per_frame.sum()


def spread_weights(seen: torch.Tensor, stride: int, units: int) -> torch.Tensor:
    """Weights of units 0, stride, 2*stride, ... -> all `units` units: linear between two seen units,
    the last seen one's after it; normalised to sum 1 (a guide that saw every stride-th frame)."""
    expected = -(-units // stride)
    if seen.ndim != 1 or seen.shape[0] != expected:
        raise ValueError(f"expected {expected} weights for every {stride}-th of {units} units, got {tuple(seen.shape)}")
    position = torch.arange(units, dtype=torch.float32) / stride
    left = position.floor().long().clamp(max=expected - 1)
    right = (left + 1).clamp(max=expected - 1)
    share = position - left
    spread = seen.float()[left] * (1 - share) + seen.float()[right] * share
    return spread / spread.sum()


def parse_layers(layers, num_layers: int) -> list[int]:
    """Guide layers from a list/range of ints, an int, or a string "A-B" / "A,B,C".

    None means the last third of the depth (16..23 of 24, the reference setting). Negative
    ints count from the end. Out-of-range layers are an error, never silently dropped.
    """
    if layers is None:
        start = num_layers - max(1, num_layers // 3)
        return list(range(start, num_layers))
    if isinstance(layers, str):
        text = layers.replace(" ", "")
        span = re.fullmatch(r"(\d+)-(\d+)", text)
        try:
            chosen = list(range(int(span[1]), int(span[2]) + 1)) if span else [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"cannot read layers {layers!r}: write a range 'A-B' (inclusive) or a list 'A,B,C'") from None
    elif isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        chosen = [int(layers)]
    else:
        try:
            items = list(layers)
        except TypeError:
            raise ValueError(f"layers must be ints, a range or 'A-B', got {layers!r}") from None
        # a float such as 20.5 (or the reference code's 16.23) is never truncated into a layer
        odd = [x for x in items if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
        if odd:
            raise ValueError(f"guide layers must be whole numbers, got {odd[0]!r} in {layers!r}; write e.g. [20] or '16-23'")
        chosen = [int(x) for x in items]
    if not chosen:
        raise ValueError(f"no guide layers chosen from {layers!r}; pick layers in 0..{num_layers - 1}")
    resolved = []
    for layer in chosen:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ValueError(f"guide layer {layer} is outside the guide's {num_layers} layers; pick layers in 0..{num_layers - 1}")
        resolved.append(index)
    return sorted(set(resolved))


def guide_agreement(assistant: torch.Tensor, main: torch.Tensor, top: int | None = None) -> dict:
    """Does the assistant see what the main model sees? Two guides' unit weights [U] on the same
    video and question -> {"spearman": rank correlation (average ranks for ties; None when either
    is constant), "top_overlap": the share of the main model's `top` units (default U // 4, at
    least 1; ties: lower index first) that the assistant also ranks among its `top`, "top": top,
    "same_argmax": whether both put the most weight on the same unit}.

    A peaked prior (one unit holding nearly all the weight) ranks the near-zero rest by noise: read
    same_argmax and top_overlap beside the rank correlation."""
    a, m = assistant.double().flatten(), main.double().flatten()
    if a.shape != m.shape or a.numel() == 0:
        raise ValueError(f"two guides' weights must cover the same units, got {tuple(assistant.shape)} and {tuple(main.shape)}")
    units = a.numel()
    top = max(1, units // 4) if top is None else top
    if not 1 <= top <= units:
        raise ValueError(f"top must be in 1..{units}, got {top}")

    def ranks(x):
        order = torch.sort(x, stable=True).indices
        r = torch.empty(units, dtype=torch.float64)
        r[order] = torch.arange(units, dtype=torch.float64)
        for value in x.unique():  # ties share their average rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rm = ranks(a), ranks(m)
    da, dm = ra - ra.mean(), rm - rm.mean()
    denominator = float((da.square().sum() * dm.square().sum()).sqrt())
    spearman = None if denominator == 0 else float((da * dm).sum()) / denominator
    best = lambda x: set(torch.sort(-x, stable=True).indices[:top].tolist())  # noqa: E731
    first = lambda x: int(torch.sort(-x, stable=True).indices[0])  # noqa: E731
    return {"spearman": spearman, "top_overlap": len(best(a) & best(m)) / top, "top": top, "same_argmax": first(a) == first(m)}
