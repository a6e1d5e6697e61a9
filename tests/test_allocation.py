"""The per-unit split as its own part: exact sums and caps for every allocation, VidCom2's uniqueness
rule against a slow reference written from it, and the splits through DyToK, the CLI and eval."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vidtok
from vidtok import DyToK, FastV, VisionZip
from vidtok.allocation import ALLOCATIONS, Even, Keyframes, Mix, Prior, Uniqueness, as_allocation, frame_uniqueness
from vidtok.cli import main
from vidtok.harness.evaluate import EvalConfig, configurations, evaluate, run_name
from vidtok.models import adapter_for
from vidtok.testbed.synth import write_split

from helpers import assert_unchanged, snapshot


def reference_uniqueness(features, temperature=0.01, channels=0.5):
    """VidCom2's frame uniqueness, from its description, one number at a time."""
    units, tokens, width = features.shape
    features = features.detach()
    rows = [[float(v) for v in features[u, t]] for u in range(units) for t in range(tokens)]
    n = len(rows)
    variances = []
    for c in range(width):
        mean = sum(r[c] for r in rows) / n
        variances.append(sum((r[c] - mean) ** 2 for r in rows) / n)
    keep = sorted(range(width), key=lambda c: (variances[c], c))[: max(1, int(width * channels))]
    normed = []
    for r in rows:
        picked = [r[c] for c in keep]
        norm = max(math.sqrt(sum(v * v for v in picked)), 1e-12)
        normed.append([v / norm for v in picked])
    centre = [sum(r[i] for r in normed) / n for i in range(len(keep))]
    scores = []
    for u in range(units):
        closeness = 0.0
        for t in range(tokens):
            d = sum((a - b) ** 2 for a, b in zip(normed[u * tokens + t], centre))
            closeness += sum(math.exp(-d / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))
        scores.append(-closeness / tokens)
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    p = [e / sum(exps) for e in exps]
    w = [1 + q - sum(p) / units for q in p]
    return [x / sum(w) for x in w]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 6), st.sampled_from([0.005, 0.01, 0.5, 3.0]),
       st.sampled_from([0.25, 0.5, 1.0]), st.integers(0, 2**31 - 1))
def test_uniqueness_equals_the_reference(units, tokens, width, temperature, channels, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(units, tokens, width, generator=g, dtype=torch.float64) * torch.rand(width, generator=g, dtype=torch.float64) * 3
    ours = frame_uniqueness(features, temperature, channels)
    assert ours.tolist() == pytest.approx(reference_uniqueness(features, temperature, channels), abs=1e-5)


def test_a_unit_unlike_the_rest_gets_more():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, 8, generator=g)
    features = base.repeat(6, 1, 1) + 0.01 * torch.randn(6, 16, 8, generator=g)
    features[4] = torch.randn(16, 8, generator=g)  # a scene cut
    budgets = Uniqueness().split(24, 16, features=features)
    assert sum(budgets) == 24 and budgets[4] == max(budgets) and budgets[4] > budgets[0]


SPLITS = [Even(), Prior(), Keyframes(), Uniqueness(), Uniqueness(temperature=1.0), Mix(0.0), Mix(0.3), Mix(1.0)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_split_sums_exactly_and_respects_caps(data):
    units = data.draw(st.integers(1, 12))
    tokens = data.draw(st.integers(1, 20))
    split = data.draw(st.sampled_from(SPLITS))
    caps = data.draw(st.one_of(st.integers(0, tokens), st.lists(st.integers(0, tokens), min_size=units, max_size=units)))
    cap_list = caps if isinstance(caps, list) else [caps] * units
    total = data.draw(st.integers(0, sum(cap_list)))
    floor = 0 if isinstance(split, Keyframes) else data.draw(st.integers(0, min(min(cap_list), total // units)))
    prior = data.draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=units, max_size=units))
    features = torch.randn(units, tokens, 6, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 10**6))))
    budgets = split.split(total, caps, prior=prior, features=features, floor=floor)
    assert len(budgets) == units and sum(budgets) == total
    assert all(floor <= b <= c for b, c in zip(budgets, cap_list))


def test_mix_at_its_ends_is_the_prior_or_uniqueness():
    g = torch.Generator().manual_seed(3)
    features, prior = torch.randn(8, 10, 12, generator=g), torch.rand(8, generator=g).tolist()
    assert Mix(1.0).split(30, 10, prior=prior, features=features) == Prior().split(30, 10, prior=prior)
    assert Mix(0.0).split(30, 10, prior=prior, features=features) == Uniqueness().split(30, 10, features=features)


@pytest.mark.parametrize("value, message", [
    ("nope", "unknown allocation 'nope'"),
    ("mix:1.5", "must be in [0, 1], got 1.5"),
    ("mix:-0.1", "must be in [0, 1]"),
    ("mix:abc", "cannot read the mix weight"),
    ("uniqueness:0.3", "only the mix takes a weight"),
    (3, "unknown allocation 3"),
])
def test_bad_allocations_are_named(value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        as_allocation(value)


@pytest.mark.parametrize("make, message", [
    (lambda: Mix(weight=2), "must be in [0, 1]"),
    (lambda: Mix(weight=True), "must be in [0, 1]"),
    (lambda: Uniqueness(temperature=0), "temperature must be a number > 0"),
    (lambda: Uniqueness(channels=0), "channel share must be in (0, 1]"),
    (lambda: DyToK(VisionZip(0.25), guide=None), "got None"),
    (lambda: DyToK(VisionZip(0.25), allocation="uniqueness"), "reads no guide"),
    (lambda: DyToK(VisionZip(0.25), guide=None, allocation="uniqueness", layers=[1]), "with guide=None there is none"),
    (lambda: DyToK(FastV(0.25), guide="inline", allocation="mix"), "inline prior"),
    (lambda: DyToK(VisionZip(0.25), guide=None, allocation="uniqueness", cap=0), "cap must be a positive int"),
])
def test_bad_splits_in_dytok_are_named(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        make()


def test_every_name_builds_and_prints_itself():
    for name, cls in ALLOCATIONS.items():
        assert isinstance(as_allocation(name), cls) and str(as_allocation(name)) == (name if name != "mix" else "mix(0.5)")
    assert as_allocation("mix:0.7") == Mix(0.7) and str(Mix(0.7)) == "mix(0.7)"


# --- through the pipeline --------------------------------------------------------------------------

def test_uniqueness_split_through_generate_follows_the_encoded_features(model, tokenizer, pixels):
    before = snapshot(model)
    result = vidtok.generate(model, tokenizer, pixels, "what colour is the square?", DyToK(VisionZip(0.25), guide=None, allocation="uniqueness"),
                             max_new_tokens=2)
    assert_unchanged(model, before)
    plan = result.plan
    features = adapter_for(model).encode_videos([adapter_for(model).pixels(pixels, None)], signals=False)[0].features
    expected = vidtok.allocate_budgets(reference_uniqueness(features), plan.total_budget, plan.tokens_per_frame)
    assert plan.budgets == expected and [len(k) for k in plan.kept] == expected
    assert (plan.guide, plan.allocation, plan.frame_weights, plan.guide_layers) == (None, "uniqueness", None, None)


def test_mix_through_generate_blends_the_assistants_prior(model, assistant, tokenizer, pixels):
    question = "what colour is the square?"
    proportional = vidtok.generate(model, tokenizer, pixels, question, DyToK(VisionZip(0.25), guide=assistant), max_new_tokens=2).plan
    before = snapshot(model), snapshot(assistant)
    mixed = vidtok.generate(model, tokenizer, pixels, question, DyToK(VisionZip(0.25), guide=assistant, allocation=Mix(0.6)),
                            max_new_tokens=2).plan
    assert_unchanged(model, before[0])
    assert_unchanged(assistant, before[1])
    features = adapter_for(model).encode_videos([adapter_for(model).pixels(pixels, None)], signals=False)[0].features
    prior = torch.tensor(proportional.frame_weights, dtype=torch.float64)
    weights = (0.6 * prior / prior.sum() + 0.4 * torch.tensor(reference_uniqueness(features), dtype=torch.float64)).tolist()
    assert mixed.frame_weights == proportional.frame_weights and mixed.allocation == "mix(0.6)"
    assert mixed.budgets == vidtok.allocate_budgets(weights, mixed.total_budget, mixed.tokens_per_frame)


def test_fastv_takes_a_query_agnostic_split_too(model, tokenizer, pixels):
    result = vidtok.generate(model, tokenizer, pixels, "what colour?", DyToK(FastV(0.25), guide=None, allocation="uniqueness"), max_new_tokens=2)
    features = adapter_for(model).encode_videos([adapter_for(model).pixels(pixels, None)], signals=False)[0].features
    assert result.plan.budgets == vidtok.allocate_budgets(reference_uniqueness(features), result.plan.total_budget, result.plan.tokens_per_frame)
    assert [len(k) for k in result.plan.kept] == result.plan.budgets


def test_a_split_that_fails_leaves_the_model_as_it_was(model, tokenizer, pixels):
    before = snapshot(model)
    with pytest.raises(ValueError, match="exceeds"):  # 4 frames x cap 1 cannot hold a quarter of 4 x 16 tokens
        vidtok.generate(model, tokenizer, pixels, "what colour?", DyToK(VisionZip(0.25), guide=None, allocation="uniqueness", cap=1))
    assert_unchanged(model, before)


# --- the command line and eval ---------------------------------------------------------------------

def test_cli_run_names_the_split(capsys):
    assert main(["run", "--allocation", "uniqueness", "--retention", "0.125", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["guide"], record["allocation"], record["visual_tokens_kept"]) == (None, "uniqueness", 32)
    assert main(["run", "--allocation", "mix:0.7", "--retention", "0.125"]) == 0
    assert "+ DyToK (guide: assistant" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--allocation", "uniqueness", "--guide", "self"], "reads no guide: use --guide none"),
    (["--allocation", "mix", "--guide", "none"], "add --guide self or assistant"),
    (["--allocation", "mix:9"], "must be in [0, 1]"),
    (["--allocation", "sideways"], "unknown allocation 'sideways'"),
    (["--method", "keyframe", "--allocation", "mix"], "--method keyframe is the binary split"),
])
def test_cli_refuses_bad_splits(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_runs_each_split_where_it_fits(tmp_path):
    config = EvalConfig(split=str(tmp_path), methods=["visionzip", "keyframe"], guides=["none", "self"], retentions=[0.25],
                        allocations=["default", "uniqueness", "mix:0.5"])
    runs = {run_name(*run) for run in configurations(config)}
    assert runs == {"full-none-r1", "visionzip-none-r0.25", "visionzip-none-uniqueness-r0.25", "visionzip-self-r0.25",
                    "visionzip-self-mix0.5-r0.25", "keyframe-self-r0.25"}
    with pytest.raises(ValueError, match="fits none of the guides"):
        EvalConfig(split=str(tmp_path), methods=["visionzip"], guides=["none"], allocations=["mix"])
    with pytest.raises(ValueError, match="unknown allocation"):
        EvalConfig(split=str(tmp_path), methods=["visionzip"], guides=["none"], allocations=["odd"])


def test_eval_records_the_split_and_keeps_default_identities(model, tokenizer, tmp_path):
    split = tmp_path / "split"
    write_split(split, seed=2, count=2)
    base = dict(split=str(split), out=str(tmp_path / "out"), methods=["visionzip"], guides=["none"], retentions=[0.25])
    plain = evaluate(EvalConfig(**base), model, tokenizer, progress=False, log=lambda *_: None)
    both = evaluate(EvalConfig(**base, allocations=["default", "uniqueness"]), model, tokenizer, progress=False, log=lambda *_: None)
    by_name = {(s["method"], s.get("allocation")): s for s in both}
    assert by_name[("visionzip", None)]["identity"] == next(s for s in plain if s["method"] == "visionzip")["identity"]
    unique = by_name[("visionzip", "uniqueness")]
    assert unique["identity"]["allocation"] == "uniqueness" and "allocation" not in by_name[("visionzip", None)]["identity"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "visionzip-none-uniqueness-r0.25" / "predictions.jsonl").read_text().splitlines()]
    alone = vidtok.generate(model, tokenizer, str(split / json.loads((split / "questions.jsonl").read_text().splitlines()[0])["video"]),
                            rows[0]["question"], DyToK(VisionZip(0.25), guide=None, allocation="uniqueness"), frames=16, max_new_tokens=2)
    assert rows[0]["budgets"] == alone.plan.budgets


# --- does the assistant see what the main model sees? --------------------------------------------

def reference_agreement(a, m, top):
    """Spearman from average ranks written out, and the top sets by sorting (ties: lower index)."""
    def ranks(x):
        r = [0.0] * len(x)
        for i, v in enumerate(x):
            below = sum(1 for w in x if w < v)
            equal = sum(1 for w in x if w == v)
            r[i] = below + (equal - 1) / 2
        return r
    ra, rm = ranks(a), ranks(m)
    ma, mm = sum(ra) / len(ra), sum(rm) / len(rm)
    num = sum((x - ma) * (y - mm) for x, y in zip(ra, rm))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mm) ** 2 for y in rm))
    best = lambda x: set(sorted(range(len(x)), key=lambda i: (-x[i], i))[:top])  # noqa: E731
    return (None if den == 0 else num / den), len(best(a) & best(m)) / top


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), min_size=n, max_size=n),
                                                       st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), min_size=n, max_size=n),
                                                       st.integers(1, n))))
def test_guide_agreement_equals_the_reference(case):
    from vidtok.importance import guide_agreement

    a, m, top = case
    ours = guide_agreement(torch.tensor(a), torch.tensor(m), top)
    spearman, overlap = reference_agreement(a, m, top)
    assert (ours["spearman"] is None) == (spearman is None)
    if spearman is not None:
        assert ours["spearman"] == pytest.approx(spearman, abs=1e-9)
    assert ours["top_overlap"] == pytest.approx(overlap) and ours["top"] == top
    assert ours["same_argmax"] == (max(range(len(a)), key=lambda i: (a[i], -i)) == max(range(len(m)), key=lambda i: (m[i], -i)))


def test_compare_reports_the_main_models_own_prior_beside_the_assistants(model, assistant, tokenizer, pixels):
    from vidtok.importance import guide_agreement

    question = "what colour is the square?"
    before = snapshot(model), snapshot(assistant)
    plan = vidtok.generate(model, tokenizer, pixels, question, DyToK(VisionZip(0.25), guide=assistant, compare=True), max_new_tokens=2).plan
    assert_unchanged(model, before[0])
    assert_unchanged(assistant, before[1])
    own = vidtok.generate(model, tokenizer, pixels, question, DyToK(VisionZip(0.25), guide="self"), max_new_tokens=2).plan
    alone = vidtok.generate(model, tokenizer, pixels, question, DyToK(VisionZip(0.25), guide=assistant), max_new_tokens=2).plan
    agreement = plan.guide_agreement
    assert agreement["main_weights"] == pytest.approx(own.frame_weights, abs=1e-6) and agreement["main_layers"] == own.guide_layers
    assert plan.frame_weights == alone.frame_weights and plan.budgets == alone.budgets  # the diagnostic changes nothing it reports on
    expected = guide_agreement(torch.tensor(plan.frame_weights), torch.tensor(own.frame_weights))
    assert {k: agreement[k] for k in expected} == pytest.approx(expected)
    assert alone.guide_agreement is None
    with pytest.raises(ValueError, match="needs an assistant guide"):
        DyToK(VisionZip(0.25), guide="self", compare=True)


def test_calibrate_reports_the_agreement_of_a_pair(tmp_path, capsys):
    write_split(tmp_path / "s", seed=7, count=6)
    assert main(["calibrate", str(tmp_path / "s"), "--model", "toy-main", "--assistant", "toy-assistant", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "assistant vs this model (6 questions; assistant layers [" in out and "same top frame" in out
    assert main(["calibrate", str(tmp_path / "s"), "--model", "toy-main", "--assistant", "toy-qwen2.5-vl-assistant", "--dry-run"]) == 2
    assert "same family" in capsys.readouterr().err


def test_the_scene_split_repeats_its_clutter_and_changes_only_the_needle():
    import numpy as np

    from vidtok.testbed.synth import make_sample

    plain = make_sample(np.random.default_rng(5))
    assert (plain.frames == make_sample(np.random.default_rng(5), scene=1).frames).all()  # v1 unchanged
    sample = make_sample(np.random.default_rng(5), frames=16, scene=4)
    hosts = {}
    for n in sample.needles:
        hosts.setdefault(n["frame"], set()).add(n["token"])
    for start in range(0, 16, 4):
        plain_frames = [f for f in range(start, start + 4) if f not in hosts]
        background = sample.labels[plain_frames[0]]  # a scene of 4 frames holds at most 2 needles
        for f in range(start, start + 4):
            changed = {int(c) for c in np.flatnonzero((sample.labels[f] != background).any(-1))}
            assert changed == hosts.get(f, set()), f
            assert (sample.labels[f][list(hosts.get(f, []))] != 0).all()  # a needle replaces an object, never an empty cell
    with pytest.raises(ValueError, match="scene must be a whole number"):
        make_sample(np.random.default_rng(0), scene=0)


def test_a_base_asking_for_a_signal_the_family_cannot_give_is_refused_before_any_work(model, tokenizer, pixels):
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class ClsBase(vidtok.Uniform):  # a base reading a [CLS] token's attention: no supported family has one
        name: ClassVar[str] = "cls-attention"
        signals: ClassVar[tuple] = ("cls_attention",)

    before = snapshot(model)
    for method in (ClsBase(0.25), DyToK(ClsBase(0.25), guide="self")):
        with pytest.raises(ValueError, match="reads the vision tower's cls_attention, which vidtok's llava_onevision adapter does not give"):
            vidtok.generate(model, tokenizer, pixels, "what colour?", method)
    assert_unchanged(model, before)
    assert {s for base in (VisionZip, vidtok.DiverseSelect, vidtok.SegmentMerge) for s in base.signals} <= set(adapter_for(model).vision_signals)
