"""Base compressors (one file each) and the DyToK wrapper that drives them with per-frame budgets."""

from .base import Compressor, FrameSignals
from .dytok import DyToK
from .full import Full
from .random_tokens import Random
from .uniform import Uniform
from .visionzip import VisionZip

COMPRESSORS = {cls.name: cls for cls in (Full, Uniform, Random, VisionZip)}
METHODS = tuple(COMPRESSORS)
GUIDES = ("none", "self", "assistant")


def build_method(name: str, retention: float | None, guide: str, assistant=None, layers=None, cap=None, floor=0, seed=0, guide_pool=1):
    """A method from names, as the CLI, eval and bench spell them: method x guide ("none", "self", "assistant")."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "full":
        if guide != "none":
            raise ValueError("--method full keeps every token, so there is nothing for a guide to do; use --guide none")
        if retention not in (None, 1.0):
            raise ValueError("--method full keeps every token; drop --retention or pick a compressing method")
        return Full()
    kwargs = {"seed": seed} if name == "random" else {}
    base = COMPRESSORS[name](retention=0.25 if retention is None else retention, **kwargs)
    if guide == "none":
        if guide_pool != 1 or cap is not None or floor:
            raise ValueError("--guide-pool, --cap and --floor shape DyToK's budgets: they need --guide self or assistant")
        return base
    if guide == "assistant" and assistant is None:
        raise ValueError("--guide assistant needs --assistant PATH (an assistant model of the same family)")
    return DyToK(base, guide="self" if guide == "self" else assistant, layers=layers, cap=cap, floor=floor, guide_pool=guide_pool)

__all__ = ["COMPRESSORS", "GUIDES", "METHODS", "build_method", "Compressor", "DyToK", "FrameSignals", "Full", "Random", "Uniform", "VisionZip"]
