"""Frame weights -> per-frame token budgets (SPEC section 2). Pure and deterministic."""

from __future__ import annotations

import math
from collections.abc import Sequence


def total_budget(retention: float, frames: int, tokens_per_frame: int) -> int:
    """B = round(r * F * T), half up (Python's round() is half-to-even)."""
    check_retention(retention)
    budget = math.floor(retention * frames * tokens_per_frame + 0.5)
    if budget < 1:
        raise ValueError(
            f"retention {retention} keeps no token of {frames}x{tokens_per_frame}; "
            f"use a retention of at least {1 / (frames * tokens_per_frame):.2g}"
        )
    return budget


def check_retention(retention: float) -> None:
    if not isinstance(retention, (int, float)) or isinstance(retention, bool) or not 0 < retention <= 1:
        raise ValueError(f"retention must be a number in (0, 1], got {retention!r} (1.0 keeps every token)")


def _floats(weights) -> list[float]:
    """Weights as floats. A Python int or Fraction beyond float range (10**400) is finite, and only
    the ratios matter: divide by the largest exactly, then convert (every ratio is <= 1)."""
    weights = list(weights)
    try:
        return [float(w) for w in weights]
    except OverflowError:
        from fractions import Fraction

        try:
            exact = [Fraction(w) for w in weights]
        except (TypeError, ValueError):  # NaN or inf beside a huge int, or not a number at all
            raise ValueError("frame weights must be finite and >= 0 numbers") from None
        if min(exact) < 0:
            raise ValueError("frame weights must be finite and >= 0, got a negative one")
        top = max(exact)
        return [float(w / top) for w in exact]


def _weights_and_caps(weights, cap) -> tuple[list[float], list]:
    """Weights as finite non-negative floats, and one cap per frame (from one int or a sequence)."""
    weights = _floats(weights)
    if not weights:
        raise ValueError("no frames to allocate a budget to")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"frame weights must be finite and >= 0, got {weights}")
    caps = list(cap) if isinstance(cap, Sequence) else [cap] * len(weights)
    if len(caps) != len(weights):
        raise ValueError(f"{len(caps)} per-frame caps for {len(weights)} frames")
    return weights, caps


def allocate_budgets(weights: Sequence[float], total: int, cap: int | Sequence[int], floor: int = 0) -> list[int]:
    """Split `total` tokens across frames in proportion to `weights`, at most `cap` per frame.

    `cap` is one int for every frame, or one per frame (an LLM-side stage after an encoder-side
    one can keep at most what the encoder left of each frame).

    1. a_f = w_f * total (after flooring `floor` tokens to every frame); floor it and hand the
       leftover one token each to the largest remainders (ties: lower frame index first).
    2. Clamp to `cap`; hand the excess one token at a time to frames still under `cap`, by
       descending weight (ties: lower index first).
    Returns one int per frame; their sum is exactly `total`.
    """
    weights, caps = _weights_and_caps(weights, cap)
    frames = len(weights)
    for name, value in (("total", total), ("floor", floor), *(("cap", c) for c in caps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if floor > min(caps):
        raise ValueError(f"floor ({floor}) exceeds cap ({min(caps)}); lower the floor or raise the cap")
    if total > sum(caps):
        shown = f"x cap {cap}" if not isinstance(cap, Sequence) else "with their per-frame caps"
        raise ValueError(
            f"budget {total} exceeds {frames} frames {shown} = {sum(caps)}; "
            "lower the retention or raise the per-frame cap"
        )
    if total < frames * floor:
        raise ValueError(
            f"budget {total} is below {frames} frames x floor {floor} = {frames * floor}; "
            "raise the retention or lower the per-frame floor"
        )
    mass = sum(weights)
    if not math.isfinite(mass):  # finite weights whose sum overflows: scale by a power of two (exact, ratios kept)
        weights = [math.ldexp(w, -math.frexp(max(weights))[1]) for w in weights]
        mass = sum(weights)
    shares = [w / mass for w in weights] if mass > 0 else [1.0 / frames] * frames

    spread = total - frames * floor
    exact = [s * spread for s in shares]
    budgets = [math.floor(a) for a in exact]
    # Floors never overshoot (sum of floors <= spread), so the leftover is in [0, frames].
    leftover = spread - sum(budgets)
    by_remainder = sorted(range(frames), key=lambda f: (-(exact[f] - budgets[f]), f))
    for f in by_remainder[:leftover]:
        budgets[f] += 1
    budgets = [b + floor for b in budgets]

    excess = sum(max(b - c, 0) for b, c in zip(budgets, caps))
    budgets = [min(b, c) for b, c in zip(budgets, caps)]
    by_weight = sorted(range(frames), key=lambda f: (-shares[f], f))
    while excess:
        for f in by_weight:
            if excess and budgets[f] < caps[f]:
                budgets[f] += 1
                excess -= 1
    return budgets


def keyframe_budgets(weights: Sequence[float], total: int, cap: int | Sequence[int]) -> list[int]:
    """Binary keyframe selection with the same total: frames by descending weight (ties: lower
    index first) keep all their tokens (`cap`) until `total` is spent; the last one chosen keeps
    what is left, every other frame nothing. The baseline DyToK's proportional split is compared to.
    """
    weights, caps = _weights_and_caps(weights, cap)
    frames = len(weights)
    if isinstance(total, bool) or not isinstance(total, int) or total < 0 or total > sum(caps):
        raise ValueError(f"budget {total!r} must be a whole number in 0..{sum(caps)} (the frames' caps)")
    budgets, left = [0] * frames, total
    for f in sorted(range(frames), key=lambda f: (-weights[f], f)):
        budgets[f] = min(caps[f], left)
        left -= budgets[f]
    return budgets
