from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Compressor


@dataclass
class Uniform(Compressor):
    """A fixed spatial subsample: `budget` tokens at an even stride through the frame's raster order."""

    name: ClassVar[str] = "uniform"
    per_frame: ClassVar[bool] = True

    def select(self, features, budget, frame, signals):
        index, tokens = self.select_frames(features[None], [0], budget, signals)
        return index[0], tokens[0]

    def select_frames(self, features, frames, budget, signals):
        tokens_per_frame = features.shape[1]
        # Centre of each of `budget` equal slices: distinct indices for any budget <= T; the same in every frame.
        index = ((torch.arange(budget, dtype=torch.float64) + 0.5) * tokens_per_frame / budget).long()
        return index.expand(len(frames), -1), features[torch.tensor(frames)][:, index]
