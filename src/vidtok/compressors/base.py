"""What every base compressor shares: a retention, per-frame budgets in, kept tokens out."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import check_retention


@dataclass
class FrameSignals:
    """Per-token signals from the vision tower, on the same grid as the LLM's visual tokens.

    attention: [F, T] attention received (mean over heads and queries); metric: [F, T, d] keys
    averaged over heads. Present only when the compressor asks for them. `width`: how many leading
    channels of the features given to `compress` are the LLM's visual tokens; any after them are
    companions riding along (Qwen3-VL's DeepStack features), to be merged like the tokens but not
    compared (None: every channel is the token).
    """

    attention: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    width: int | None = None


@dataclass
class Compressor:
    """Base class: keeps `budgets[f]` tokens of frame f. Subclasses override `select`.

    Without a DyToK wrapper every frame gets the same budget, round(retention * F * T) spread
    evenly (the remainder to the earliest frames).
    """

    retention: float = field(default=0.25, metadata={"help": "kept visual tokens / all visual tokens, in (0, 1]"})
    spatial_order: bool = field(default=True, metadata={"help": "keep kept tokens in raster order within a frame"})

    name: ClassVar[str] = "base"
    needs_vision_signals: ClassVar[bool] = False
    # which of the vision tower's signals it reads (FrameSignals fields); a family that cannot give one is refused up front
    signals: ClassVar[tuple[str, ...]] = ()
    side: ClassVar[str] = "vision"  # where tokens go: "vision" (before the LLM), "llm" (inside it), "both"
    # select_frames reads each frame's own tokens and signals, never its position in the video:
    # the frames of several videos can then go through one call (compress_batch)
    per_frame: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that selects or compresses its own way may read positions or span frames: it
        # batches frame by frame only where it says so itself
        if "per_frame" not in cls.__dict__ and any(name in cls.__dict__ for name in ("select", "select_frames", "compress")):
            cls.per_frame = False

    @property
    def label(self) -> str:
        return self.name

    def __post_init__(self):
        check_retention(self.retention)

    def select(self, features: torch.Tensor, budget: int, frame: int, signals: FrameSignals) -> tuple[torch.Tensor, torch.Tensor]:
        """features [T, D] of one frame, 0 < budget < T -> (token indices [budget], tokens [budget, D])."""
        raise NotImplementedError

    def select_frames(self, features: torch.Tensor, frames: list[int], budget: int, signals: FrameSignals):
        """`select` on each of `frames` (features [F, T, D] of the whole video), all with the same
        0 < budget < T: (token indices [G, budget], tokens [G, budget, D]). A compressor whose rule
        vectorises over frames overrides it (the same result, one call)."""
        picked = [self.select(features[f], budget, f, signals) for f in frames]
        return torch.stack([index for index, _ in picked]), torch.stack([tokens for _, tokens in picked])

    def compress(self, features: torch.Tensor, budgets: list[int], signals: FrameSignals | None = None):
        """features [F, T, D] -> (tokens [sum(budgets), D], kept indices per frame)."""
        _check_budgets(features, budgets)
        frames, tokens_per_frame, _ = features.shape
        signals = signals or FrameSignals()
        chosen: dict[int, tuple] = {}
        partial: dict[int, list[int]] = {}  # budget -> the frames that keep that many of their tokens
        for f, budget in enumerate(budgets):
            if budget == tokens_per_frame:
                chosen[f] = torch.arange(tokens_per_frame), features[f]
            elif budget == 0:
                chosen[f] = torch.zeros(0, dtype=torch.long), features[f, :0]
            else:
                partial.setdefault(budget, []).append(f)
        for budget, group in partial.items():
            index, tokens = self.select_frames(features, group, budget, signals)
            if self.spatial_order:
                index, order = index.sort(dim=1)
                tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
            for f, frame_index, frame_tokens in zip(group, index, tokens):
                chosen[f] = frame_index, frame_tokens
        return torch.cat([chosen[f][1] for f in range(frames)], dim=0), [chosen[f][0].tolist() for f in range(frames)]

    def compress_batch(self, videos: list[tuple[torch.Tensor, list[int], FrameSignals | None]]) -> list[tuple[torch.Tensor, list[list[int]]]]:
        """`compress` on each (features, budgets, signals) of a batch, results in order. A `per_frame`
        compressor runs the frames of all videos as one video, so that each distinct budget is one
        select_frames call for the whole batch; others, or videos of different token grids, one
        video at a time."""
        signals = [s or FrameSignals() for _, _, s in videos]
        kinds = {(tuple(f.shape[1:]), f.dtype, f.device, s.width, s.attention is None, s.metric is None) for (f, _, _), s in zip(videos, signals)}
        if not self.per_frame or len(videos) < 2 or len(kinds) > 1:
            return [self.compress(features, budgets, s) for (features, budgets, _), s in zip(videos, signals)]
        for n, ((features, budgets, _), s) in enumerate(zip(videos, signals)):  # joined, a mistake would name no video
            try:
                _check_budgets(features, budgets)
                for name in ("attention", "metric"):
                    value = getattr(s, name)
                    if value is not None and tuple(value.shape[:2]) != tuple(features.shape[:2]):
                        raise ValueError(f"its {name} is of shape {tuple(value.shape)} for features of {tuple(features.shape[:2])} frames x tokens")
            except ValueError as error:
                raise ValueError(f"video {n} of the batch: {error}") from None
        joint = FrameSignals(*(None if getattr(signals[0], name) is None else torch.cat([getattr(s, name) for s in signals])
                               for name in ("attention", "metric")), width=signals[0].width)
        tokens, kept = self.compress(torch.cat([f for f, _, _ in videos]), [b for _, budgets, _ in videos for b in budgets], joint)
        tokens = tokens.split([sum(budgets) for _, budgets, _ in videos])
        frames = [0, *itertools.accumulate(f.shape[0] for f, _, _ in videos)]
        return [(t, kept[a:b]) for t, a, b in zip(tokens, frames, frames[1:])]

    def __str__(self) -> str:
        return f"{self.name}(retention={self.retention:g})"


def _check_budgets(features: torch.Tensor, budgets: list[int]) -> None:
    frames, tokens_per_frame, _ = features.shape
    if len(budgets) != frames:
        raise ValueError(f"{len(budgets)} budgets for {frames} frames")
    for f, budget in enumerate(budgets):
        if not 0 <= budget <= tokens_per_frame:
            raise ValueError(f"frame {f}: budget {budget} outside 0..{tokens_per_frame}")
