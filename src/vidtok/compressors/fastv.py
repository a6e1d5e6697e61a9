from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Compressor


def fastv_keep(scores: torch.Tensor, lengths: list[int], total: int, budgets: list[int] | None = None) -> list[list[int]]:
    """Which visual tokens FastV keeps: the `total` highest `scores` over all of them (global), or the
    `budgets[f]` highest of each frame's (per frame, DyToK). `scores` [sum(lengths)] are frame-major;
    returns, per frame, the kept positions among that frame's tokens, ascending. Ties go to the
    earlier token (stable sort), identically on every device."""
    if scores.ndim != 1 or scores.numel() != sum(lengths):
        raise ValueError(f"{tuple(scores.shape)} scores for frames of {lengths} tokens")
    scores = scores.float().cpu()
    starts = [sum(lengths[:f]) for f in range(len(lengths))]
    if budgets is None:
        if not 0 <= total <= scores.numel():
            raise ValueError(f"cannot keep {total} of {scores.numel()} visual tokens")
        chosen = torch.sort(scores, descending=True, stable=True).indices[:total].sort().values.tolist()
        kept = [[] for _ in lengths]
        frame = 0
        for index in chosen:
            while index >= starts[frame] + lengths[frame]:
                frame += 1
            kept[frame].append(index - starts[frame])
        return kept
    if len(budgets) != len(lengths) or any(not 0 <= b <= n for b, n in zip(budgets, lengths)):
        raise ValueError(f"budgets {budgets} do not fit frames of {lengths} tokens")
    return [
        torch.sort(scores[s : s + n], descending=True, stable=True).indices[:b].sort().values.tolist()
        for s, n, b in zip(starts, lengths, budgets)
    ]


@dataclass
class FastV(Compressor):
    """FastV inside the LLM: layers 0..layer-1 see every token; at `layer` the visual tokens are ranked
    by the attention the last prompt token pays them at layer-1 (softmax over all keys, mean over
    heads) and the lowest are physically dropped for every later layer (and from their KV cache).

    Alone: the top round(retention * visual tokens) over the whole video. Inside DyToK: the top
    b_f of each frame, b_f from the guide's prior (an assistant, self, or "inline": the main model's
    own attention in layers below `layer` of the same prefill).
    """

    layer: int = field(default=2, metadata={"help": "K: the first LLM layer that runs on the kept tokens only (1..L-1)"})
    name: ClassVar[str] = "fastv"
    side: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"FastV's layer must be a whole number >= 1 (the LLM layer where tokens are dropped), got {self.layer!r}")

    def select(self, features, budget, frame, signals):
        raise TypeError("FastV drops tokens inside the LLM; run it through vidtok.generate / vidtok.prepare")

    def __str__(self) -> str:
        return f"fastv(retention={self.retention:g}, layer={self.layer})"
