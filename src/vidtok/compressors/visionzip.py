from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Compressor


def visionzip_frame(features, attention, metric, dominant: int, contextual: int):
    """VisionZip on one frame (SPEC section 3), after pooling.

    features [T, D], attention [T] (attention received), metric [T, d]. Keeps the `dominant`
    tokens that receive the most attention; of the rest, `contextual` targets at a uniform
    stride, every other remaining token joins its most similar target (cosine on the metric),
    and each contextual token is target + mean(members). The reference adds the members' mean
    to the target instead of averaging all of them; we keep that. Returns (indices, tokens),
    dominant first (by attention), then contextual (by index).
    """
    tokens = features.shape[0]
    if dominant + contextual > tokens:
        raise ValueError(f"{dominant}+{contextual} tokens asked of a frame of {tokens}")
    # Stable sort: ties go to the lower index, identically on every device.
    order = torch.sort(attention.float(), descending=True, stable=True).indices
    dominant_index = order[:dominant]
    rest = torch.ones(tokens, dtype=torch.bool)
    rest[dominant_index] = False
    rest_index = rest.nonzero().squeeze(1)
    if contextual == 0:
        return dominant_index, features[dominant_index]
    step = max(1, rest_index.numel() // contextual)
    target_pos = torch.arange(0, rest_index.numel(), step)[:contextual]
    is_target = torch.zeros(rest_index.numel(), dtype=torch.bool)
    is_target[target_pos] = True
    target_index, member_index = rest_index[is_target], rest_index[~is_target]
    merged = features[target_index].clone()
    if member_index.numel():
        unit = F.normalize(metric.float(), dim=-1)
        nearest = (unit[member_index] @ unit[target_index].T).argmax(dim=1)
        sums = torch.zeros_like(merged).index_add_(0, nearest, features[member_index])
        counts = torch.bincount(nearest, minlength=target_index.numel()).clamp(min=1).to(merged.dtype)
        merged = merged + sums / counts[:, None]
    return torch.cat([dominant_index, target_index]), torch.cat([features[dominant_index], merged])


@dataclass
class VisionZip(Compressor):
    """VisionZip after pooling ("VisionZip†" in the DyToK paper): dominant + contextual tokens per frame.

    A frame's budget b splits into dominant = floor(b * dominant_ratio) and contextual = b - dominant
    (6:1 as in the reference: 196 -> (126, 21), (42, 7), (12, 2) ...).
    """

    dominant_ratio: float = field(default=6 / 7, metadata={"help": "share of a frame's budget kept as dominant tokens"})
    name: ClassVar[str] = "visionzip"
    needs_vision_signals: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.dominant_ratio <= 1:
            raise ValueError(f"dominant_ratio must be in [0, 1], got {self.dominant_ratio}")

    def split(self, budget: int) -> tuple[int, int]:
        # Round-off guard: 6 * 7 / 7 must give 6, not 5.999...
        dominant = int(budget * self.dominant_ratio + 1e-9)
        return dominant, budget - dominant

    def select(self, features, budget, frame, signals):
        if signals.attention is None or signals.metric is None:
            raise ValueError("VisionZip needs the vision tower's attention and keys; run it through vidtok.generate/prepare")
        dominant, contextual = self.split(budget)
        return visionzip_frame(features, signals.attention[frame], signals.metric[frame], dominant, contextual)
