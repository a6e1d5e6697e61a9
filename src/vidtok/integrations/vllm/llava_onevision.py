"""LLaVA-OneVision under vLLM with DyToK: `DyToKLlavaOnevision` (architecture
`DyToKLlavaOnevisionForConditionalGeneration`) and its processor.

The unit is the frame (ceil(g/2)^2 pooled tokens); the one `image_newline` after the video is kept,
so a video takes B + 1 placeholders. Positions are 1-D: a compressed video is a shorter prompt, as
in vidtok.generate, and nothing needs to move.
"""

from __future__ import annotations

import math

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...compressors import FrameSignals
from ...importance import frame_weights
from .processor import FIELDS, DyToKProcessorMixin
from .runtime import GUIDE_NAMES, Records, compress, expand_marker, load_assistant, self_guide_attention, split_budgets, tp_mean
from .settings import split_kwargs

ARCHITECTURE = "DyToKLlavaOnevisionForConditionalGeneration"
LAYOUT = {  # what an assistant must share with the main model
    "video_token_index": lambda c: c.video_token_index,
    "image_size": lambda c: c.vision_config.image_size,
    "patch_size": lambda c: c.vision_config.patch_size,
}


class DyToKLlavaOnevisionProcessor(DyToKProcessorMixin, LlavaOnevisionMultiModalProcessor):
    def _dytok_shape(self, processed, index: int) -> tuple[int, int]:
        vision = self.info.get_hf_config().vision_config
        frames = processed["pixel_values_videos"][index].shape[0]
        return frames, math.ceil(vision.image_size // vision.patch_size / 2) ** 2

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        _, rest = split_kwargs(hf_processor_mm_kwargs)
        updates = list(super()._get_prompt_updates(mm_items, rest, out_mm_kwargs))
        video = next(u for u in updates if u.modality == "video")
        token = self.info.get_hf_config().video_token_index

        def replacement(item_idx: int):
            budget = self._dytok_budget(out_mm_kwargs, item_idx)
            return video.replacement(item_idx) if budget is None else [token] * (budget + 1)  # + the newline

        others = [u for u in updates if u.modality != "video"]
        return [*others, PromptReplacement(modality="video", target=[token], replacement=replacement)]


class _Holder:
    """Keeps the assistant out of the main model's modules (and its state_dict)."""

    model = None


@MULTIMODAL_REGISTRY.register_processor(
    DyToKLlavaOnevisionProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class DyToKLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision, its video tokens compressed by DyToK (docs/vllm.md)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.config.vision_feature_select_strategy != "full":
            raise ValueError("DyToK on LLaVA-OneVision needs vision_feature_select_strategy='full' (SigLIP has no CLS token), "
                             f"got {self.config.vision_feature_select_strategy!r}")
        self.dytok_records = Records()
        server = dict(self.multimodal_config.mm_processor_kwargs or {})
        self._dytok_assistant_folder = server.get("dytok_assistant")
        self._dytok_tokenizer_folder = vllm_config.model_config.tokenizer
        self._dytok = _Holder()

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._dytok_assistant_folder and self._dytok.model is None:
            self._dytok.model = load_assistant(self._dytok_assistant_folder, self.config, self.image_newline.device,
                                               self.image_newline.dtype, LAYOUT, self._dytok_tokenizer_folder)
        return loaded

    def embed_multimodal(self, **kwargs):
        carried = {name: kwargs.pop(name, None) for name in FIELDS}
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inputs in by_modality.items():
            if modality == "image":
                out += tuple(self._process_image_input(inputs))
            elif modality == "video":
                videos = inputs["pixel_values_videos"]
                for n, video in enumerate(videos):
                    item = {name: (None if value is None else value[n]) for name, value in carried.items()}
                    out += (self._dytok_video(video, item),)
        return out

    def _feature_attention(self):
        """The vision tower's attention module whose layer gives the features (vidtok's adapter reads the same)."""
        layers = self.vision_tower.vision_model.encoder.layers
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        index = feature_layer % (self.config.vision_config.num_hidden_layers + 1) - 1
        if index < 0:
            raise ValueError("vision_feature_layer selects the patch embeddings: there is no attention to rank tokens by")
        return layers[index].self_attn.attn

    def _encode(self, pixels: torch.Tensor, signals: bool):
        """Frames [F, 3, S, S] -> pooled tokens [F, T, D] (vLLM's own tower, projector and pooling) and,
        with `signals`, VisionZip's: the feature layer's attention received (mean over heads and
        queries, frame by frame) and keys (mean over heads), pooled to the token grid like the features."""
        seen = []

        def observe(module, args, kwargs):
            seen.append((module, kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)))

        handle = self._feature_attention().register_forward_pre_hook(observe, with_kwargs=True) if signals else None
        try:
            features = self._video_pixels_to_features(self.vision_tower, pixels)
        finally:
            if handle is not None:
                handle.remove()
        if not signals:
            return features, None
        module, query, key = seen[-1]
        frames, patches = pixels.shape[0], query.shape[-2] if query.ndim == 4 else query.shape[1]
        local = module.num_heads
        query = query.reshape(frames, patches, local, -1).transpose(1, 2)
        key = key.reshape(frames, patches, local, -1).transpose(1, 2)
        scaling = query.shape[-1] ** -0.5
        received = []
        for f in range(frames):  # one frame at a time: [H, N, N] at most
            probs = (query[f].float() @ key[f].float().transpose(-1, -2) * scaling).softmax(-1)
            received.append(probs.mean(dim=(0, 1)))
        total = self.config.vision_config.num_attention_heads
        tp = total // local
        attention = tp_mean(torch.stack(received), local, total, tp)
        metric = tp_mean(key.float().mean(dim=1), local, total, tp)
        frame = FrameSignals(attention=self.apply_pooling(attention[..., None])[..., 0], metric=self.apply_pooling(metric))
        return features, frame

    def _dytok_video(self, pixels: torch.Tensor, item) -> torch.Tensor:
        frames = pixels.shape[0]
        newline = self.image_newline[None]
        budget = None if item["dytok_budget"] is None else int(item["dytok_budget"].reshape(-1)[0])
        features, signals = self._encode(pixels, signals=budget is not None and budget < frames * self._tokens_per_frame())
        per_unit = features.shape[1]
        if budget is None or budget == frames * per_unit:
            return torch.cat([features.flatten(0, 1), newline.to(features.dtype)])
        guide = GUIDE_NAMES[int(item["dytok_guide"].reshape(-1)[0])]
        layers = [int(x) for x in item["dytok_layers"].reshape(-1)]
        weights = None
        if guide != "none":
            ids, placed, _, _ = expand_marker(item["dytok_prompt_ids"], self.config.video_token_index, frames * per_unit + 1)
            if guide == "self":
                device = features.device
                video = torch.cat([features.flatten(0, 1), newline.to(features.dtype)])
                scores = self_guide_attention(self.language_model.model, ids.to(device), video, placed.to(device), placed[:-1].to(device),
                                              torch.arange(ids.shape[0], device=device), layers)
            else:
                scores = self._assistant_scores(pixels, ids, layers)
            weights = frame_weights(scores, frames)
        budgets = split_budgets(None if weights is None else weights.tolist(), budget, frames, per_unit, budget / (frames * per_unit))
        tokens, kept = compress(features, budgets, signals)
        self.dytok_records.add(prompt_ids=item["dytok_prompt_ids"].reshape(-1).tolist(), units=frames, per_unit=per_unit, budget=budget,
                               guide=guide, layers=layers, frame_weights=None if weights is None else weights.tolist(),
                               budgets=budgets, kept=kept)
        return torch.cat([tokens, newline.to(tokens.dtype)])

    def _tokens_per_frame(self) -> int:
        vision = self.config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2) ** 2

    def _assistant_scores(self, pixels, ids, layers) -> torch.Tensor:
        """The assistant's last-token attention on the uncompressed prompt ([layers, N]), by vidtok's adapter."""
        from ...models import adapter_for

        adapter = adapter_for(self._dytok.model)
        encoded = adapter.encode_video(pixels.to(adapter.device, adapter.dtype))
        embeds = torch.cat([encoded.features.flatten(0, 1), encoded.newline])
        return adapter.token_attention(ids[None].to(adapter.device), embeds, layers, encoded)


__all__ = ["ARCHITECTURE", "DyToKLlavaOnevision", "DyToKLlavaOnevisionProcessor"]
