"""The shipped toy Qwen2.5-VL pair (trained by `python -m vidtok.testbed.train --family qwen2_5_vl`):
it answers the shipped sample with all tokens and under DyToK, and the assistant's prior finds
the needle's temporal group."""

import json

import pytest
import torch

from vidtok import DyToK, VisionZip, generate
from vidtok.testbed.toy import ASSETS

MAIN, ASSISTANT, SAMPLE = ASSETS / "toy-qwen2.5-vl", ASSETS / "toy-qwen2.5-vl-assistant", ASSETS / "sample"

pytestmark = pytest.mark.skipif(
    not ((MAIN / "model.safetensors").is_file() and (ASSISTANT / "model.safetensors").is_file()),
    reason="the toy Qwen2.5-VL pair is not in this install (train it: python -m vidtok.testbed.train --family qwen2_5_vl ...)",
)


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(MAIN).eval()
    assistant = AutoModelForImageTextToText.from_pretrained(ASSISTANT).eval()
    return model, assistant, AutoTokenizer.from_pretrained(MAIN)


@pytest.fixture(scope="module")
def sample():
    return json.loads((SAMPLE / "sample.json").read_text())


def test_shipped_folders_are_complete_qwen_checkpoints(pair):
    model, assistant, _ = pair
    for folder in (MAIN, ASSISTANT):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                     "training.json", "training.log", "video_preprocessor_config.json"):
            assert (folder / name).is_file(), f"{folder.name}/{name}"
        size = json.loads((folder / "video_preprocessor_config.json").read_text())["size"]
        assert size == {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}  # 64-px frames used as they are
    assert type(model).__name__ == type(assistant).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.config.text_config.hidden_size == 128 and assistant.config.text_config.hidden_size == 64


def test_main_model_answers_the_sample_with_all_tokens(pair, sample):
    model, _, tokenizer = pair
    with torch.no_grad():
        result = generate(model, tokenizer, SAMPLE / "sample.mp4", sample["question"], None, frames=16, max_new_tokens=2)
    assert result.text.split()[0] == sample["answer"]
    assert result.plan.unit == "temporal_group" and result.plan.frames == 8 and result.plan.tokens_per_frame == 16


def test_dytok_with_the_assistant_answers_and_its_prior_peaks_at_the_needle_group(pair, sample):
    model, assistant, tokenizer = pair
    method = DyToK(VisionZip(retention=0.25), guide=assistant)
    with torch.no_grad():
        result = generate(model, tokenizer, SAMPLE / "sample.mp4", sample["question"], method, frames=16, max_new_tokens=2)
    plan = result.plan
    assert result.text.split()[0] == sample["answer"]
    assert plan.visual_tokens_kept == sum(plan.budgets) == round(0.25 * 8 * 16)
    group = sample["needle_frame"] // 2  # two frames per temporal group
    weights = plan.frame_weights
    assert max(range(len(weights)), key=weights.__getitem__) == group, weights
    assert plan.budgets[group] == max(plan.budgets)
