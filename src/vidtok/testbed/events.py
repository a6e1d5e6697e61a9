"""Testbed v2: events that last several frames, objects that span several tokens, and questions
whose answer needs more than one frame.

A video (32 frames of 64 px by default, the v1 cell grid: 16-px cells, one LLM token each for
the toy LLaVA-OV) holds clutter as in v1 (one-cell objects, here in the clutter colours magenta,
cyan, orange, white) and three *events* in the event colours (red, green, blue, yellow), which
appear nowhere else. An event is one shape drawn in a 2x2 block of cells
(4 tokens) at a fixed place for a run of consecutive frames; events follow one another in time
without overlap. One event *changes*: its colour switches to a fourth needle colour part way.
Five kinds of question, one per sample in turn (balanced by construction):

    needle    "what shape is red ?"           the shape of the red event (any of its frames)
    order     "what shape comes after red ?"  the shape of the event that follows red's
    count     "how many frames show red ?"    the red event's length, as a word (two .. six)
    change    "what colour does red turn into ?"  the changing event's second colour
    majority  "what shape is red most often ?"  in these videos every event changes shape from
              frame to frame (4-7 frames, one shape in a strict majority of them); the answer
              needs most of the red event's frames, but few tokens of each: where proportional
              budgets should beat whole keyframes

Only the question tells which frames matter. `evidence` lists the (frame, token) pairs an answer
needs: every frame of the asked event (needle: one suffices; count: all), plus the following
event (order) or the frames after the change (change). `needle_frame`/`needle_token` name the
asked event's first frame and its top-left token, so v1 tools (calibrate, needle survival) apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .synth import CELL, MASKS, RGB
from .vocab import COLOURS, NUMBERS, SHAPES

KINDS = ("needle", "order", "count", "change", "majority")
EVENT_FRAMES = (2, 6)  # an event lasts 2..6 frames
MAJORITY_FRAMES = (4, 7)  # ... or 4..7 in a majority video, so the majority needs several frames
EVENT_COLOURS, CLUTTER_COLOURS = COLOURS[:4], COLOURS[4:]


@dataclass
class EventSample:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    question: str
    answer: str
    kind: str
    needle_frame: int
    needle_token: int
    evidence: list  # [[frame, token], ...] the answer needs
    events: list  # {"colour", "shape", "start", "end", "block": top-left cell, "changes_to", "change_frame"}


def _block_cells(top_left: int, grid: int) -> list[int]:
    r, c = divmod(top_left, grid)
    return [r * grid + c, r * grid + c + 1, (r + 1) * grid + c, (r + 1) * grid + c + 1]


def _draw(video, frame, cell, shape, colour, grid):
    r, c = divmod(cell, grid)
    patch = video[frame, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
    patch[MASKS[shape]] = RGB[colour]


def make_event_sample(rng: np.random.Generator, kind: str, frames: int = 32, size: int = 64, clutter=(4, 8)) -> EventSample:
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    grid = size // CELL
    if grid < 2:
        raise ValueError(f"frames of {size} px hold no 2x2 block of {CELL}-px cells")
    if frames < 3 * EVENT_FRAMES[0] + 2:
        raise ValueError(f"{frames} frames cannot hold three events of >= {EVENT_FRAMES[0]} frames with gaps; use at least {3 * EVENT_FRAMES[0] + 2}")
    # events in the first four colours, clutter in the other four: an event is recognisable token by
    # token, so a 4-layer toy LLM spends no depth finding 2x2 blocks; the question is still needed,
    # since three events hold more tokens than the low budgets
    needle_colours = [EVENT_COLOURS[i] for i in rng.permutation(len(EVENT_COLOURS))]
    clutter_colours = list(CLUTTER_COLOURS)
    low, high = MAJORITY_FRAMES if kind == "majority" else EVENT_FRAMES
    lengths = [int(rng.integers(low, high + 1)) for _ in range(3)]
    while sum(lengths) + 2 > frames:  # short videos: shrink the longest event
        lengths[int(np.argmax(lengths))] -= 1
    gaps = rng.multinomial(frames - sum(lengths) - 2, [0.25] * 4) + np.array([0, 1, 1, 0])  # at least one frame between events
    events, t = [], 0
    changing = int(rng.integers(3))
    for i, length in enumerate(lengths):
        t += int(gaps[i])
        row, col = int(rng.integers(grid - 1)), int(rng.integers(grid - 1))
        event = {"colour": needle_colours[i], "shape": SHAPES[int(rng.integers(len(SHAPES)))], "start": t, "end": t + length - 1,
                 "block": row * grid + col, "changes_to": None, "change_frame": None}
        if i == changing:
            event["changes_to"] = needle_colours[3]
            event["change_frame"] = t + int(rng.integers(1, length))  # first frame in the new colour
        if kind == "majority":  # one shape in a strict majority of the frames, the others anywhere below it
            others = [x for x in SHAPES if x != event["shape"]]
            shapes = [event["shape"]] * (length // 2 + 1) + [others[int(rng.integers(3))] for _ in range(length - length // 2 - 1)]
            event["shapes"] = [shapes[j] for j in rng.permutation(length)]
        events.append(event)
        t += length
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        busy = set()
        for e in events:
            if e["start"] <= f <= e["end"]:
                colour = e["changes_to"] if e["change_frame"] is not None and f >= e["change_frame"] else e["colour"]
                shape = e["shapes"][f - e["start"]] if "shapes" in e else e["shape"]
                for cell in _block_cells(e["block"], grid):
                    _draw(video, f, cell, shape, colour, grid)
                    busy.add(cell)
        free = [c for c in rng.permutation(grid * grid).tolist() if c not in busy]
        for cell in free[: int(rng.integers(clutter[0], clutter[1] + 1))]:
            _draw(video, f, cell, SHAPES[int(rng.integers(len(SHAPES)))], clutter_colours[int(rng.integers(len(clutter_colours)))], grid)

    def frames_of(e, after_change=False):
        first = e["change_frame"] if after_change else e["start"]
        return [[f, cell] for f in range(first, e["end"] + 1) for cell in _block_cells(e["block"], grid)]

    if kind == "change":
        asked = events[changing]
        question, answer = f"what colour does {asked['colour']} turn into ?", asked["changes_to"]
        evidence = frames_of(asked)
    elif kind == "order":
        asked = events[int(rng.integers(2))]  # an event that has a successor
        following = events[events.index(asked) + 1]
        question, answer = f"what shape comes after {asked['colour']} ?", following["shape"]
        evidence = frames_of(asked) + frames_of(following)
    elif kind == "majority":
        asked = [e for e in events if e["change_frame"] is None][int(rng.integers(2))]  # its colour on every frame
        question, answer = f"what shape is {asked['colour']} most often ?", asked["shape"]
        evidence = frames_of(asked)
    else:
        asked = events[int(rng.integers(3))]
        if kind == "needle":
            question, answer = f"what shape is {asked['colour']} ?", asked["shape"]
        else:
            shown = (asked["change_frame"] if asked["change_frame"] is not None else asked["end"] + 1) - asked["start"]
            question, answer = f"how many frames show {asked['colour']} ?", NUMBERS[shown]
        evidence = frames_of(asked)
    if kind in ("needle", "count"):  # only the frames in the asked colour count as evidence
        last = asked["change_frame"] - 1 if asked["change_frame"] is not None else asked["end"]
        evidence = [[f, c] for f, c in evidence if f <= last]
    return EventSample(frames=video, question=question, answer=answer, kind=kind, needle_frame=asked["start"],
                       needle_token=asked["block"], evidence=evidence, events=events)


def event_samples(seed: int, count: int, kinds=KINDS, **kwargs):
    """`count` samples, `kinds` in turn (by default needle, order, count, change, majority, needle, ...)."""
    kinds = tuple(kinds)
    # refused now, before a caller writes anything; none at all would divide by zero below, and an
    # empty item (`--kinds needle,,majority`) is a typo, not a question kind
    if not kinds or "" in kinds:
        problem = f"question kinds {','.join(map(str, kinds))!r} hold an empty kind (a doubled or trailing comma?)" if kinds else "no question kinds given"
        raise ValueError(f"{problem}; give one or more of {', '.join(KINDS)}, comma-separated")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown!r}; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    return (make_event_sample(rng, kinds[i % len(kinds)], **kwargs) for i in range(count))


def write_event_split(out_dir: str | os.PathLike, seed: int, count: int, **kwargs) -> Path:
    """`count` samples as mp4 files plus `questions.jsonl` (with each record's `kind`); returns the JSONL path."""
    from .synth import write_samples

    return write_samples(out_dir, event_samples(seed, count, **kwargs))
