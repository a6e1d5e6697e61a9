from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import Compressor


@dataclass
class Full(Compressor):
    """No compression: every visual token reaches the LLM (the reference everything is compared to)."""

    retention: float = field(default=1.0, metadata={"help": "always 1.0"})
    name: ClassVar[str] = "full"

    def __post_init__(self):
        if self.retention != 1.0:
            raise ValueError(f"Full keeps every token; its retention is 1.0, got {self.retention}. Pick a compressor to compress")
