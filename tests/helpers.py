"""Shared test helpers."""

import copy

import torch

FRAMES = 4


def wording_guess_hits(train, test):
    """Per question kind, whether the best answer from the question text alone (the majority
    answer among `train` samples with the same question string) is right on each `test` sample."""
    from collections import Counter

    votes = {}
    for s in train:
        votes.setdefault(s.question, Counter())[s.answer] += 1
    hits = {}
    for s in test:
        if s.question in votes:
            hits.setdefault(s.kind, []).append(votes[s.question].most_common(1)[0][0] == s.answer)
    return hits


def snapshot(model):
    """Everything a call must leave untouched."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attn": {k: getattr(model.config, k)._attn_implementation for k in model.config.sub_configs} | {"": model.config._attn_implementation},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "training": model.training,
        "config": copy.deepcopy(model.config.to_dict()),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["attn"] == before["attn"]
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["config"] == before["config"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
