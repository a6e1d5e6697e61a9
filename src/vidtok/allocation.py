"""How the global budget is split across units (frames, or Qwen temporal groups): small pluggable
parts. Each is a pure function of weights -> budgets with `allocate_budgets`' guarantee: the
budgets sum to exactly the total and no unit exceeds its cap.

    Even()          every unit alike (what a base compressor does alone)
    Prior()         DyToK: in proportion to the guide's keyframe prior (self, assistant, inline)
    Keyframes()     binary: the guide's top units whole, the rest nothing (a baseline)
    Uniqueness()    query-agnostic, as VidCom2: units far from the video's mean feature get more
    Mix(w)          w x the prior + (1 - w) x uniqueness (both normalised to sum 1)

A split reads the guide's prior (`needs_prior`), the encoded video's features
(`needs_features`), both, or neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .budget import allocate_budgets, keyframe_budgets


def frame_uniqueness(features: torch.Tensor, temperature: float = 0.01, channels: float = 0.5) -> torch.Tensor:
    """VidCom2's frame uniqueness -> unit weights [U] summing to 1.

    features [U, T, D]. Keep the `channels` share of channels with the lowest variance over all
    tokens (ties: lower channel first), L2-normalise each token, and score every token by its
    closeness to the video's mean token: sum over a in (1/8 .. 2) of exp(-|x - mean|^2 / 2a). A
    unit's uniqueness is minus its tokens' mean closeness; p = softmax(uniqueness / temperature)
    and its weight is 1 + p - mean(p) (VidCom2 scales a unit's retention by that factor).
    """
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"expected features [units, tokens, channels], got {tuple(features.shape)}")
    x = features.float().flatten(0, 1)
    keep = max(1, int(x.shape[-1] * channels))
    variance = x.var(dim=0, unbiased=False)
    chosen = torch.sort(variance, stable=True).indices[:keep]
    units = torch.nn.functional.normalize(x[:, chosen], dim=-1).reshape(features.shape[0], features.shape[1], keep)
    centre = units.mean(dim=(0, 1))
    distance = ((units - centre) ** 2).sum(dim=-1)
    closeness = sum(torch.exp(-distance / (2 * 2.0**k)) for k in range(-3, 2))
    uniqueness = -closeness.mean(dim=1)
    p = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    weights = 1 + p - p.mean()
    return weights / weights.sum()


@dataclass(frozen=True)
class Allocation:
    """A per-unit split. `split` takes the global total and each unit's cap; `prior` the guide's
    unit weights (when `needs_prior`), `features` the encoded video [U, T, D] (when `needs_features`)."""

    name: ClassVar[str] = "allocation"
    needs_prior: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False

    def weights(self, prior, features) -> list[float]:
        raise NotImplementedError

    def split(self, total: int, caps, *, prior=None, features=None, floor: int = 0) -> list[int]:
        return allocate_budgets(self.weights(prior, features), total, caps, floor)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Even(Allocation):
    """Every unit the same share ("uniform"): what a compressor does without a guide."""

    name: ClassVar[str] = "uniform"

    def weights(self, prior, features):
        units = len(prior) if prior is not None else features.shape[0]
        return [1.0] * units


@dataclass(frozen=True)
class Prior(Allocation):
    """DyToK's split ("proportional"): budgets in proportion to the guide's unit weights, capped per unit."""

    name: ClassVar[str] = "proportional"
    needs_prior: ClassVar[bool] = True

    def weights(self, prior, features):
        return [float(w) for w in prior]


@dataclass(frozen=True)
class Keyframes(Prior):
    """Binary keyframe selection ("binary"): the guide's top units keep all their tokens, the rest none."""

    name: ClassVar[str] = "binary"

    def split(self, total, caps, *, prior=None, features=None, floor=0):
        if floor:
            raise ValueError("binary keyframe selection gives unselected frames nothing: a floor does not apply (use floor=0)")
        return keyframe_budgets(self.weights(prior, features), total, caps)


def _check_uniqueness(temperature, channels) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the uniqueness temperature must be a number > 0, got {temperature!r} (VidCom2 uses 0.01)")
    if isinstance(channels, bool) or not isinstance(channels, (int, float)) or not 0 < channels <= 1:
        raise ValueError(f"the uniqueness channel share must be in (0, 1], got {channels!r} (VidCom2 uses 0.5)")


@dataclass(frozen=True)
class Uniqueness(Allocation):
    """VidCom2's query-agnostic split ("uniqueness"): units weighted by how far they stand from the video's mean token."""

    temperature: float = field(default=0.01, metadata={"help": "softmax temperature of the units' uniqueness (VidCom2: 0.01)"})
    channels: float = field(default=0.5, metadata={"help": "share of lowest-variance channels compared (VidCom2: 0.5)"})
    name: ClassVar[str] = "uniqueness"
    needs_features: ClassVar[bool] = True

    def __post_init__(self):
        _check_uniqueness(self.temperature, self.channels)

    def weights(self, prior, features):
        return frame_uniqueness(features, self.temperature, self.channels).tolist()


@dataclass(frozen=True)
class Mix(Allocation):
    """weight x the guide's prior + (1 - weight) x uniqueness ("mix", "mix:W")."""

    weight: float = field(default=0.5, metadata={"help": "the prior's share; 1 - weight goes to uniqueness"})
    temperature: float = field(default=0.01, metadata={"help": "uniqueness softmax temperature"})
    channels: float = field(default=0.5, metadata={"help": "uniqueness channel share"})
    name: ClassVar[str] = "mix"
    needs_prior: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 <= self.weight <= 1:
            raise ValueError(f"the mix weight (the prior's share) must be in [0, 1], got {self.weight!r}")
        _check_uniqueness(self.temperature, self.channels)

    def weights(self, prior, features):
        prior = torch.tensor([float(w) for w in prior], dtype=torch.float64)
        if prior.sum() > 0:
            prior = prior / prior.sum()
        else:
            prior = torch.full_like(prior, 1 / len(prior))
        unique = frame_uniqueness(features, self.temperature, self.channels).double()
        return (self.weight * prior + (1 - self.weight) * unique).tolist()

    def __str__(self) -> str:
        return f"mix({self.weight:g})"


ALLOCATIONS = {cls.name: cls for cls in (Even, Prior, Keyframes, Uniqueness, Mix)}


def as_allocation(value) -> Allocation:
    """An Allocation from itself or its name; "mix:0.7" is Mix(weight=0.7), the prior's share."""
    if isinstance(value, Allocation):
        return value
    if isinstance(value, str):
        name, _, weight = value.partition(":")
        if name == "mix" and weight:
            try:
                number = float(weight)
            except ValueError:
                raise ValueError(f"cannot read the mix weight in {value!r}: write mix:W with W in [0, 1], e.g. mix:0.5") from None
            return Mix(weight=number)
        if name in ALLOCATIONS and not weight:
            return ALLOCATIONS[name]()
        if name in ALLOCATIONS:
            raise ValueError(f"only the mix takes a weight (mix:W); write {name!r} alone")
    raise ValueError(f"unknown allocation {value!r}; choose one of {', '.join(ALLOCATIONS)} (mix:W sets the prior's share W), "
                     "or pass an Allocation such as vidtok.Mix(0.7)")
