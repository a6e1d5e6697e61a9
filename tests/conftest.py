"""Tiny LLaVA-OneVision models built from configs in code: nothing is downloaded."""

import numpy as np
import pytest
import torch

from vidtok.testbed.toy import build_tokenizer, build_toy_model

from helpers import FRAMES


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _warmed(seed):
    # transformers installs its own output-recording hooks on the vision tower at the first video
    # forward and keeps them; run one so that "no hooks added" compares with the model's own state.
    model = build_toy_model("test", seed=seed)
    with torch.no_grad():
        model.model.get_video_features(torch.zeros(1, 1, 3, 64, 64))
    return model


@pytest.fixture
def model():
    return _warmed(0)


@pytest.fixture
def assistant():
    return _warmed(1)


@pytest.fixture
def pixels():
    return torch.randn(FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def frames_uint8():
    return np.random.default_rng(0).integers(0, 256, size=(FRAMES, 64, 64, 3), dtype=np.uint8)
