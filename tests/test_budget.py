import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtok import allocate_budgets, total_budget


def reference_allocate(weights, total, cap, floor=0):
    """Slow and literal: give tokens one at a time to whoever is furthest below its exact share."""
    frames = len(weights)
    mass = sum(weights)
    shares = [w / mass for w in weights] if mass > 0 else [1 / frames] * frames
    spread = total - frames * floor
    budgets = [0] * frames
    exact = [s * spread for s in shares]
    base = [math.floor(a) for a in exact]
    # largest-remainder rounding, counted out token by token
    budgets = list(base)
    order = sorted(range(frames), key=lambda f: (-(exact[f] - base[f]), f))
    i = 0
    while sum(budgets) < spread:
        budgets[order[i]] += 1
        i += 1
    budgets = [b + floor for b in budgets]
    caps = list(cap) if isinstance(cap, list) else [cap] * frames
    excess = 0
    for f in range(frames):
        if budgets[f] > caps[f]:
            excess += budgets[f] - caps[f]
            budgets[f] = caps[f]
    ranked = sorted(range(frames), key=lambda f: (-shares[f], f))
    while excess > 0:
        for f in ranked:
            if excess > 0 and budgets[f] < caps[f]:
                budgets[f] += 1
                excess -= 1
    return budgets


def test_spec_outlier_example():
    assert allocate_budgets([0.999, 0.0003, 0.0003, 0.0004], 196, 196) == [196, 0, 0, 0]


def test_even_split_spreads_remainder_to_earliest_frames():
    assert allocate_budgets([1, 1, 1, 1], 10, 16) == [3, 3, 2, 2]


def test_cap_redistributes_by_weight():
    # exact shares 28, 4, 6, 2; frame 0 is capped at 16 and its 12 spare tokens go round-robin
    # to frames 2, 1, 3 (by descending weight): +4 each
    assert allocate_budgets([0.7, 0.1, 0.15, 0.05], 40, 16) == [16, 8, 10, 6]


def test_floor_keeps_every_frame():
    assert allocate_budgets([1, 0, 0], 5, 4, floor=1) == [3, 1, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (([1, 1], 33, 16), "exceeds"),
        (([1, 1], 3, 16, 2), "below"),
        (([], 3, 16), "no frames"),
        (([1, -1], 3, 16), ">= 0"),
        (([1, float("nan")], 3, 16), "finite"),
        (([1, 1], 3, 2, 3), "floor"),
        (([1, 1], 2.5, 16), "total"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        allocate_budgets(*args)


@pytest.mark.parametrize("retention", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_retention_outside_unit_interval(retention):
    with pytest.raises(ValueError, match="retention"):
        total_budget(retention, 4, 16)


def test_total_budget_rounds_half_up():
    assert total_budget(0.25, 32, 196) == 1568
    assert total_budget(0.5, 1, 5) == 3  # 2.5 -> 3 (round() would give 2)
    assert total_budget(0.5, 1, 9) == 5  # 4.5 -> 5 (round() would give 4)


@st.composite
def problems(draw):
    frames = draw(st.integers(1, 12))
    cap = draw(st.integers(1, 20))
    floor = draw(st.integers(0, cap))
    total = draw(st.integers(frames * floor, frames * cap))
    weights = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=frames, max_size=frames))
    return weights, total, cap, floor


@settings(max_examples=400, deadline=None)
@given(problems())
def test_properties_and_reference(problem):
    weights, total, cap, floor = problem
    budgets = allocate_budgets(weights, total, cap, floor)
    assert sum(budgets) == total
    assert all(floor <= b <= cap for b in budgets)
    assert all(isinstance(b, int) for b in budgets)
    assert budgets == reference_allocate(weights, total, cap, floor)
    assert budgets == allocate_budgets(list(weights), total, cap, floor)  # deterministic


@settings(max_examples=200, deadline=None)
@given(problems())
def test_heavier_frame_never_gets_fewer_tokens(problem):
    weights, total, cap, floor = problem
    budgets = allocate_budgets(weights, total, cap, floor)
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j] and sum(weights) > 0:
                assert budgets[i] >= budgets[j] - 1  # largest-remainder rounding differs by one at most


@st.composite
def capped_problems(draw):
    frames = draw(st.integers(1, 10))
    caps = draw(st.lists(st.integers(0, 20), min_size=frames, max_size=frames))
    floor = draw(st.integers(0, min(caps)))
    total = draw(st.integers(frames * floor, sum(caps)))
    weights = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=frames, max_size=frames))
    return weights, total, caps, floor


@settings(max_examples=300, deadline=None)
@given(capped_problems())
def test_per_frame_caps_match_the_reference(problem):
    # what FastV does after an encoder stage: each frame capped at what the encoder left of it
    weights, total, caps, floor = problem
    budgets = allocate_budgets(weights, total, caps, floor)
    assert sum(budgets) == total and all(floor <= b <= c for b, c in zip(budgets, caps))
    assert budgets == reference_allocate(weights, total, caps, floor)


def test_per_frame_caps_are_checked():
    with pytest.raises(ValueError, match="per-frame caps"):
        allocate_budgets([1, 1, 1], 10, [5, 5, 5, 5])
    with pytest.raises(ValueError, match="exceeds 2 frames with their per-frame caps = 7"):
        allocate_budgets([1, 1], 8, [3, 4])


def test_weights_beyond_float_range_are_split_by_their_ratios():
    """Python ints (and Fractions) may exceed a float; only the ratios of the weights matter."""
    from fractions import Fraction

    assert allocate_budgets([10**400, 1], 3, 4) == [3, 0]
    assert allocate_budgets([10**400, 10**400, 0], 4, 4) == [2, 2, 0]
    assert allocate_budgets([10**400, 3 * 10**400], 4, 4) == [1, 3]
    assert allocate_budgets([Fraction(10**400, 3), 10**399], 5, 4) == allocate_budgets([10, 3], 5, 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_budgets([-(10**400), 1], 3, 4)


def test_keyframe_budgets_keep_whole_top_frames():
    from vidtok.budget import keyframe_budgets

    weights = [0.1, 0.4, 0.05, 0.3, 0.15]
    assert keyframe_budgets(weights, 8, 4) == [0, 4, 0, 4, 0]  # the two heaviest frames, whole
    assert keyframe_budgets(weights, 10, 4) == [0, 4, 0, 4, 2]  # the third keeps what is left
    assert keyframe_budgets([1, 1, 1], 4, 2) == [2, 2, 0]  # ties: earlier frame first
    assert keyframe_budgets(weights, 6, [4, 2, 4, 4, 4]) == [0, 2, 0, 4, 0]  # per-frame caps
    for total in range(0, 21):
        budgets = keyframe_budgets(weights, total, 4)
        assert sum(budgets) == total and sum(0 < b < 4 for b in budgets) <= 1
    with pytest.raises(ValueError, match="must be a whole number in 0..20"):
        keyframe_budgets(weights, 21, 4)


def test_binary_dytok_selects_whole_frames_by_the_guides_weights():
    from vidtok import DyToK, VisionZip, generate
    from vidtok.compressors import build_method
    from vidtok.testbed.toy import load_default

    model, tokenizer, assistant, _ = load_default()
    from vidtok.testbed.toy import default_question, default_video

    method = DyToK(VisionZip(0.25), guide=assistant, allocation="binary")
    plan = generate(model, tokenizer, default_video(), default_question(), method, frames=16, max_new_tokens=1).plan
    order = sorted(range(16), key=lambda f: (-plan.frame_weights[f], f))
    assert sorted(plan.budgets, reverse=True)[:4] == [16] * 4 and sum(plan.budgets) == 64
    assert [plan.budgets[f] for f in order[:4]] == [16] * 4 and all(plan.budgets[f] == 0 for f in order[4:])
    assert "allocation=binary" in str(build_method("keyframe", 0.25, "assistant", assistant))
    with pytest.raises(ValueError, match="keyframe picks frames by a guide"):
        build_method("keyframe", 0.25, "none")
    with pytest.raises(ValueError, match="floor does not apply"):
        DyToK(VisionZip(0.25), allocation="binary", floor=1)
