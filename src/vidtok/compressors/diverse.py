"""Salient and diverse tokens per unit: FlashVID's attention- and diversity-based token selection (ADTS).

The rule (FlashVID, arXiv 2026, "ADTS": a max-min diversity problem calibrated by attention), per
unit (a frame, or a Qwen temporal group) of T tokens:

- distance d(i, j) = 1 - cosine(x_i, x_j) between the unit's tokens as the LLM sees them (after the
  projector and pooling, as FlashVID compares them); only the leading `signals.width` channels are
  compared, the companions after them (Qwen3-VL's DeepStack features) are not;
- calibrated distance c(i, j) = d(i, j) * a_j ** calibration, a_j the attention token j receives in
  the vision tower's last layer (mean over heads and queries). None of the supported families has a
  CLS token: this is the signal FlashVID itself falls back to for SigLIP and Qwen's towers (it calls
  it "[CLS] attention"), and the one VisionZip's dominant tokens use;
- the first kept token is the one whose nearest other token is farthest in calibrated distance,
  argmax_j min_{i != j} c(i, j); each next one maximises its calibrated distance to the nearest kept
  token, argmax_j min_{s kept} c(s, j), over the tokens not kept yet (the greedy max-min rule).

Unselected tokens are dropped, not merged: ADTS itself only selects (FlashVID hands what it leaves
to its cross-frame merging, which this per-unit base does not do).

What differs from FlashVID:
- the whole unit budget goes to this selection (FlashVID spends a share alpha = 0.7 of it here and
  the rest on tree-based spatiotemporal merging across the frames of a segment), and the budget per
  unit comes from the caller (DyToK's or an even split) instead of ceil(T * retention * 1.25);
- no video segmentation and no pruning inside the LLM;
- `calibration` generalises the weight: 1 is FlashVID's rule, 0 pure max-min diversity (its
  "div" ablation); FlashVID's constant 1e6 scale on the attention (a fix for low precision) is
  dropped: everything is computed in float32, and a constant scale does not change the argmax;
- the first token is chosen by the smallest distance to another token, with the diagonal excluded
  (FlashVID takes the second smallest of a column, diagonal included: the same up to rounding);
- ties go to the lowest token index, on every device (FlashVID relies on argmax's order);
- a token of zero norm is at distance 1 from every token (FlashVID divides by zero).

Kept tokens come back in selection order; the base class sorts them into raster order when
`spatial_order` is set (the default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Compressor


def _first_max(scores: torch.Tensor) -> torch.Tensor:
    """Per row of scores [G, T], the lowest index holding the row's maximum."""
    top = scores.max(dim=1, keepdim=True).values
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.where(scores == top, positions, scores.shape[1]).min(dim=1).values


def diverse_frames(compared: torch.Tensor, attention: torch.Tensor, budget: int, calibration: float = 1.0) -> torch.Tensor:
    """The greedy attention-calibrated max-min selection on G units at once (module docstring).

    compared [G, T, d]: the tokens' compared channels; attention [G, T]: attention received;
    0 < budget < T. Returns the kept token indices [G, budget], in the order they were chosen.
    """
    units, tokens, _ = compared.shape
    if not 0 < budget < tokens:
        raise ValueError(f"budget {budget} outside 1..{tokens - 1} (a unit of {tokens} tokens)")
    unit = F.normalize(compared.float(), dim=-1)
    distance = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [G, T, T]: d(i, j)
    calibrated = distance * attention.float().pow(calibration)[:, None, :]  # column j scaled by a_j ** calibration
    eye = torch.eye(tokens, dtype=torch.bool, device=compared.device)
    rows = torch.arange(units, device=compared.device)
    chosen = [_first_max(calibrated.masked_fill(eye, math.inf).min(dim=1).values)]
    nearest = calibrated[rows, chosen[0]]  # [G, T]: min over kept s of c(s, j)
    taken = torch.zeros(units, tokens, dtype=torch.bool, device=compared.device)
    taken[rows, chosen[0]] = True
    for _ in range(1, budget):
        pick = _first_max(nearest.masked_fill(taken, -math.inf))
        chosen.append(pick)
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, calibrated[rows, pick])
    return torch.stack(chosen, dim=1)


@dataclass
class DiverseSelect(Compressor):
    """Per unit, the tokens that are both salient and diverse: FlashVID's ADTS (module docstring).

    Greedy max-min selection on cosine distances between the unit's tokens, each candidate's
    distances scaled by the attention it receives in the vision tower raised to `calibration`.
    """

    calibration: float = field(
        default=1.0,
        metadata={"help": "exponent on the attention received that scales a candidate's distances: 1 as in FlashVID's ADTS, "
                          "0 diversity alone, larger leans more on attention"},
    )
    name: ClassVar[str] = "diverse"
    per_frame: ClassVar[bool] = True
    needs_vision_signals: ClassVar[bool] = True
    signals: ClassVar[tuple[str, ...]] = ("attention",)

    def __post_init__(self):
        super().__post_init__()
        value = self.calibration
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"calibration must be a finite number >= 0 (1: FlashVID's rule, 0: diversity alone), got {value!r}")

    def select(self, features, budget, frame, signals):
        attention = None if signals.attention is None else signals.attention[frame][None]
        metric = None if signals.metric is None else signals.metric[frame][None]
        index, tokens = self.select_frames(features[None], [0], budget, dataclasses.replace(signals, attention=attention, metric=metric))
        return index[0], tokens[0]

    def select_frames(self, features, frames, budget, signals):
        if signals.attention is None:
            raise ValueError("DiverseSelect needs the vision tower's attention received (FrameSignals.attention); "
                             "run it through vidtok.generate/prepare, or pass FrameSignals(attention=...) to compress")
        if signals.attention.shape != features.shape[:2]:
            raise ValueError(f"attention of shape {tuple(signals.attention.shape)} for features of {tuple(features.shape[:2])} units x tokens")
        index = torch.tensor(frames, dtype=torch.long, device=features.device)
        attention = signals.attention[index]
        if not (torch.isfinite(attention) & (attention >= 0)).all():
            raise ValueError("the attention received must be finite and >= 0 (softmax weights); these hold NaN, inf or a negative value")
        chosen = features[index]
        compared = chosen if signals.width is None else chosen[..., : signals.width]
        picked = diverse_frames(compared, attention, budget, self.calibration)
        return picked, chosen.gather(1, picked[..., None].expand(-1, -1, chosen.shape[-1]))

    def __str__(self) -> str:
        extra = "" if self.calibration == 1 else f", calibration={self.calibration:g}"
        return f"{self.name}(retention={self.retention:g}{extra})"
