"""DiverseSelect (FlashVID's ADTS): the greedy attention-calibrated max-min rule against a loop-by-loop
reference, budgets through compress, and both model families end to end."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vidtok import DyToK, FrameSignals, adapter_for, generate, prepare
from vidtok.compressors.diverse import DiverseSelect
from vidtok.testbed.toy import build_qwen_toy_model, build_tokenizer

from helpers import assert_unchanged, snapshot

Q = "what shape is red ?"


# the rule, written out from the paper's description, one Python float at a time ----------------

def slow_adts(features, attention, budget, calibration=1.0, width=None):
    """FlashVID's ADTS on one unit: c(i, j) = (1 - cos(x_i, x_j)) * a_j ** calibration; first the token
    whose nearest other token is farthest, then each time the candidate farthest from its nearest kept
    token; ties to the lowest index. A zero token's cosine with anything is 0.

    Returns (kept indices in selection order, the smallest gap between a step's best and second-best
    candidate that is not an exact tie, in float64: where it is tiny, float32 may rank otherwise)."""
    rows = [row if width is None else row[:width] for row in features.double().tolist()]
    weight = [a ** calibration for a in attention.double().tolist()]
    n = len(rows)
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]

    def distance(i, j):
        if norms[i] == 0 or norms[j] == 0:
            return 1.0
        return 1.0 - sum(u * v for u, v in zip(rows[i], rows[j])) / (norms[i] * norms[j])

    c = [[distance(i, j) * weight[j] for j in range(n)] for i in range(n)]
    gaps = []

    def best(scores):
        ranked = sorted(scores, key=lambda j: (-scores[j], j))
        if len(ranked) > 1 and scores[ranked[0]] != scores[ranked[1]]:
            gaps.append(scores[ranked[0]] - scores[ranked[1]])
        return ranked[0]

    kept = [best({j: min(c[i][j] for i in range(n) if i != j) for j in range(n)})]
    while len(kept) < budget:
        kept.append(best({j: min(c[s][j] for s in kept) for j in range(n) if j not in kept}))
    return kept, min(gaps, default=math.inf)


@st.composite
def videos(draw):
    units, tokens, dim, extra = draw(st.integers(1, 4)), draw(st.integers(2, 18)), draw(st.integers(1, 6)), draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    features = torch.randn(units, tokens, dim + extra, generator=g)
    if draw(st.booleans()):  # a same-direction copy (a near-duplicate for float32) and a zero token
        features[:, 1] = 2 * features[:, 0]
        features[:, -1, :dim] = 0
    if draw(st.booleans()):
        attention = torch.full((units, tokens), 1.0 / tokens)  # flat: exact ties wherever distances tie
    else:
        attention = torch.softmax(3 * torch.randn(units, tokens, generator=g), dim=1)
    width = dim if extra else draw(st.sampled_from([None, dim]))
    budget = draw(st.integers(1, tokens - 1))
    calibration = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    frames = draw(st.lists(st.integers(0, units - 1), min_size=1, max_size=units, unique=True))
    return features, attention, width, budget, calibration, frames


@settings(max_examples=150, deadline=None)
@given(videos())
def test_selection_equals_the_slow_reference(case):
    features, attention, width, budget, calibration, frames = case
    expected = [slow_adts(features[f], attention[f], budget, calibration, width) for f in frames]
    assume(min(gap for _, gap in expected) > 1e-5)  # a float64 near-tie float32 may break either way
    compressor = DiverseSelect(calibration=calibration)
    signals = FrameSignals(attention=attention, width=width)
    index, tokens = compressor.select_frames(features, frames, budget, signals)
    assert index.tolist() == [kept for kept, _ in expected]
    torch.testing.assert_close(tokens, torch.stack([features[f, kept] for f, (kept, _) in zip(frames, expected)]), rtol=1e-6, atol=1e-6)
    one_index, one_tokens = compressor.select(features[frames[0]], budget, frames[0], signals)  # one unit, same answer
    assert one_index.tolist() == expected[0][0]
    assert torch.equal(one_tokens, tokens[0])


def test_duplicates_of_salient_tokens_are_kept_once():
    """Three near-copies draw the most attention: a pure top-attention choice keeps all three, ADTS one."""
    features = torch.eye(8)
    features[1] = features[0] + 1e-3 * torch.eye(8)[1]
    features[2] = features[0] + 1e-3 * torch.eye(8)[2]
    attention = torch.tensor([0.30, 0.29, 0.28, 0.05, 0.04, 0.03, 0.02, 0.01])
    top = torch.topk(attention, 3).indices.sort().values.tolist()
    assert top == [0, 1, 2]
    index, _ = DiverseSelect().select(features, 3, 0, FrameSignals(attention=attention[None]))
    # first the most isolated token weighted by attention (3), then the most attended copy (0), then 4
    assert index.tolist() == [3, 0, 4]
    assert len(set(index.tolist()) & {0, 1, 2}) == 1
    assert slow_adts(features, attention, 3)[0] == [3, 0, 4]


def test_attention_calibrates_and_ties_go_to_the_lowest_index():
    """Mutually orthogonal tokens are all at distance 1: attention alone decides, and without it
    (calibration 0) every score ties and the lowest indices win."""
    features = torch.eye(5)[None]
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.3]])
    signals = FrameSignals(attention=attention)
    assert DiverseSelect().select_frames(features, [0], 2, signals)[0].tolist() == [[1, 3]]
    assert DiverseSelect(calibration=0).select_frames(features, [0], 2, signals)[0].tolist() == [[0, 1]]
    flat = FrameSignals(attention=torch.full((1, 5), 0.2))
    assert DiverseSelect().select_frames(features, [0], 3, flat)[0].tolist() == [[0, 1, 2]]
    # spatial_order=False keeps the selection order through compress, the default sorts it
    later_first = FrameSignals(attention=torch.tensor([[0.1, 0.4, 0.2, 0.5, 0.3]]))
    assert DiverseSelect(spatial_order=False).compress(features, [2], later_first)[1] == [[3, 1]]
    assert DiverseSelect().compress(features, [2], later_first)[1] == [[1, 3]]


def test_only_the_leading_width_channels_are_compared():
    g = torch.Generator().manual_seed(0)
    features, companions = torch.randn(1, 12, 4, generator=g), 10 * torch.randn(1, 12, 4, generator=g)
    attention = torch.softmax(torch.randn(1, 12, generator=g), dim=1)
    stacked = torch.cat([features, companions], dim=-1)
    compressor = DiverseSelect()
    alone, _ = compressor.select_frames(features, [0], 5, FrameSignals(attention=attention))
    index, tokens = compressor.select_frames(stacked, [0], 5, FrameSignals(attention=attention, width=4))
    everything, _ = compressor.select_frames(stacked, [0], 5, FrameSignals(attention=attention))
    assert torch.equal(index, alone)
    assert not torch.equal(everything, alone)  # the companions would have changed the choice
    assert torch.equal(tokens[0], stacked[0, index[0]])  # companions ride along with their tokens


@st.composite
def budget_vectors(draw):
    units, tokens = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    budgets = draw(st.lists(st.one_of(st.just(0), st.just(tokens), st.integers(0, tokens)), min_size=units, max_size=units))
    return tokens, budgets, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


@settings(max_examples=100, deadline=None)
@given(budget_vectors())
def test_compress_keeps_exactly_each_units_budget(case):
    tokens, budgets, seed, spatial_order = case
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(budgets), tokens, 3, generator=g)
    attention = torch.softmax(torch.randn(len(budgets), tokens, generator=g), dim=1)
    signals = FrameSignals(attention=attention, metric=torch.randn(len(budgets), tokens, 2, generator=g))
    compressor = DiverseSelect(spatial_order=spatial_order)
    out, kept = compressor.compress(features, budgets, signals)
    assert [len(k) for k in kept] == budgets and out.shape == (sum(budgets), 3)
    assert torch.equal(out, torch.cat([features[f, k] for f, k in enumerate(kept)]))
    for f, (budget, k) in enumerate(zip(budgets, kept)):
        assert len(set(k)) == budget
        if budget == tokens:
            assert k == list(range(tokens))
        elif budget:  # units sharing a budget are selected together: each as if alone
            alone = compressor.select(features[f], budget, f, signals)[0].tolist()
            assert k == (sorted(alone) if spatial_order else alone)


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, "1", True, None])
def test_bad_calibration_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="calibration must be a finite number >= 0"):
        DiverseSelect(calibration=bad)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1])
def test_bad_retention_is_refused(bad):
    with pytest.raises(ValueError):
        DiverseSelect(retention=bad)


def test_missing_or_damaged_signals_are_clear_errors():
    features = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="needs the vision tower's attention"):
        DiverseSelect().compress(features, [3, 3])
    with pytest.raises(ValueError, match="needs the vision tower's attention"):
        DiverseSelect().compress(features, [3, 3], FrameSignals(metric=torch.randn(2, 6, 2)))
    with pytest.raises(ValueError, match="shape"):
        DiverseSelect().compress(features, [3, 3], FrameSignals(attention=torch.rand(2, 5)))
    for value in (math.nan, -1.0):
        attention = torch.rand(2, 6)
        attention[1, 2] = value
        with pytest.raises(ValueError, match="finite and >= 0"):
            DiverseSelect().compress(features, [3, 3], FrameSignals(attention=attention))
    # full and empty units need no signals
    out, kept = DiverseSelect().compress(features, [6, 0])
    assert kept == [list(range(6)), []] and torch.equal(out, features[0])


def test_name_and_label():
    assert DiverseSelect.name == "diverse" and DiverseSelect.needs_vision_signals
    assert str(DiverseSelect(0.25)) == "diverse(retention=0.25)"
    assert str(DiverseSelect(0.25, calibration=2)) == "diverse(retention=0.25, calibration=2)"


# both families end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_tokenizer("qwen2_5_vl")


@pytest.fixture
def qwen_model():
    model = build_qwen_toy_model("test", seed=0)
    with torch.no_grad():  # transformers adds its output-recording hooks at the first vision forward
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture
def qwen_assistant():
    model = build_qwen_toy_model("test", seed=1)
    with torch.no_grad():
        model.model.get_video_features(torch.zeros(16, 3 * 2 * 8 * 8), video_grid_thw=torch.tensor([[1, 4, 4]]))
    return model


@pytest.fixture
def qwen_pixels():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # three temporal groups of 4x4 tokens


@pytest.fixture(params=["llava_onevision", "qwen2_5_vl"])
def family(request):
    names = ("model", "tokenizer", "pixels", "assistant")
    if request.param == "qwen2_5_vl":
        names = tuple(f"qwen_{name}" for name in names)
    return [request.getfixturevalue(name) for name in names]


@pytest.mark.parametrize("guide", [None, "self", "assistant"])
def test_kept_counts_follow_the_budgets_and_the_model_is_unchanged(family, guide):
    model, tokenizer, pixels, assistant = family
    method = DiverseSelect(0.25) if guide is None else DyToK(DiverseSelect(0.25), guide=assistant if guide == "assistant" else guide)
    before, before_assistant = snapshot(model), snapshot(assistant)
    plan = generate(model, tokenizer, pixels, Q, method, max_new_tokens=3).plan
    units = plan.frames
    assert [len(k) for k in plan.kept] == plan.budgets
    assert sum(plan.budgets) == plan.total_budget == plan.visual_tokens_kept == round(0.25 * units * plan.tokens_per_frame)
    assert all(k == sorted(set(k)) for k in plan.kept)
    if guide is not None:
        assert plan.guide is not None and len(plan.frame_weights) == units  # the guide's budgets
    assert_unchanged(model, before)
    assert_unchanged(assistant, before_assistant)


def test_the_pipeline_keeps_what_the_rule_picks_on_the_towers_signals(family):
    model, tokenizer, pixels, _ = family
    plan = prepare(model, tokenizer, pixels, Q, DiverseSelect(0.25)).plan
    adapter = adapter_for(model)
    encoded = adapter.encode_video(adapter.pixels(pixels), signals=True)
    for f, budget in enumerate(plan.budgets):
        kept, gap = slow_adts(encoded.features[f], encoded.signals.attention[f], budget)
        assert gap > 1e-6
        assert plan.kept[f] == sorted(kept)


@pytest.mark.parametrize("guided", [False, True], ids=["alone", "dytok"])
def test_retention_one_reproduces_the_unmodified_model(family, guided):
    model, tokenizer, pixels, _ = family
    expected = generate(model, tokenizer, pixels, Q, None, max_new_tokens=4, do_sample=False).sequences
    method = DyToK(DiverseSelect(1.0), guide="self") if guided else DiverseSelect(1.0)
    before = snapshot(model)
    assert torch.equal(generate(model, tokenizer, pixels, Q, method, max_new_tokens=4, do_sample=False).sequences, expected)
    assert_unchanged(model, before)
