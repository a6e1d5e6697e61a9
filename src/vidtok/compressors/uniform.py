from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Compressor


@dataclass
class Uniform(Compressor):
    """A fixed spatial subsample: `budget` tokens at an even stride through the frame's raster order."""

    name: ClassVar[str] = "uniform"

    def select(self, features, budget, frame, signals):
        tokens_per_frame = features.shape[0]
        # Centre of each of `budget` equal slices: distinct indices for any budget <= T.
        index = ((torch.arange(budget, dtype=torch.float64) + 0.5) * tokens_per_frame / budget).long()
        return index, features[index]
