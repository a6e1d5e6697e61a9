"""The new bases and splits on every landed family: LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL (+MoE) and
Qwen3.5 (+MoE). Each unit keeps exactly its budget, DyToK's split and the query-agnostic split both
run, retention 1.0 is the unmodified model, and the model is unchanged after every call."""

import pytest
import torch

import vidtok
from vidtok import DiverseSelect, DyToK, SegmentMerge
from vidtok.testbed.toy import build_qwen3_toy_model, build_qwen_toy_model, build_tokenizer, build_toy_model

from helpers import assert_unchanged, snapshot

FAMILIES = {
    "llava_onevision": lambda: build_toy_model("test", seed=0),
    "qwen2_5_vl": lambda: build_qwen_toy_model("test", seed=0),
    "qwen3_vl": lambda: build_qwen3_toy_model("qwen3_vl", seed=0),
    "qwen3_vl_moe": lambda: build_qwen3_toy_model("qwen3_vl_moe", seed=0),
    "qwen3_5": lambda: build_qwen3_toy_model("qwen3_5", seed=0),
    "qwen3_5_moe": lambda: build_qwen3_toy_model("qwen3_5_moe", seed=0),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_bases_and_splits_on_every_family(family):
    model = FAMILIES[family]()
    tokenizer = build_tokenizer("llava_onevision" if family == "llava_onevision" else family.replace("_moe", ""))
    pixels = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    question = "what colour is the square?"
    full = vidtok.generate(model, tokenizer, pixels, question, None, max_new_tokens=2)
    before = snapshot(model)
    for base in (DiverseSelect, SegmentMerge):
        for method in (base(0.25), DyToK(base(0.25), guide="self"), DyToK(base(0.25), guide=None, allocation="uniqueness"),
                       DyToK(base(0.25), guide="self", allocation="mix:0.5")):
            plan = vidtok.generate(model, tokenizer, pixels, question, method, max_new_tokens=2).plan
            assert [len(k) for k in plan.kept] == plan.budgets and sum(plan.budgets) == plan.total_budget, (family, str(method))
        exact = vidtok.generate(model, tokenizer, pixels, question, DyToK(base(1.0), guide="self"), max_new_tokens=2)
        assert torch.equal(exact.sequences, full.sequences), (family, base.name)
    assert_unchanged(model, before)
