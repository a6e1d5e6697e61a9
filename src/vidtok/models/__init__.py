"""One adapter per model family, looked up by `config.model_type`. Only adapters know a model's internals."""

from __future__ import annotations

import os

from .base import EncodedVideo, VideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter, QwenVideo
from .qwen3_vl import Qwen3_5Adapter, Qwen3_5MoeAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter

_ADAPTERS: dict[str, type] = {}


class UnsupportedModelError(ValueError):
    """The model's family has no vidtok adapter (supported_model_types() lists those that do)."""


def register_adapter(model_type: str, adapter_cls: type) -> None:
    """Make vidtok handle models whose config.model_type is `model_type` through `adapter_cls` (docs/models.md)."""
    if model_type in _ADAPTERS:
        raise ValueError(f"an adapter for {model_type!r} is already registered ({_ADAPTERS[model_type].__name__}); pick another model_type")
    _ADAPTERS[model_type] = adapter_cls


def supported_model_types() -> list[str]:
    """The config.model_type values vidtok has an adapter for."""
    return sorted(_ADAPTERS)


def adapter_for(model):
    """The adapter of a loaded model: what vidtok knows of its family (units, tokens, layers, prompt layout)."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"expected a loaded model, got the path {str(model)!r}; load it first, e.g. "
            "AutoModelForImageTextToText.from_pretrained(path).eval()"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"vidtok does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(supported_model_types())}. Load e.g. a LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL or Qwen3.5 checkpoint "
            "with AutoModelForImageTextToText"
        )
    return _ADAPTERS[model_type](model)


register_adapter("llava_onevision", LlavaOnevisionAdapter)
register_adapter("qwen2_5_vl", Qwen2_5_VLAdapter)
register_adapter("qwen3_vl", Qwen3VLAdapter)
register_adapter("qwen3_vl_moe", Qwen3VLMoeAdapter)
register_adapter("qwen3_5", Qwen3_5Adapter)
register_adapter("qwen3_5_moe", Qwen3_5MoeAdapter)

__all__ = ["EncodedVideo", "QwenVideo", "UnsupportedModelError", "VideoAdapter", "adapter_for", "register_adapter", "supported_model_types"]
