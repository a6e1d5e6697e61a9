"""Synthetic, query-conditioned video QA: the testbed where the keyframe prior can be measured.

Every frame holds clutter objects (shapes in "clutter" colours); a few *needles* in colours that
appear exactly once in the whole video sit in different frames. The question names one needle
colour ("what shape is red ?"), so only the question tells which frame matters: no
query-agnostic method can know. Objects are 16x16 px, aligned to one cell of the 4x4 token grid
a 64-px frame becomes in LLaVA-OneVision (8-px patches, pooled 2x), so each needle is one token.

With `scene=k` the clutter persists: it is drawn once per run of k frames and repeated unchanged,
and a needle replaces one clutter object in its frame only. Neighbouring frames then repeat most of
their tokens (what temporal merging removes), while the needle is the one token that changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .vocab import COLOURS, SHAPES

RGB = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "magenta": (230, 40, 220),
    "cyan": (40, 230, 230),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
CELL = 16


def _masks() -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    return {
        "circle": (x - c) ** 2 + (y - c) ** 2 <= 6.5**2,
        "square": (np.abs(x - c) <= 5.5) & (np.abs(y - c) <= 5.5),
        "triangle": (y >= 2) & (y <= 14) & (np.abs(x - c) <= (y - 2) * 0.55),
        "cross": ((np.abs(x - c) <= 2) | (np.abs(y - c) <= 2)) & (np.abs(x - c) <= 7) & (np.abs(y - c) <= 7),
    }


MASKS = _masks()


@dataclass
class Sample:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    question: str
    answer: str
    needle_frame: int  # frame of the asked-about needle
    needle_token: int  # its cell in the frame's token grid (row-major)
    needles: list  # every needle: {"colour", "shape", "frame", "token"}
    labels: np.ndarray | None = None  # int [F, cells, 2]: (colour + 1, shape + 1) per cell, 0 = empty


def make_sample(rng: np.random.Generator, frames: int = 16, size: int = 64, needles: int = 2, clutter=(6, 10), scene: int = 1) -> Sample:
    grid = size // CELL
    cells = grid * grid
    if needles > len(COLOURS) - 1 or needles > frames:
        raise ValueError(f"{needles} needles need distinct frames and colours")
    if isinstance(scene, bool) or not isinstance(scene, int) or scene < 1:
        raise ValueError(f"scene must be a whole number of frames >= 1, got {scene!r}")
    colours = rng.permutation(len(COLOURS))
    needle_colours = [COLOURS[i] for i in colours[:needles]]
    clutter_colours = [COLOURS[i] for i in colours[needles:]]
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    needle_frames = rng.choice(frames, size=needles, replace=False)
    placed = []
    labels = np.zeros((frames, cells, 2), dtype=np.int64)
    layout = []
    for f in range(frames):
        hosting = [i for i in range(needles) if needle_frames[i] == f]
        if scene == 1:  # v1's draw, unchanged: a needle takes one of the frame's first slots
            count = int(rng.integers(clutter[0], clutter[1] + 1))
            slots = rng.permutation(cells)[:count]
            objects = [None] * len(slots)
        else:
            if f % scene == 0:  # a new scene: its clutter, kept for `scene` frames
                count = int(rng.integers(clutter[0], clutter[1] + 1))
                scene_slots = rng.permutation(cells)[:count]
                layout = [(clutter_colours[int(rng.integers(len(clutter_colours)))], SHAPES[int(rng.integers(len(SHAPES)))]) for _ in scene_slots]
            slots = scene_slots
            if hosting:  # the needles replace randomly chosen objects of this frame only
                order = rng.permutation(len(slots))
                slots = np.concatenate([slots[order[: len(hosting)]], np.delete(slots, order[: len(hosting)])])
                objects = [None] * len(hosting) + [layout[i] for i in np.delete(np.arange(len(layout)), order[: len(hosting)])]
            else:
                objects = list(layout)
        for k, slot in enumerate(slots):
            if k < len(hosting):
                colour, shape = needle_colours[hosting[k]], SHAPES[int(rng.integers(len(SHAPES)))]
                placed.append({"colour": colour, "shape": shape, "frame": f, "token": int(slot), "index": hosting[k]})
            elif objects[k] is not None:
                colour, shape = objects[k]
            else:
                colour = clutter_colours[int(rng.integers(len(clutter_colours)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
            labels[f, slot] = (COLOURS.index(colour) + 1, SHAPES.index(shape) + 1)
            r, c = divmod(int(slot), grid)
            patch = video[f, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            patch[MASKS[shape]] = RGB[colour]
    placed.sort(key=lambda n: n.pop("index"))
    asked = placed[int(rng.integers(needles))]
    return Sample(
        frames=video,
        question=f"what shape is {asked['colour']} ?",
        answer=asked["shape"],
        needle_frame=asked["frame"],
        needle_token=asked["token"],
        needles=placed,
        labels=labels,
    )


def samples(seed: int, count: int, **kwargs):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield make_sample(rng, **kwargs)


def write_split(out_dir: str | os.PathLike, seed: int, count: int, **kwargs) -> Path:
    """Write `count` samples as mp4 files plus `questions.jsonl`; returns the JSONL path."""
    return write_samples(out_dir, samples(seed, count, **kwargs))


def write_samples(out_dir: str | os.PathLike, generated) -> Path:
    """Samples (dataclasses with `frames`) as mp4 files plus `questions.jsonl`: every field but the
    frames (and per-cell training labels) goes into the record; returns the JSONL path."""
    from ..video import write_video

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(generated):
        name = f"videos/{i:05d}.mp4"
        write_video(out / name, sample.frames)
        record = {k: v for k, v in asdict(sample).items() if k not in ("frames", "labels")}
        lines.append(json.dumps({"id": i, "video": name, "frames": len(sample.frames), **record}))
    path = out / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_split(jsonl: str | os.PathLike) -> list[dict]:
    """Records of a split; `video` resolved against the JSONL's folder."""
    jsonl = Path(jsonl)
    if jsonl.is_dir():
        jsonl = jsonl / "questions.jsonl"
    if not jsonl.is_file():
        raise ValueError(f"no split at {jsonl}; write one with `vidtok synth OUT_DIR`")
    records = []
    for n, line in enumerate(jsonl.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{jsonl}:{n} is not valid JSON ({error}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{jsonl}:{n} is not a JSON object; each line holds one question record")
            for key in ("video", "question", "answer"):
                if key not in record:
                    raise ValueError(f"{jsonl}:{n} lacks {key!r}")
            if not isinstance(record["video"], str) or not record["video"].strip():
                raise ValueError(f"{jsonl}:{n}: 'video' must be a string (the video's path, relative to the split's folder), got {record['video']!r}")
            record["video"] = str(jsonl.parent / record["video"])
            records.append(record)
    return records
