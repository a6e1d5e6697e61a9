"""Base compressors (one file each) and the DyToK wrapper that drives them with per-frame budgets."""

from ..allocation import as_allocation
from .base import Compressor, FrameSignals
from .composed import Composed
from .diverse import DiverseSelect
from .dytok import DyToK
from .fastv import FastV
from .full import Full
from .random_tokens import Random
from .segmerge import SegmentMerge
from .uniform import Uniform
from .visionzip import VisionZip

COMPRESSORS = {cls.name: cls for cls in (Full, Uniform, Random, VisionZip, DiverseSelect, SegmentMerge, FastV)}
ENCODERS = ("uniform", "random", "visionzip", "diverse", "segmerge")
# an encoder-side compressor then FastV on what it left: "visionzip+fastv" (--vision-retention sets the first share)
# "keyframe": binary keyframe selection by the guide's frame weights (top frames whole, VisionZip in a partly kept one)
METHODS = tuple(COMPRESSORS) + ("keyframe",) + tuple(f"{name}+fastv" for name in ENCODERS)
GUIDES = ("none", "self", "assistant", "inline")


def build_method(name: str, retention: float | None, guide: str, assistant=None, layers=None, cap=None, floor=0, seed=0, guide_pool=1,
                 layer=2, vision_retention=None, guide_stride=1, allocation=None):
    """A method from names, as the CLI, eval and bench spell them: method x guide ("none", "self", "assistant", "inline").

    `layer`: FastV's layer. For "ENCODER+fastv", `retention` is the share kept from FastV's layer on and
    `vision_retention` the encoder's share (FastV keeps retention / vision_retention of what is left).
    `allocation`: the per-unit split's name ("mix:0.7" sets the mix's weight); None: uniform without a
    guide, proportional with one (binary for keyframe)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    split = None if allocation is None else as_allocation(allocation)
    if split is not None:
        if name == "full":
            raise ValueError("--method full keeps every token: there is no budget to split; drop --allocation")
        if name == "keyframe" and split.name != "binary":
            raise ValueError(f"--method keyframe is the binary split; for --allocation {split} pick a base (e.g. --method visionzip)")
        if guide == "none" and split.needs_prior:
            raise ValueError(f"--allocation {split} splits by a guide's keyframe prior: add --guide self or assistant, "
                             "or pick a query-agnostic split (uniqueness, uniform)")
        if guide != "none" and not split.needs_prior:
            raise ValueError(f"--allocation {split} is query-agnostic and reads no guide: use --guide none, "
                             "or a guided split (proportional, binary, mix)")
    if guide == "inline" and "fastv" not in name:
        raise ValueError("--guide inline reads the main model's own attention before FastV drops tokens: it needs --method fastv (or ENCODER+fastv)")
    if vision_retention is not None and "+" not in name:
        raise ValueError("--vision-retention sets the encoder's share of a composed method: use it with --method ENCODER+fastv")
    if "+" in name:
        total = 0.25 if retention is None else retention
        if vision_retention is None:
            raise ValueError(f"--method {name} needs --vision-retention V (the encoder's share; FastV keeps retention / V of it)")
        if not (isinstance(vision_retention, (int, float)) and 0 < total <= vision_retention <= 1):
            raise ValueError(f"--vision-retention must be in [retention, 1] = [{total:g}, 1], got {vision_retention!r}")
        encoder_name = name.split("+")[0]
        kwargs = {"seed": seed} if encoder_name == "random" else {}
        base = Composed(encoder=COMPRESSORS[encoder_name](retention=vision_retention, **kwargs),
                        llm=FastV(retention=min(1.0, total / vision_retention), layer=layer))
        return _guided(base, guide, assistant, layers, cap, floor, guide_pool, guide_stride, split)
    if name == "full":
        if guide != "none":
            raise ValueError("--method full keeps every token, so there is nothing for a guide to do; use --guide none")
        if retention not in (None, 1.0):
            raise ValueError("--method full keeps every token; drop --retention or pick a compressing method")
        return Full()
    if name == "keyframe":
        if guide in ("none", "inline"):
            raise ValueError("--method keyframe picks frames by a guide's frame weights: use --guide self or assistant")
        base = VisionZip(retention=0.25 if retention is None else retention)
        return _guided(base, guide, assistant, layers, cap, floor, guide_pool, guide_stride, allocation="binary")
    kwargs = {"seed": seed} if name == "random" else {"layer": layer} if name == "fastv" else {}
    base = COMPRESSORS[name](retention=0.25 if retention is None else retention, **kwargs)
    return _guided(base, guide, assistant, layers, cap, floor, guide_pool, guide_stride, split)


def _guided(base, guide, assistant, layers, cap, floor, guide_pool, guide_stride=1, allocation=None):
    allocation = allocation or "proportional"
    if guide == "none":
        if guide_pool != 1 or guide_stride != 1:
            raise ValueError("--guide-pool, --guide-stride, --cap and --floor shape DyToK's budgets: they need --guide self or assistant")
        if cap is not None or floor:
            raise ValueError("--cap and --floor shape DyToK's budgets: they need --guide self or assistant")
        if allocation == "proportional" or allocation.name == "uniform":
            return base
        return DyToK(base, guide=None, cap=cap, floor=floor, allocation=allocation)
    if guide == "assistant" and assistant is None:
        raise ValueError("--guide assistant needs --assistant PATH (an assistant model of the same family)")
    if guide == "inline" and (guide_pool != 1 or guide_stride != 1):
        raise ValueError("--guide-pool and --guide-stride shape a separate guide pass; the inline prior reads the main prefill itself")
    return DyToK(base, guide=assistant if guide == "assistant" else guide, layers=layers, cap=cap, floor=floor, guide_pool=guide_pool,
                 guide_stride=guide_stride, allocation=allocation)

__all__ = ["COMPRESSORS", "GUIDES", "METHODS", "build_method", "Composed", "Compressor", "DiverseSelect", "DyToK", "FastV", "FrameSignals", "Full",
           "Random", "SegmentMerge", "Uniform", "VisionZip"]
