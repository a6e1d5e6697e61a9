from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Compressor, FrameSignals


def visionzip_frame(features, attention, metric, dominant: int, contextual: int):
    """VisionZip on one frame (SPEC section 3), after pooling.

    features [T, D], attention [T] (attention received), metric [T, d]. Keeps the `dominant`
    tokens that receive the most attention; of the rest, `contextual` targets at a uniform
    stride, every other remaining token joins its most similar target (cosine on the metric),
    and each contextual token is target + mean(members). The reference adds the members' mean
    to the target instead of averaging all of them; we keep that. Returns (indices, tokens),
    dominant first (by attention), then contextual (by index).
    """
    index, tokens = visionzip_frames(features[None], attention[None], metric[None], dominant, contextual)
    return index[0], tokens[0]


def visionzip_frames(features, attention, metric, dominant: int, contextual: int):
    """visionzip_frame on G frames at once, each keeping `dominant` + `contextual` tokens: features
    [G, T, D], attention [G, T], metric [G, T, d] -> (indices [G, dominant + contextual], tokens
    [G, dominant + contextual, D]), row g equal to visionzip_frame on frame g."""
    frames, tokens, _ = features.shape
    if dominant + contextual > tokens:  # Stable sorts below: ties go to the lower index, identically on every device
        raise ValueError(f"{dominant}+{contextual} tokens asked of a frame of {tokens}")
    order = torch.sort(attention.float(), dim=1, descending=True, stable=True).indices
    dominant_index = order[:, :dominant]
    take = lambda index: features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))  # noqa: E731
    if contextual == 0:
        return dominant_index, take(dominant_index)
    rest_index = order[:, dominant:].sort(dim=1).values  # every frame has the same number left: index order
    rest = tokens - dominant
    step = max(1, rest // contextual)
    target_pos = torch.arange(0, rest, step)[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool)
    is_target[target_pos] = True
    target_index, member_index = rest_index[:, is_target], rest_index[:, ~is_target]
    merged = take(target_index).clone()
    if member_index.shape[1]:
        unit = F.normalize(metric.float(), dim=-1)
        pick = lambda index: unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1]))  # noqa: E731
        nearest = torch.bmm(pick(member_index), pick(target_index).transpose(1, 2)).argmax(dim=2)
        sums = torch.zeros_like(merged).scatter_add_(1, nearest[..., None].expand(-1, -1, merged.shape[-1]), take(member_index))
        counts = torch.zeros(frames, contextual, dtype=merged.dtype).scatter_add_(1, nearest, torch.ones_like(nearest, dtype=merged.dtype))
        merged = merged + sums / counts.clamp(min=1)[..., None]
    return torch.cat([dominant_index, target_index], dim=1), torch.cat([take(dominant_index), merged], dim=1)


@dataclass
class VisionZip(Compressor):
    """VisionZip after pooling ("VisionZip†" in the DyToK paper): dominant + contextual tokens per frame.

    A frame's budget b splits into dominant = floor(b * dominant_ratio) and contextual = b - dominant
    (6:1 as in the reference: 196 -> (126, 21), (42, 7), (12, 2) ...).
    """

    dominant_ratio: float = field(default=6 / 7, metadata={"help": "share of a frame's budget kept as dominant tokens"})
    name: ClassVar[str] = "visionzip"
    per_frame: ClassVar[bool] = True
    needs_vision_signals: ClassVar[bool] = True
    signals: ClassVar[tuple[str, ...]] = ("attention", "metric")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.dominant_ratio <= 1:
            raise ValueError(f"dominant_ratio must be in [0, 1], got {self.dominant_ratio}")

    def split(self, budget: int) -> tuple[int, int]:
        # Round-off guard: 6 * 7 / 7 must give 6, not 5.999...
        dominant = int(budget * self.dominant_ratio + 1e-9)
        return dominant, budget - dominant

    def select(self, features, budget, frame, signals):
        one = FrameSignals(*(None if s is None else s[frame][None] for s in (signals.attention, signals.metric)))
        index, tokens = self.select_frames(features[None], [0], budget, one)
        return index[0], tokens[0]

    def select_frames(self, features, frames, budget, signals):
        if signals.attention is None or signals.metric is None:
            raise ValueError("VisionZip needs the vision tower's attention and keys; run it through vidtok.generate/prepare")
        dominant, contextual = self.split(budget)
        index = torch.tensor(frames)
        return visionzip_frames(features[index], signals.attention[index], signals.metric[index], dominant, contextual)
