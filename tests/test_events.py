"""Testbed v2: every answer re-derived from the rendered pixels by a labeller written here (not
the generator's bookkeeping), question kinds balanced, and the question alone not giving the answer."""

from collections import Counter

import numpy as np
import pytest

from vidtok.testbed.events import KINDS, NUMBERS, event_samples, make_event_sample, write_event_split
from vidtok.testbed.synth import CELL, MASKS, RGB
from vidtok.testbed.toy import COLOURS, SHAPES

from helpers import wording_guess_hits


def label_frames(frames):
    """(colour, shape) or None per frame and 16-px cell, read off the pixels: the cell's lit pixels
    must be one palette colour and lie exactly on one shape's mask."""
    out = []
    size = frames.shape[1]
    grid = size // CELL
    for frame in frames:
        cells = []
        for cell in range(grid * grid):
            r, c = divmod(cell, grid)
            patch = frame[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].astype(int)
            lit = patch.sum(-1) > 0
            if not lit.any():
                cells.append(None)
                continue
            colours = {tuple(p) for p in patch[lit]}
            assert len(colours) == 1, "one colour per cell"
            (rgb_seen,) = colours
            colour = next(name for name, rgb in RGB.items() if tuple(rgb) == rgb_seen)
            shape = next(name for name, mask in MASKS.items() if np.array_equal(mask, lit))
            cells.append((colour, shape))
        out.append(cells)
    return out


def solve(question, labels, grid=4):
    """The answer from the labelled frames alone. An event colour is one that only ever appears
    as a 2x2 block of one shape per frame (clutter colours also appear in single cells)."""
    def blocks(frame_cells):
        found = {}
        for r in range(grid - 1):
            for c in range(grid - 1):
                quad = [frame_cells[(r + dr) * grid + c + dc] for dr in (0, 1) for dc in (0, 1)]
                if all(q is not None and q == quad[0] for q in quad):
                    found.setdefault(quad[0][0], (quad[0][1], r * grid + c))
        return found

    per_frame = [blocks(cells) for cells in labels]
    clutter = set()
    for cells, found in zip(labels, per_frame):
        covered = {b + d for _, b in found.values() for d in (0, 1, grid, grid + 1)}
        clutter |= {cell[0] for i, cell in enumerate(cells) if cell is not None and i not in covered}
    per_frame = [{k: v for k, v in found.items() if k not in clutter} for found in per_frame]
    words = question.split()
    colour = next(w for w in words if w in COLOURS)
    frames_with = [f for f, found in enumerate(per_frame) if colour in found]
    assert frames_with, f"{colour} is never shown as an event"
    last, (shape, block) = frames_with[-1], per_frame[frames_with[-1]][colour]
    if words[-3:] == ["most", "often", "?"]:
        shapes = Counter(per_frame[f][colour][0] for f in frames_with)
        (top, n), *rest = shapes.most_common()
        assert n > len(frames_with) / 2, "one shape in a strict majority of the frames"
        return top
    if words[:3] == ["what", "shape", "is"]:
        return shape
    if words[:3] == ["how", "many", "frames"]:
        return NUMBERS[len(frames_with)]
    if words[:3] == ["what", "colour", "does"]:
        turned = [k for k, (s, where) in per_frame[last + 1].items() if where == block and s == shape]
        assert len(turned) == 1
        return turned[0]
    if words[:3] == ["what", "shape", "comes"]:
        f = last + 1
        while f < len(per_frame) and any(where == block and s == shape for s, where in per_frame[f].values()):
            f += 1  # the asked event continuing in its new colour is not the next event
        for f in range(f, len(per_frame)):
            if per_frame[f]:
                return next(iter(per_frame[f].values()))[0]
        raise AssertionError("no event after the asked one")
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_rendered_frames():
    for sample in event_samples(seed=5, count=80):
        labels = label_frames(sample.frames)
        assert solve(sample.question, labels) == sample.answer, (sample.kind, sample.question)
        # the evidence tokens hold the asked event (in its colour, or its new colour for a change)
        for frame, token in sample.evidence:
            assert labels[frame][token] is not None


def test_question_kinds_are_balanced_and_answers_spread():
    samples = list(event_samples(seed=11, count=400))
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == set(KINDS) and max(kinds.values()) - min(kinds.values()) == 0
    for kind in KINDS:
        answers = Counter(s.answer for s in samples if s.kind == kind)
        choices = {"needle": SHAPES, "order": SHAPES, "change": COLOURS, "count": NUMBERS, "majority": SHAPES}[kind]
        assert set(answers) <= set(choices)
        assert max(answers.values()) / sum(answers.values()) < 0.45, (kind, answers)  # no answer dominates a kind


def test_the_question_text_does_not_give_the_answer():
    """No leakage through the wording: over many samples, the best guess per question string (the
    majority answer among training samples with the same question) is near chance on new samples."""
    per_kind = wording_guess_hits(event_samples(seed=21, count=2000), event_samples(seed=22, count=400))
    hits = [hit for kind_hits in per_kind.values() for hit in kind_hits]
    assert len(hits) > 300
    # chance: 1/4 for shapes, about 1/5 for counts, 1/3 for colours (the three other event colours); a leak would sit far above
    assert sum(hits) / len(hits) < 0.4


def test_events_span_several_tokens_and_frames_and_the_split_is_written(tmp_path):
    sample = make_event_sample(np.random.default_rng(0), "count")
    assert sample.frames.shape == (32, 64, 64, 3)
    for event in sample.events:
        assert event["end"] - event["start"] + 1 >= 2
    assert len({f for f, _ in sample.evidence}) >= 2 and len({t for _, t in sample.evidence}) == 4  # 2x2 cells
    path = write_event_split(tmp_path / "v2", seed=3, count=10)
    from vidtok.testbed.synth import read_split

    records = read_split(path)
    assert [r["kind"] for r in records] == list(KINDS) * 2 and all(r["frames"] == 32 for r in records)
    with pytest.raises(ValueError, match="cannot hold three events"):
        make_event_sample(np.random.default_rng(0), "needle", frames=6)
    chosen = read_split(write_event_split(tmp_path / "two", seed=3, count=4, kinds=("needle", "majority")))
    assert [r["kind"] for r in chosen] == ["needle", "majority"] * 2
    with pytest.raises(ValueError, match="unknown question kinds"):
        list(event_samples(seed=0, count=1, kinds=("tally",)))


def test_majority_events_change_shape_with_one_shape_in_most_frames():
    for sample in event_samples(seed=8, count=40, kinds=("majority",)):
        for event in sample.events:
            shapes = Counter(event["shapes"])
            length = event["end"] - event["start"] + 1
            assert len(event["shapes"]) == length and 4 <= length <= 7
            assert shapes[event["shape"]] == length // 2 + 1  # the smallest strict majority: every frame counts
        frames = {f for f, _ in sample.evidence}
        asked = next(e for e in sample.events if e["start"] == sample.needle_frame)
        assert frames == set(range(asked["start"], asked["end"] + 1)) and asked["change_frame"] is None


def test_eval_reports_accuracy_and_evidence_per_kind(tmp_path, capsys):
    from vidtok.cli import main

    path = write_event_split(tmp_path / "v2", seed=4, count=10, frames=16)
    out = tmp_path / "eval"
    assert main(["eval", str(path.parent), "--methods", "visionzip,keyframe", "--guides", "none,assistant", "--retentions", "0.25",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy by question kind" in printed and all(k in printed for k in KINDS)
    import json

    summaries = json.loads((out / "summary.json").read_text())
    assert {(s["method"], s["guide"]) for s in summaries} == {("full", "none"), ("visionzip", "none"), ("visionzip", "assistant"),
                                                              ("keyframe", "assistant")}  # keyframe needs a guide
    for s in summaries:
        assert sorted(s["by_kind"]) == sorted(KINDS) and all(k["samples"] == 2 for k in s["by_kind"].values())
        assert sum(k["accuracy"] * 2 for k in s["by_kind"].values()) == pytest.approx(s["accuracy"] * 10)
    full = next(s for s in summaries if s["method"] == "full")
    assert all(k["evidence_kept"] == 1.0 for k in full["by_kind"].values())
    assert (out / "accuracy_by_kind.png").read_bytes()[:4] == b"\x89PNG"


def test_synth_writes_the_chosen_kinds_and_refuses_them_for_v1(tmp_path, capsys):
    from vidtok.cli import main
    from vidtok.testbed.synth import read_split

    assert main(["synth", str(tmp_path / "v2"), "--task", "events", "--kinds", "majority,needle", "--count", "3", "--frames", "16"]) == 0
    assert [r["kind"] for r in read_split(tmp_path / "v2")] == ["majority", "needle", "majority"]
    assert main(["synth", str(tmp_path / "v1"), "--kinds", "needle", "--count", "1"]) != 0
    assert "--kinds picks testbed v2's question kinds" in capsys.readouterr().err
