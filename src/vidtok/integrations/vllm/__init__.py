"""vidtok's vLLM plugin: query-aware DyToK served by an unmodified vLLM (docs/vllm.md).

vLLM loads `register` through the `vllm.general_plugins` entry point (pyproject.toml) in every
process it starts. It adds architectures of its own, so a checkpoint runs with DyToK only when
asked: `hf_overrides={"architectures": ["DyToKQwen2_5_VLForConditionalGeneration"]}` (or
`--hf-overrides` on `vllm serve`); without it vLLM is exactly as it was.

    processor.py        how many placeholders a video gets; the prompt and settings it carries
    runtime.py          the guide passes, the split and VisionZip's selection (vidtok's code)
    settings.py         a request's settings from mm_processor_kwargs (pure Python)
    qwen2_5_vl.py, llava_onevision.py    one model class and one processor per family

Nothing here is imported by vidtok's core; importing this package does not import vLLM.
"""

from __future__ import annotations

ARCHITECTURES = {
    "DyToKQwen2_5_VLForConditionalGeneration": "vidtok.integrations.vllm.qwen2_5_vl:DyToKQwen2_5_VL",
    "DyToKLlavaOnevisionForConditionalGeneration": "vidtok.integrations.vllm.llava_onevision:DyToKLlavaOnevision",
}
# the architecture each plugin class stands in for: a checkpoint of one of these takes the DyToK one
FAMILIES = {
    "Qwen2_5_VLForConditionalGeneration": "DyToKQwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "DyToKLlavaOnevisionForConditionalGeneration",
}


def register() -> None:
    """Register the DyToK architectures with vLLM's model registry (lazily: nothing is imported
    until a model of that architecture is loaded). Safe to call more than once."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for name, target in ARCHITECTURES.items():
        if name not in known:
            ModelRegistry.register_model(name, target)


def hf_overrides(architecture: str) -> dict:
    """The `hf_overrides` that run a checkpoint of `architecture` (its config's `architectures[0]`,
    e.g. "Qwen2_5_VLForConditionalGeneration") with DyToK."""
    if architecture not in FAMILIES:
        raise ValueError(f"vidtok's vLLM plugin supports {', '.join(FAMILIES)}; got {architecture!r}")
    return {"architectures": [FAMILIES[architecture]]}


__all__ = ["ARCHITECTURES", "FAMILIES", "hf_overrides", "register"]
