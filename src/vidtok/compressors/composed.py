from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import Compressor
from .fastv import FastV


@dataclass
class Composed(Compressor):
    """An encoder-side compressor, then FastV inside the LLM on what it left.

    `retention` is the share of all visual tokens kept from FastV's layer on: encoder retention x
    FastV retention (VisionZip(0.5) then FastV(0.5) keeps 25% from layer K on, 50% before it).
    Under DyToK both stages follow the same prior: the encoder's per-frame budgets, then FastV's
    budgets split the same way, each frame capped at what the encoder left of it.
    """

    encoder: Compressor | None = field(default=None, metadata={"help": "the encoder-side compressor (VisionZip, DiverseSelect, SegmentMerge, Uniform, Random)"})
    llm: FastV | None = field(default=None, metadata={"help": "the LLM-side compressor (FastV)"})
    retention: float = field(default=1.0, init=False, metadata={"help": "encoder retention x FastV retention"})
    name: ClassVar[str] = "composed"
    side: ClassVar[str] = "both"

    def __post_init__(self):
        if not isinstance(self.encoder, Compressor) or self.encoder.side != "vision":
            raise TypeError(f"Composed's encoder must be an encoder-side compressor (VisionZip, DiverseSelect, SegmentMerge, Uniform, Random), got {type(self.encoder).__name__}")
        if not isinstance(self.llm, FastV):
            raise TypeError(f"Composed's llm must be FastV(...), got {type(self.llm).__name__}")
        self.retention = self.encoder.retention * self.llm.retention

    @property
    def label(self) -> str:
        return f"{self.encoder.name}+{self.llm.name}"

    def select(self, features, budget, frame, signals):
        return self.encoder.select(features, budget, frame, signals)

    def select_frames(self, features, frames, budget, signals):
        return self.encoder.select_frames(features, frames, budget, signals)

    def compress(self, features, budgets, signals=None):
        return self.encoder.compress(features, budgets, signals)  # an encoder that merges across units has its own

    def compress_batch(self, videos):
        return self.encoder.compress_batch(videos)

    def __str__(self) -> str:
        return f"composed({self.encoder}, {self.llm})"
