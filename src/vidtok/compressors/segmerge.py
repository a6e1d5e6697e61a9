"""SegmentMerge: a temporal base compressor that merges tokens repeating across neighbouring units.

Two published rules, put together under per-unit budgets:

- **Segments (FastVID's DySeg).** A unit's global feature is the mean of its tokens; consecutive
  units whose global features have cosine similarity below `segment_threshold` are cut apart, and
  so are the `min_segments - 1` least similar consecutive pairs (FastVID: threshold 0.9 for
  LLaVA-OneVision, 0.84 for Qwen2.5-VL, 8 segments at least).
- **Temporal merging within a segment (HoliTom).** A token whose cosine similarity with the token
  at the same position in the previous unit of its segment exceeds `threshold` (HoliTom: 0.8)
  repeats that token: it is *redundant*. Redundant tokens are the first to go, and a dropped one
  is averaged into an earlier kept occurrence of its position and sits there (HoliTom keeps a
  static token once, at its segment's first frame).

What differs from the papers:

- HoliTom picks segments by a dynamic programme that maximises static tokens, and calls a position
  static only when it repeats across the *whole* segment; here segments are FastVID's cuts and a
  token is redundant when it repeats the previous unit's token, so a run of repeats may start and
  end inside a segment (closer to DyCoke's unit-to-unit comparison).
- The papers choose their own per-frame budgets; here each unit keeps exactly the `budgets[u]`
  tokens it is given (an even split alone, DyToK's query-aware split under the wrapper).
- What is left after the temporal merge: HoliTom clusters it (density peaks, attention-dominant
  tokens) and FastVID keeps attention-salient tokens plus density-peak anchors with weighted
  merging; here a unit keeps its most attended non-redundant tokens (FastVID's salience, the vision
  tower's attention received), and every dropped token with no temporal representative is averaged
  into the most similar kept token of its own unit (`spatial_merge`), a plain mean with no weights.
- FastVID's global features come from the vision tower's pooled output; here the mean of the
  tokens the LLM sees (the same features the tokens are compared on).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Compressor, FrameSignals


def segment_starts(features: torch.Tensor, segment_threshold: float, min_segments: int) -> torch.Tensor:
    """FastVID's dynamic segmentation: features [U, T, d] -> [U] bool, True where a unit opens a
    segment. The first unit always does; unit u+1 does when the cosine similarity of the mean
    tokens of units u and u+1 is below `segment_threshold`, or is among the `min_segments - 1`
    lowest of those similarities (ties to the earlier pair)."""
    units = features.shape[0]
    starts = torch.zeros(units, dtype=torch.bool, device=features.device)
    starts[:1] = True
    if units > 1:
        mean = F.normalize(features.float().mean(dim=1), dim=-1)
        similarity = (mean[:-1] * mean[1:]).sum(dim=-1).clamp(-1, 1)
        cut = similarity < segment_threshold
        lowest = torch.sort(similarity, stable=True).indices[: min(min_segments - 1, units - 1)]
        cut[lowest] = True
        starts[1:] = cut
    return starts


def previous_similarity(features: torch.Tensor) -> torch.Tensor:
    """[U, T]: cosine similarity of each token with the token at the same position one unit
    earlier (in float32, clamped to [-1, 1]); row 0, which has no earlier unit, is -1."""
    unit_vectors = F.normalize(features.float(), dim=-1)
    similarity = torch.full(features.shape[:2], -1.0, device=features.device)
    similarity[1:] = (unit_vectors[1:] * unit_vectors[:-1]).sum(dim=-1).clamp(-1, 1)
    return similarity


@dataclass
class SegmentMerge(Compressor):
    """Temporal merging within FastVID-style segments (HoliTom's rule), under exact per-unit budgets.

    The rule, on the first `signals.width` channels of each token (all of them when None):
    1. Segments: `segment_starts` (mean token per unit, cut below `segment_threshold` and at the
       `min_segments - 1` least similar neighbours).
    2. A token is redundant when it is not in its segment's first unit and its cosine similarity
       with the token at the same position in the previous unit exceeds `threshold`.
    3. Unit u keeps `budgets[u]` tokens: its non-redundant tokens first, by attention received
       (`signals.attention`, most attended first), then its redundant ones, least similar to their
       predecessor first; ties to the lower index (stable sorts).
    4. Each dropped token joins one kept token: a redundant one the nearest earlier kept token at
       its position that the chain of redundant tokens reaches within the segment; otherwise (or
       when not redundant), with `spatial_merge`, the kept token of its own unit most similar to it
       (ties to the lower index); a unit that keeps nothing and has no earlier representative
       loses it.
    5. A kept token becomes the plain mean of itself and the tokens that joined it, over every
       channel (companions included), and stays at its own index, the earliest unit of its group
       (what joins it comes from its own unit or later ones): a merged repeat sits at the position
       of the earlier occurrence it joined, as HoliTom keeps a static token at its first frame.

    The thresholds are the papers' (FastVID's 0.9, HoliTom's 0.8). FastVID also forces c = 8
    segments on its 32+-frame videos; here min_segments defaults to 1 (threshold cuts only),
    because on a short clip (8 units or fewer: a 16-frame Qwen video) c = 8 cuts every neighbouring
    pair and nothing would merge across units. Set min_segments=8 for FastVID's rule.

    A unit with a full budget keeps all its tokens; they too absorb the later repeats dropped from
    the units after them, so they may come out averaged. (Retention 1.0 never calls the compressor:
    the model sees its own tokens.)
    """

    threshold: float = field(default=0.8, metadata={
        "help": "cosine similarity above which a token repeats the token at its position one unit earlier (HoliTom's tau)"})
    segment_threshold: float = field(default=0.9, metadata={
        "help": "cut a segment between neighbouring units whose mean tokens are less similar than this (FastVID's tau)"})
    min_segments: int = field(default=1, metadata={
        "help": "also cut at the min_segments - 1 least similar neighbours (FastVID's c; 1: threshold cuts only)"})
    spatial_merge: bool = field(default=True, metadata={
        "help": "average dropped tokens with no temporal representative into the most similar kept token of their unit"})

    name: ClassVar[str] = "segmerge"
    needs_vision_signals: ClassVar[bool] = True
    signals: ClassVar[tuple[str, ...]] = ("attention",)

    def __post_init__(self):
        super().__post_init__()
        for name in ("threshold", "segment_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1 <= value <= 1:
                raise ValueError(f"{name} is a cosine similarity: give a number in [-1, 1], got {value!r}")
        if isinstance(self.min_segments, bool) or not isinstance(self.min_segments, numbers.Integral) or self.min_segments < 1:
            raise ValueError(f"min_segments must be a whole number >= 1 (1: cut only below segment_threshold), "
                             f"got {self.min_segments!r}")
        if not isinstance(self.spatial_merge, bool):
            raise ValueError(f"spatial_merge must be True or False, got {self.spatial_merge!r}")

    def compress(self, features: torch.Tensor, budgets: list[int], signals: FrameSignals | None = None):
        """features [U, T, D] -> (tokens [sum(budgets), D], kept indices per unit); see the class."""
        if features.dim() != 3:
            raise ValueError(f"features must be [units, tokens, channels], got shape {tuple(features.shape)}")
        units, tokens_per_unit, channels = features.shape
        if len(budgets) != units:
            raise ValueError(f"{len(budgets)} budgets for {units} units: give one budget per unit")
        for u, budget in enumerate(budgets):
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 0 <= budget <= tokens_per_unit:
                raise ValueError(f"unit {u}: budget {budget!r} must be a whole number in 0..{tokens_per_unit}")
        signals = signals or FrameSignals()
        width = channels if signals.width is None else signals.width
        if not 0 < width <= channels:
            raise ValueError(f"signals.width {width} must be in 1..{channels} (the leading channels compared; None: all)")
        device = features.device
        if units == 0:
            return features.reshape(0, channels), []
        partial = any(0 < b < tokens_per_unit for b in budgets)
        if signals.attention is None:
            if partial:
                raise ValueError("SegmentMerge ranks a unit's tokens by the vision tower's attention: run it through "
                                 "vidtok.generate/prepare, or pass FrameSignals(attention=[units, tokens])")
            attention = torch.zeros(units, tokens_per_unit, device=device)
        elif tuple(signals.attention.shape) != (units, tokens_per_unit):
            raise ValueError(f"signals.attention must be [units, tokens] = [{units}, {tokens_per_unit}], "
                             f"got {tuple(signals.attention.shape)}")
        else:
            attention = signals.attention.to(device, torch.float32)

        compared = features[..., :width].float()
        starts = segment_starts(compared, self.segment_threshold, self.min_segments)
        similarity = previous_similarity(compared)
        redundant = (similarity > self.threshold) & ~starts[:, None]

        # rank: non-redundant by attention (descending), then redundant by similarity (ascending); stable
        order = torch.sort(torch.where(redundant, similarity, -attention), dim=1, stable=True).indices
        order = order.gather(1, torch.sort(redundant.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(tokens_per_unit, device=device).expand(units, -1))
        keep = rank < torch.tensor(budgets, device=device)[:, None]

        # each dropped token's representative, as a flat index u * T + t (-1: none)
        target = torch.full((units, tokens_per_unit), -1, dtype=torch.long, device=device)
        positions = torch.arange(tokens_per_unit, device=device)
        reach = torch.full((tokens_per_unit,), -1, dtype=torch.long, device=device)  # the unit of the kept token a chain reaches
        unit_vectors = F.normalize(compared, dim=-1)
        for u in range(units):
            dropped = ~keep[u]
            temporal = dropped & redundant[u] & (reach >= 0)
            target[u] = torch.where(temporal, reach * tokens_per_unit + positions, target[u])
            spatial = dropped & ~temporal
            if self.spatial_merge and budgets[u] > 0 and bool(spatial.any()):
                cosine = (unit_vectors[u] @ unit_vectors[u].T).masked_fill(dropped[None, :], -math.inf)
                target[u] = torch.where(spatial, u * tokens_per_unit + cosine.argmax(dim=1), target[u])
            # a kept token starts a chain; a dropped repeat passes the chain on; a dropped new token breaks it
            reach = torch.where(keep[u], u, torch.where(redundant[u], reach, -1))

        flat = features.reshape(-1, channels).float()
        target = target.reshape(-1)
        joins = target >= 0
        sums = flat.clone().index_add_(0, target[joins], flat[joins])
        counts = torch.ones(len(flat), device=device).index_add_(0, target[joins], torch.ones(int(joins.sum()), device=device))
        merged = (sums / counts[:, None]).to(features.dtype)

        kept = []
        for u, budget in enumerate(budgets):
            index = order[u, :budget]
            kept.append(index.sort().values if self.spatial_order else index)
        flat_index = torch.cat([u * tokens_per_unit + index for u, index in enumerate(kept)])
        return merged[flat_index], [index.tolist() for index in kept]

    def __str__(self) -> str:
        return (f"{self.name}(retention={self.retention:g}, threshold={self.threshold:g}, "
                f"segment_threshold={self.segment_threshold:g}, min_segments={self.min_segments})")
