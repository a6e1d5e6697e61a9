"""Base compressors (one file each) and the DyToK wrapper that drives them with per-frame budgets."""

from .base import Compressor, FrameSignals
from .dytok import DyToK
from .full import Full
from .random_tokens import Random
from .uniform import Uniform
from .visionzip import VisionZip

COMPRESSORS = {cls.name: cls for cls in (Full, Uniform, Random, VisionZip)}

__all__ = ["COMPRESSORS", "Compressor", "DyToK", "FrameSignals", "Full", "Random", "Uniform", "VisionZip"]
