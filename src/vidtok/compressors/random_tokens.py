from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Compressor


@dataclass
class Random(Compressor):
    """`budget` tokens drawn uniformly without replacement; same seed, same tokens."""

    seed: int = field(default=0, metadata={"help": "seed of the per-frame draws"})
    name: ClassVar[str] = "random"

    def select(self, features, budget, frame, signals):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + frame)
        index = torch.randperm(features.shape[0], generator=generator)[:budget]
        return index, features[index]
