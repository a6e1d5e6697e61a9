"""SegmentMerge: checked against a slow reference written from the rule, by hand on small cases,
and through the pipeline on the tiny LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL models."""

import math

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from vidtok import DyToK, FrameSignals, generate, prepare
from vidtok.compressors.segmerge import SegmentMerge, segment_starts
from vidtok.testbed.toy import build_qwen3_toy_model, build_qwen_toy_model, build_tokenizer

from helpers import assert_unchanged, snapshot

Q = "what shape is red ?"


# the rule, written out with plain loops (float64), independently of the tensor code ------------

def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else max(-1.0, min(1.0, dot / (na * nb)))


def slow_segmerge(features, budgets, attention, width, threshold, segment_threshold, min_segments, spatial_merge, spatial_order):
    """Returns (kept, tokens [sum(budgets), D] float64, margins, merge counts). `margins`: how far every
    decision was from flipping (a test skips inputs where float32 rounding could flip one)."""
    units, count = features.shape[:2]
    x = features.double().tolist()
    seen = [[token[:width] for token in unit] for unit in x]
    margins = [1.0]

    # segments: a unit opens one when its mean token is far from the previous unit's, or the pair is among the least similar
    start = [u == 0 for u in range(units)]
    if units > 1:
        means = [[sum(seen[u][t][d] for t in range(count)) / count for d in range(width)] for u in range(units)]
        pair = [cosine(means[u], means[u + 1]) for u in range(units - 1)]
        for u in range(units - 1):
            margins.append(abs(pair[u] - segment_threshold))
            if pair[u] < segment_threshold:
                start[u + 1] = True
        ranked = sorted(range(units - 1), key=lambda u: (pair[u], u))
        k = min(min_segments - 1, units - 1)
        for u in ranked[:k]:
            start[u + 1] = True
        if 0 < k < units - 1:
            margins.append(pair[ranked[k]] - pair[ranked[k - 1]])

    # a token repeats the one at its position one unit earlier, within a segment
    sim = [[None] * count for _ in range(units)]
    redundant = [[False] * count for _ in range(units)]
    for u in range(1, units):
        if not start[u]:
            for t in range(count):
                sim[u][t] = cosine(seen[u][t], seen[u - 1][t])
                margins.append(abs(sim[u][t] - threshold))
                redundant[u][t] = sim[u][t] > threshold

    # which tokens a unit keeps, and in which order
    kept = []
    for u in range(units):
        new = sorted((t for t in range(count) if not redundant[u][t]), key=lambda t: (-float(attention[u][t]), t))
        repeats = sorted((t for t in range(count) if redundant[u][t]), key=lambda t: (sim[u][t], t))
        values = sorted(sim[u][t] for t in repeats)
        margins += [b - a for a, b in zip(values, values[1:])]
        chosen = (new + repeats)[: budgets[u]]
        kept.append(sorted(chosen) if spatial_order else chosen)

    # where each dropped token goes
    members = {(u, t): [] for u in range(units) for t in kept[u]}
    merges = {"temporal": 0, "spatial": 0, "lost": 0}
    for u in range(units):
        for t in range(count):
            if t in kept[u]:
                continue
            home = None
            if redundant[u][t]:  # walk back along the repeats to the nearest kept occurrence
                v = u - 1
                while home is None:
                    if t in kept[v]:
                        home = (v, t)
                    elif redundant[v][t]:
                        v -= 1
                    else:
                        break
            if home is not None:
                merges["temporal"] += 1
            elif spatial_merge and kept[u]:
                scored = sorted(((cosine(seen[u][t], seen[u][k]), -k) for k in kept[u]), reverse=True)
                if len(scored) > 1:
                    margins.append(scored[0][0] - scored[1][0])
                home = (u, -scored[0][1])
                merges["spatial"] += 1
            else:
                merges["lost"] += 1
            if home is not None:
                members[home].append(x[u][t])

    rows = []
    for u in range(units):
        for t in kept[u]:
            group = [x[u][t]] + members[(u, t)]
            rows.append([sum(column) / len(group) for column in zip(*group)])
    tokens = torch.tensor(rows, dtype=torch.float64).reshape(-1, features.shape[2])
    return kept, tokens, min(margins), merges


def video(seed, units, count, channels, repeat, noise, companions=0):
    """Random tokens where each token repeats (with noise) the one at its position in the previous unit
    with probability `repeat`; `companions` extra channels ride along, unrelated to the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(units, count, channels, generator=g)
    for u in range(1, units):
        copy = torch.rand(count, generator=g) < repeat
        x[u, copy] = x[u - 1, copy] + noise * torch.randn(int(copy.sum()), channels, generator=g)
    attention = torch.randint(0, 3, (units, count), generator=g).float()  # few values: ties to break
    return torch.cat([x, 3 * torch.randn(units, count, companions, generator=g)], dim=-1), attention


@st.composite
def cases(draw, max_units=6, max_tokens=10):
    units, count = draw(st.integers(1, max_units)), draw(st.integers(1, max_tokens))
    budget = st.one_of(st.integers(0, count), st.integers(0, count), st.just(0), st.just(count))  # half partial units
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), units=units, count=count, channels=draw(st.integers(2, 6)),
        companions=draw(st.sampled_from([0, 0, 3])), repeat=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        noise=draw(st.sampled_from([0.05, 0.2, 0.6])), budgets=draw(st.lists(budget, min_size=units, max_size=units)),
        threshold=draw(st.sampled_from([0.5, 0.8, 0.95])), segment_threshold=draw(st.sampled_from([-1.0, -1.0, 0.5, 0.9, 0.99])),
        min_segments=draw(st.one_of(st.just(1), st.integers(1, units + 1))), spatial_merge=draw(st.booleans()),
        spatial_order=draw(st.booleans()),
    )


def run_both(case):
    features, attention = video(case["seed"], case["units"], case["count"], case["channels"], case["repeat"], case["noise"],
                                case["companions"])
    params = {k: case[k] for k in ("threshold", "segment_threshold", "min_segments", "spatial_merge", "spatial_order")}
    method = SegmentMerge(0.5, **params)
    tokens, kept = method.compress(features, case["budgets"], FrameSignals(attention=attention, width=case["channels"]))
    expected = slow_segmerge(features, case["budgets"], attention.tolist(), case["channels"], **params)
    return tokens, kept, expected


@settings(max_examples=500, deadline=None)
@given(cases())
def test_equals_the_slow_reference(case):
    tokens, kept, (expected_kept, expected_tokens, margin, merges) = run_both(case)
    assume(margin > 1e-5)  # no decision within float32 rounding of flipping
    for kind, count in merges.items():
        event(f"{kind} merges: {'some' if count else 'none'}")
    assert kept == expected_kept
    assert tokens.dtype == torch.float32
    assert torch.allclose(tokens.double(), expected_tokens, atol=1e-6, rtol=1e-6)


def test_engineered_repeats_merge_and_still_equal_the_reference():
    """Frames copied with noise: repeats are merged into earlier units, and the result is the reference's."""
    totals = {"temporal": 0, "spatial": 0, "lost": 0}
    changed = 0
    for seed in range(12):
        case = dict(seed=seed, units=5, count=9, channels=4, companions=2, repeat=0.8, noise=0.1, budgets=[5, 2, 0, 9, 3],
                    threshold=0.8, segment_threshold=-1.0, min_segments=1, spatial_merge=True, spatial_order=True)
        tokens, kept, (expected_kept, expected_tokens, margin, merges) = run_both(case)
        if margin <= 1e-5:
            continue
        assert kept == expected_kept
        assert torch.allclose(tokens.double(), expected_tokens, atol=1e-6, rtol=1e-6)
        features, _ = video(seed, 5, 9, 4, 0.8, 0.1, 2)
        raw = torch.cat([features[u, k] for u, k in enumerate(kept)])
        changed += int((~torch.isclose(tokens, raw)).any(dim=1).sum())
        totals = {k: totals[k] + merges[k] for k in totals}
    assert totals["temporal"] > 20 and totals["spatial"] > 5 and totals["lost"] > 0
    assert changed > 20


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_unit_keeps_exactly_its_budget(data):
    units, count = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 40))
    budgets = data.draw(st.lists(st.one_of(st.integers(0, count), st.just(0), st.just(count)), min_size=units, max_size=units))
    assume(sum(budgets) > 0)
    seed = data.draw(st.integers(0, 2**31 - 1))
    features, attention = video(seed, units, count, 5, 0.7, 0.1)
    order = data.draw(st.booleans())
    method = SegmentMerge(0.3, min_segments=data.draw(st.integers(1, 4)), spatial_order=order)
    tokens, kept = method.compress(features, budgets, FrameSignals(attention=attention))
    assert [len(k) for k in kept] == budgets
    assert tokens.shape == (sum(budgets), 5)
    for k in kept:
        assert len(set(k)) == len(k) and all(0 <= i < count for i in k)
        if order:
            assert k == sorted(k)


# small cases by hand ---------------------------------------------------------------------------

A, B, C = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
A1, A2, B1, C1 = [1.0, 0.1, 0.0], [1.0, 0.1, 0.1], [0.1, 1.0, 0.0], [0.1, 0.0, 1.0]
ONE_SEGMENT = dict(segment_threshold=-1.0, min_segments=1)


def test_repeats_join_the_earliest_kept_occurrence_across_a_unit_that_keeps_nothing():
    features = torch.tensor([[A, B], [A1, B1], [A2, C]])
    tokens, kept = SegmentMerge(0.5, **ONE_SEGMENT).compress(features, [2, 0, 1], FrameSignals(attention=torch.zeros(3, 2)))
    assert kept == [[0, 1], [], [1]]  # unit 2 keeps its new token C before its repeat A2
    expected = torch.tensor([[(a + a1 + a2) / 3 for a, a1, a2 in zip(A, A1, A2)], [(b + b1) / 2 for b, b1 in zip(B, B1)], C])
    assert torch.allclose(tokens, expected)


def test_a_repeat_whose_chain_reaches_no_kept_token_is_lost_or_merged_in_its_own_unit():
    features = torch.tensor([[A, B], [A1, C], [A2, C1]])
    attention = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    tokens, kept = SegmentMerge(0.5, **ONE_SEGMENT).compress(features, [1, 0, 2], FrameSignals(attention=attention))
    # unit 0 keeps B (more attended) and A joins it; unit 1 keeps nothing: A1's chain starts at a dropped
    # token, C is new: both lost; unit 2 keeps everything, nothing later joins it
    assert kept == [[1], [], [0, 1]]
    assert torch.allclose(tokens, torch.tensor([[0.5, 0.5, 0.0], A2, C1]))
    pruned = SegmentMerge(0.5, spatial_merge=False, **ONE_SEGMENT)
    tokens, _ = pruned.compress(features, [1, 0, 2], FrameSignals(attention=attention))
    assert torch.allclose(tokens, torch.tensor([B, A2, C1]))


def test_a_segment_cut_stops_temporal_merging():
    features = torch.tensor([[A, B], [A1, B1], [A2, C]])
    attention = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 1.0]])
    method = SegmentMerge(0.5, segment_threshold=-1.0, min_segments=3)  # every neighbour pair cut
    tokens, kept = method.compress(features, [2, 0, 1], FrameSignals(attention=attention))
    assert kept == [[0, 1], [], [0]]  # unit 2: nothing repeats, A2 is the more attended; C joins it
    assert torch.allclose(tokens, torch.tensor([A, B, [(a + c) / 2 for a, c in zip(A2, C)]]))


def test_ranking_new_tokens_by_attention_then_repeats_least_similar_first_ties_to_the_lower_index():
    g = torch.Generator().manual_seed(3)
    first = torch.randn(6, 4, generator=g)
    second = first.clone()
    second[[1, 4]] += torch.tensor([[0.3] * 4, [0.05] * 4])  # repeats, 1 less similar than 0, 2, 3, 5 (exact copies)
    second[[0, 3]] = torch.randn(2, 4, generator=g)  # new tokens
    features = torch.stack([first, second])
    attention = torch.tensor([[0.0] * 6, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # 0 and 3 tie
    method = SegmentMerge(0.5, spatial_order=False, threshold=0.9, **ONE_SEGMENT)
    _, kept = method.compress(features, [6, 4], FrameSignals(attention=attention))
    assert kept[1][:3] == [0, 3, 1]  # new first (tie to the lower index), then the least similar repeat
    _, kept = SegmentMerge(0.5, threshold=0.9, **ONE_SEGMENT).compress(features, [6, 3], FrameSignals(attention=attention))
    assert kept[1] == [0, 1, 3]


def test_a_dropped_token_equally_close_to_two_kept_ones_joins_the_lower_index():
    features = torch.tensor([[B, A, A, C]])
    attention = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    tokens, kept = SegmentMerge(0.5).compress(features, [2], FrameSignals(attention=attention))
    assert kept == [[1, 2]]  # B and C are orthogonal to A: both tie between 1 and 2
    assert torch.allclose(tokens, torch.tensor([[1 / 3, 1 / 3, 1 / 3], A]))


def test_segments_cut_below_the_threshold_and_at_the_least_similar_pairs():
    degrees = torch.tensor([0.0, 5.0, 40.0, 43.0, 60.0, 60.0])  # neighbour cosines .996, .819, .999, .956, 1
    means = torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))], dim=1)
    features = means[:, None, :].expand(-1, 3, -1)  # the mean token of unit u is means[u]
    starts = lambda t, c: segment_starts(features, t, c).tolist()  # noqa: E731
    assert starts(0.9, 1) == [True, False, True, False, False, False]
    assert starts(-1.0, 1) == [True] + [False] * 5
    assert starts(-1.0, 3) == [True, False, True, False, True, False]  # the two least similar pairs: (1, 2) then (3, 4)
    assert starts(0.97, 2) == [True, False, True, False, True, False]  # threshold and least-similar cuts together
    assert starts(-1.0, 5) == [True, True, True, True, True, False]
    assert starts(-1.0, 99) == [True] * 6
    ties = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])[:, None, :]  # every neighbour cosine is 0
    assert segment_starts(ties, -1.0, 2).tolist() == [True, True, False, False]  # ties to the earlier pair
    assert segment_starts(features[:1], 0.9, 8).tolist() == [True]


def test_only_the_leading_width_channels_are_compared_and_companions_are_merged_alike():
    g = torch.Generator().manual_seed(0)
    token = torch.randn(1, 8, 4, generator=g)
    core = torch.cat([token, token + 0.01 * torch.randn(1, 8, 4, generator=g)])  # unit 1 repeats unit 0
    features = torch.cat([core, 5 * torch.randn(2, 8, 3, generator=g)], dim=-1)  # companions unrelated across units
    attention = torch.rand(2, 8, generator=g)
    method = SegmentMerge(0.5, **ONE_SEGMENT)
    tokens, kept = method.compress(features, [8, 2], FrameSignals(attention=attention, width=4))
    alone, kept_alone = method.compress(core, [8, 2], FrameSignals(attention=attention))
    assert kept == kept_alone
    assert torch.allclose(tokens[:, :4], alone)
    repeats = [t for t in range(8) if t not in kept[1]]
    assert len(repeats) == 6
    assert torch.allclose(tokens[repeats], (features[0, repeats] + features[1, repeats]) / 2)  # companions averaged too
    # every channel compared: the companions make the units unrelated, nothing repeats, unit 0 stays as it was
    tokens, kept = method.compress(features, [8, 2], FrameSignals(attention=attention))
    assert kept[1] == sorted(torch.sort(-attention[1], stable=True).indices[:2].tolist())
    assert torch.equal(tokens[:8], features[0])


def test_bfloat16_features_come_back_in_their_dtype():
    features, attention = video(1, 3, 6, 4, 0.9, 0.05)
    tokens, kept = SegmentMerge(0.5, **ONE_SEGMENT).compress(features.bfloat16(), [3, 1, 2], FrameSignals(attention=attention))
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (6, 4) and [len(k) for k in kept] == [3, 1, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=1.5), "threshold is a cosine"), (dict(threshold="0.8"), "threshold is a cosine"),
    (dict(segment_threshold=-2), "segment_threshold is a cosine"), (dict(segment_threshold=float("nan")), "segment_threshold"),
    (dict(min_segments=0), "min_segments must be a whole number >= 1"), (dict(min_segments=2.5), "min_segments"),
    (dict(min_segments=True), "min_segments"), (dict(spatial_merge=1), "spatial_merge must be True or False"),
    (dict(retention=0), "retention"),
])
def test_bad_parameters_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentMerge(**kwargs)


def test_bad_budgets_and_signals_are_refused_with_the_fix():
    features, attention = video(0, 3, 4, 2, 0.5, 0.1)
    method = SegmentMerge(0.5)
    with pytest.raises(ValueError, match="2 budgets for 3 units: give one budget per unit"):
        method.compress(features, [1, 1], FrameSignals(attention=attention))
    with pytest.raises(ValueError, match=r"unit 1: budget 5 must be a whole number in 0..4"):
        method.compress(features, [1, 5, 0], FrameSignals(attention=attention))
    with pytest.raises(ValueError, match="budget -1"):
        method.compress(features, [1, -1, 0], FrameSignals(attention=attention))
    with pytest.raises(ValueError, match="budget 1.5"):
        method.compress(features, [1, 1.5, 0], FrameSignals(attention=attention))
    with pytest.raises(ValueError, match="run it through vidtok.generate/prepare"):
        method.compress(features, [1, 1, 1])
    with pytest.raises(ValueError, match=r"signals.attention must be \[units, tokens\]"):
        method.compress(features, [1, 1, 1], FrameSignals(attention=attention[:2]))
    with pytest.raises(ValueError, match="signals.width 3 must be in 1..2"):
        method.compress(features, [1, 1, 1], FrameSignals(attention=attention, width=3))
    tokens, kept = method.compress(features, [4, 0, 4])  # no unit kept in part: nothing to rank, no attention needed
    assert [len(k) for k in kept] == [4, 0, 4] and tokens.shape == (8, 2)


# through the pipeline --------------------------------------------------------------------------

def _warm_qwen(model):
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture(params=["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def family(request):
    """(model, tokenizer, pixels) of one tiny family; LLaVA-OV from conftest's fixtures."""
    if request.param == "llava_onevision":
        return request.getfixturevalue("model"), request.getfixturevalue("tokenizer"), request.getfixturevalue("pixels")
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # three temporal groups of 16 tokens
    if request.param == "qwen2_5_vl":
        return _warm_qwen(build_qwen_toy_model("test", seed=0)), build_tokenizer("qwen2_5_vl"), pixels
    return _warm_qwen(build_qwen3_toy_model("qwen3_vl", seed=0)), build_tokenizer("qwen3_vl"), pixels


class _WrongLength(SegmentMerge):
    def compress(self, features, budgets, signals=None):
        return super().compress(features, budgets[:-1], signals)


def test_through_the_pipeline_kept_counts_are_the_budgets_and_the_model_is_untouched(family):
    model, tokenizer, pixels = family
    before = snapshot(model)
    for method in (SegmentMerge(retention=0.25), DyToK(SegmentMerge(0.25), guide="self")):
        plan = generate(model, tokenizer, pixels, Q, method, max_new_tokens=3).plan
        assert [len(k) for k in plan.kept] == plan.budgets
        assert sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept
        assert plan.total_budget == round(0.25 * plan.frames * plan.tokens_per_frame)
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match="give one budget per unit"):
        generate(model, tokenizer, pixels, Q, _WrongLength(0.25), max_new_tokens=3)
    assert_unchanged(model, before)


class _Spy(SegmentMerge):
    def compress(self, features, budgets, signals=None):
        self.seen = features, budgets, signals
        self.out = super().compress(features, budgets, signals)
        return self.out


def test_through_the_pipeline_repeats_merge_as_the_reference_says(family):
    """A video of one frame under noise: the pipeline hands over the attention and the compared width
    (Qwen3-VL: DeepStack channels after it), and what comes back is the slow reference's."""
    model, tokenizer, pixels = family
    g = torch.Generator().manual_seed(0)
    pixels = pixels[:1] + 0.3 * torch.randn(pixels.shape, generator=g)
    spy = _Spy(0.25, segment_threshold=-1.0, min_segments=1)
    prepare(model, tokenizer, pixels, Q, spy)
    features, budgets, signals = spy.seen
    assert signals.width == model.config.get_text_config().hidden_size
    assert signals.attention.shape == features.shape[:2]
    assert (features.shape[-1] > signals.width) == (model.config.model_type == "qwen3_vl")  # DeepStack companions
    kept, tokens, margin, merges = slow_segmerge(features, budgets, signals.attention.tolist(), signals.width,
                                                 threshold=0.8, segment_threshold=-1.0, min_segments=1, spatial_merge=True,
                                                 spatial_order=True)
    assert margin > 1e-5 and merges["temporal"] > 0
    assert spy.out[1] == kept
    assert torch.allclose(spy.out[0].double(), tokens, atol=1e-6, rtol=1e-6)


def test_retention_one_is_the_unmodified_model(family):
    model, tokenizer, pixels = family
    expected = generate(model, tokenizer, pixels, Q, None, max_new_tokens=4, do_sample=False).sequences
    for method in (SegmentMerge(retention=1.0), DyToK(SegmentMerge(1.0), guide="self")):
        assert torch.equal(generate(model, tokenizer, pixels, Q, method, max_new_tokens=4, do_sample=False).sequences, expected)
