from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any

import torch

from ..allocation import Even, Keyframes, as_allocation
from ..budget import check_retention
from .base import Compressor


@dataclass
class DyToK:
    """DyToK: split the global budget across frames by the guide's keyframe prior, then let `base`
    keep that many tokens per frame.

    The guide is the main model itself ("self", a pass of its own), an assistant model of the same
    family (referenced here, never attached to the main model), or, for FastV, "inline": the main
    model's own attention in layers below FastV's layer, read in the same prefill at no extra cost.
    """

    base: Compressor
    retention: float | None = field(default=None, metadata={"help": "kept share of visual tokens; None: the base's"})
    guide: Any = field(default="self", metadata={"help": '"self", "inline" (FastV only) or an assistant model of the same family'})
    layers: Any = field(default=None, metadata={"help": "guide layers: list, range or 'A-B'; None: last third (inline: every layer below FastV's)"})
    cap: int | None = field(default=None, metadata={"help": "max tokens per frame; None: all of a frame's tokens"})
    floor: int = field(default=0, metadata={"help": "min tokens per frame (temporal coverage); 0 as in the reference"})
    guide_pool: int = field(default=1, metadata={"help": "the guide sees each frame average-pooled k x k (1: full grid)"})
    guide_stride: int = field(
        default=1,
        metadata={"help": "the guide sees every k-th frame (unit); the others get weights interpolated between them (1: all)"},
    )
    allocation: Any = field(
        default="proportional",
        metadata={"help": 'the per-unit split: "proportional" (DyToK), "binary" (the top frames whole, a baseline), "mix" '
                          '(the prior mixed with uniqueness; Mix(w) sets the weight), or a query-agnostic "uniqueness" or '
                          '"uniform" with guide=None; names or vidtok.allocation objects'},
    )
    share_vision: bool = field(
        default=True,
        metadata={"help": "reuse the main model's vision tower output when the assistant's tower has equal weights (checked once per pair)"},
    )
    compare: bool = field(
        default=False,
        metadata={"help": "with an assistant: also run the main model's own guide pass and report how far the two agree "
                          "(plan.guide_agreement); a diagnostic that costs that pass"},
    )
    _shared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name = "dytok"

    def __post_init__(self):
        if not isinstance(self.base, Compressor):
            raise TypeError(f"DyToK wraps a base compressor (VisionZip, DiverseSelect, SegmentMerge, Uniform, Random, ...), got {type(self.base).__name__}")
        if self.retention is None:
            self.retention = self.base.retention
        check_retention(self.retention)
        self.allocation = as_allocation(self.allocation)
        if self.base.side == "both" and self.retention != self.base.retention:
            raise ValueError(
                f"a composed method's retention is its encoder's x FastV's ({self.base.retention:g}); "
                f"leave DyToK's retention out (got {self.retention:g})"
            )
        if self.guide is None and self.allocation.needs_prior:
            raise ValueError(f'guide must be "self" or an assistant model for the {self.allocation.name} split, got None; '
                             'for static budgets use the base compressor alone, or a query-agnostic split '
                             '(allocation="uniqueness") with guide=None')
        if self.guide is not None and not self.allocation.needs_prior:
            raise ValueError(f"the {self.allocation.name} split reads no guide (it is query-agnostic): pass guide=None, "
                             'or pick a guided split (allocation="proportional" or "mix")')
        if self.compare is not False and (self.compare is not True or isinstance(self.guide, str) or self.guide is None):
            raise ValueError(f"compare=True sets an assistant's prior beside the main model's own: it needs an assistant guide "
                             f"(guide={self.guide_name!r}) and a bool, got {self.compare!r}")
        if self.guide is None:
            if self.layers is not None or self.guide_pool != 1 or self.guide_stride != 1:
                raise ValueError("layers, guide_pool and guide_stride shape a guide pass; with guide=None there is none: leave them out")
            return self._check_budget_options()
        if isinstance(self.guide, (str, os.PathLike)) and self.guide not in ("self", "inline"):
            raise ValueError(
                f'guide must be "self", "inline" or a loaded assistant model, got {self.guide!r}; '
                "load an assistant with AutoModelForImageTextToText.from_pretrained(path)"
            )
        if not isinstance(self.guide, str) and not (isinstance(self.guide, torch.nn.Module) and hasattr(self.guide, "config")):
            hint = " (a tokenizer: pass the assistant model itself; it shares the main model's tokenizer)" if callable(
                getattr(self.guide, "encode", None)) else ""
            raise TypeError(
                f'guide must be "self", "inline" or a loaded assistant model, got {type(self.guide).__name__}{hint}; '
                "load an assistant with AutoModelForImageTextToText.from_pretrained(path)"
            )
        if self.guide == "inline" and self.base.side == "vision":
            raise ValueError(
                'guide="inline" reads the main model\'s attention in the LLM layers before FastV drops tokens; '
                f"it needs FastV (or an encoder compressor composed with FastV), not {self.base.name}: use guide=\"self\" or an assistant"
            )
        if self.guide == "inline" and (self.guide_pool != 1 or self.guide_stride != 1):
            raise ValueError("guide_pool and guide_stride shape a separate guide pass; the inline prior reads the main prefill itself: "
                             "use guide_pool=1, guide_stride=1")
        if isinstance(self.guide_pool, bool) or not isinstance(self.guide_pool, int) or self.guide_pool < 1:
            raise ValueError(f"guide_pool must be a positive int, got {self.guide_pool!r}")
        if isinstance(self.guide_stride, bool) or not isinstance(self.guide_stride, int) or self.guide_stride < 1:
            raise ValueError(f"guide_stride must be a positive int, got {self.guide_stride!r}")
        if self.guide == "inline" and self.allocation.needs_features:
            raise ValueError(f"the {self.allocation.name} split reads the encoded video's features, which the inline prior "
                             "(inside FastV's prefill) does not see: use guide=\"self\" or an assistant")
        self._check_budget_options()

    def _check_budget_options(self) -> None:
        if self.cap is not None and (isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1):
            raise ValueError(f"cap must be a positive int or None, got {self.cap!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, int) or self.floor < 0:
            raise ValueError(f"floor must be a non-negative int, got {self.floor!r}")
        if isinstance(self.allocation, Keyframes) and self.floor:
            raise ValueError("binary keyframe selection gives unselected frames nothing: a floor does not apply (use floor=0)")

    @property
    def guide_name(self) -> str | None:
        if self.guide is None:
            return None
        return self.guide if isinstance(self.guide, str) else "assistant"

    def budgets(self, weights, total: int, tokens_per_frame: int, available: list[int] | None = None, features=None, *,
                even: bool = False) -> list[int]:
        """Per-unit budgets from the guide's unit weights (the prior) and/or the encoded video's
        features [U, T, D], as the allocation reads them; `available`: what an earlier stage left of
        each unit (a further cap). `even`: the split's caps and floor with even weights (checks a
        budget is possible before any pass has run)."""
        cap = tokens_per_frame if self.cap is None else self.cap
        if cap > tokens_per_frame:
            raise ValueError(f"cap {cap} exceeds the {tokens_per_frame} tokens a frame has; use a cap <= {tokens_per_frame}")
        caps = cap if available is None else [min(cap, a) for a in available]
        floor = self.floor if available is None else min(self.floor, min(available))
        if even:
            return Even().split(total, caps, prior=weights, floor=floor)
        return self.allocation.split(total, caps, prior=weights, features=features, floor=floor)

    def __str__(self) -> str:
        pool = f", guide_pool={self.guide_pool}" if self.guide_pool != 1 else ""
        pool += f", guide_stride={self.guide_stride}" if self.guide_stride != 1 else ""
        split = f", allocation={self.allocation}" if self.allocation.name != "proportional" else ""
        if self.guide is None:
            return f"dytok({self.base}, retention={self.retention:g}, guide=None{split})"
        return f"dytok({self.base}, retention={self.retention:g}, guide={self.guide_name}, layers={self.layers}{pool}{split})"
