"""Qwen2.5-VL under vLLM with DyToK: `DyToKQwen2_5_VL` (architecture
`DyToKQwen2_5_VLForConditionalGeneration`) and its processor.

The unit is the temporal group (two frames), as in vidtok.generate. Kept tokens keep their 3-D
positions from the full layout, through vLLM's pruning hooks: every media embedding leaves
`embed_multimodal` with six trailing channels carrying its tokens' positions relative to the block
(two base-256 digits per axis, exact in bf16), and `recompute_mrope_positions` writes them into the
prompt's positions and strips them. Text positions never move: `get_mrope_input_positions` lays the
prompt out as the full video would (text after a video starts at the full block's largest
position + 1, the original Qwen rule), so the position delta is right from the start.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...compressors import FrameSignals
from ...importance import frame_weights
from ...models.base import EncodedVideo
from ...models.mrope import layout_positions, vision_block
from .processor import FIELDS, DyToKProcessorMixin
from .runtime import (
    GUIDE_NAMES,
    Records,
    channels_to_positions,
    compress,
    expand_marker,
    load_assistant,
    positions_to_channels,
    self_guide_attention,
    split_budgets,
    tensor_parallel_size,
    tp_mean,
)
from .settings import split_kwargs

ARCHITECTURE = "DyToKQwen2_5_VLForConditionalGeneration"
CHANNELS = 6  # position channels appended to each media embedding between embed_multimodal and recompute_mrope_positions
LAYOUT = {  # what an assistant must share with the main model
    "video_token_id": lambda c: c.video_token_id,
    "patch_size": lambda c: c.vision_config.patch_size,
    "spatial_merge_size": lambda c: c.vision_config.spatial_merge_size,
    "temporal_patch_size": lambda c: c.vision_config.temporal_patch_size,
}


class DyToKQwen2_5_VLProcessor(DyToKProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def _dytok_shape(self, processed, index: int) -> tuple[int, int]:
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        t, h, w = (int(x) for x in processed["video_grid_thw"][index])
        return t, (h // merge) * (w // merge)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        _, rest = split_kwargs(hf_processor_mm_kwargs)
        updates = [u for u in super()._get_prompt_updates(mm_items, rest, out_mm_kwargs) if u.modality != "video"]
        config = self.info.get_hf_config()
        token, merge = config.video_token_id, config.vision_config.spatial_merge_size

        def video(item_idx: int):
            budget = self._dytok_budget(out_mm_kwargs, item_idx)
            if budget is None:
                budget = int(out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.prod()) // merge**2
            return [token] * budget

        return [*updates, PromptReplacement(modality="video", target=[token], replacement=video)]


class _Holder:
    """Keeps the assistant out of the main model's modules (and its state_dict)."""

    model = None


@MULTIMODAL_REGISTRY.register_processor(
    DyToKQwen2_5_VLProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class DyToKQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, its video tokens compressed by DyToK (docs/vllm.md)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm.platforms import current_platform

        if not (self.is_multimodal_pruning_enabled or current_platform.is_cpu() or vllm_config.model_config.enforce_eager):
            # the fallback (positions added in forward) is Python around the LLM: a CUDA graph replay would skip it
            raise ValueError(f"{ARCHITECTURE} on a GPU needs vLLM's pruning hook, which moves the kept tokens' 3-D positions: start "
                             "vLLM with --video-pruning-rate R (any R in (0, 1); DyToK's default retention is 1 - R unless "
                             "dytok_retention is set), or with --enforce-eager")
        self.dytok_records = Records()
        server = dict(self.multimodal_config.mm_processor_kwargs or {})
        self._dytok_assistant_folder = server.get("dytok_assistant")
        self._dytok_tokenizer_folder = vllm_config.model_config.tokenizer
        self._dytok = _Holder()
        self._dytok_pending = None  # (media mask, relative positions) of this step, where the runner skipped the hook

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._dytok_assistant_folder and self._dytok.model is None:  # beside the main model, on its device and dtype
            parameter = next(self.visual.parameters())
            self._dytok.model = load_assistant(self._dytok_assistant_folder, self.config, parameter.device, parameter.dtype,
                                               LAYOUT, self._dytok_tokenizer_folder)
        return loaded

    # positions ------------------------------------------------------------------------------

    def _interval(self, seconds) -> float:
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return float(seconds) * tokens_per_second if seconds is not None else float(tokens_per_second)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions of a prompt whose videos hold fewer placeholders than their grid: text where the
        full layout puts it; every media placeholder provisionally at its block's start, to which
        the kept token's position relative to the block is added once the encoder has chosen it."""
        parts, done, start = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            (offset, t, h, w, t_factor), length = next(self.iter_mm_grid_thw([feature])), feature.mm_position.length
            if offset > done:
                parts.append(torch.arange(start, start + offset - done).expand(3, -1))
                start += offset - done
            parts.append(torch.full((3, length), start, dtype=torch.long))
            start, done = int(vision_block(start, t, h, w, t_factor).max()) + 1, offset + length
        if len(input_tokens) > done:
            parts.append(torch.arange(start, start + len(input_tokens) - done).expand(3, -1))
        positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """vLLM's pruning hook (where its runner calls it): each media embedding of this prefill chunk
        (whole, or the chunk's part of it) carries its tokens' positions relative to its block; they
        are added to the chunk's next media placeholders, and the channels stripped."""
        device = mrope_positions.device
        ids = input_ids.to(device).long() if torch.is_tensor(input_ids) else torch.tensor(input_ids, dtype=torch.long, device=device)
        media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        positions = mrope_positions.clone()
        slots = media.nonzero().reshape(-1)
        slots = slots[slots >= num_computed_tokens]
        cleaned, used = [], 0
        for embedding in multimodal_embeddings:
            where = slots[used : used + embedding.shape[0]]
            used += embedding.shape[0]
            positions[:3, where] += channels_to_positions(embedding[:, -CHANNELS:]).to(positions)
            cleaned.append(embedding[:, :-CHANNELS])
        return cleaned, positions, int(positions.max()) + 1 - ids.shape[0]

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """Where vLLM's runner skipped the pruning hook (vLLM 0.32's CPU runner never enables it), the
        embeddings still carry their position channels: they are stripped here and the positions
        added to this step's media placeholders in `forward`."""
        if multimodal_embeddings is not None:
            self._dytok_pending = None
        width = self.config.text_config.hidden_size
        if multimodal_embeddings is not None and len(multimodal_embeddings) and multimodal_embeddings[0].shape[-1] == width + CHANNELS:
            relative = torch.cat([channels_to_positions(e[:, -CHANNELS:]) for e in multimodal_embeddings], dim=1)
            self._dytok_pending = (is_multimodal, relative)
            multimodal_embeddings = [e[:, :-CHANNELS] for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._dytok_pending = getattr(self, "_dytok_pending", None), None
        if pending is not None and positions.ndim == 2:
            mask, relative = pending
            where = mask.nonzero().reshape(-1).to(positions.device)
            positions = positions.clone()
            positions[:3, where] += relative.to(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        config.modalities = []  # a graph replay would bypass embed_multimodal, where DyToK runs
        return config

    # encoder --------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs):
        carried = {name: kwargs.pop(name, None) for name in FIELDS}
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        merge = self.visual.spatial_merge_size
        for modality, inputs in by_modality.items():
            if modality == "image":
                for embedding, (_, h, w) in zip(self._process_image_input(inputs), inputs["image_grid_thw"].tolist()):
                    relative = vision_block(0, 1, h // merge, w // merge, 1.0)
                    out += (torch.cat([embedding, positions_to_channels(relative, embedding.dtype).to(embedding.device)], 1),)
            elif modality == "video":
                out += tuple(self._dytok_videos(inputs, carried))
        return out

    def _dytok_videos(self, inputs, carried) -> list[torch.Tensor]:
        if inputs["type"] == "video_embeds":
            if carried["dytok_budget"] is not None:
                raise ValueError("DyToK needs the video's pixels (it reads the vision tower's attention): send frames, not video_embeds")
            return [torch.cat([e, positions_to_channels(p, e.dtype).to(e.device)], 1)
                    for e, p in zip(self._process_video_input(inputs), self._video_relatives(inputs))]
        grids = inputs["video_grid_thw"].tolist()
        pixels = inputs["pixel_values_videos"].split([t * h * w for t, h, w in grids])
        seconds = inputs.get("second_per_grid_ts")
        out = []
        for n, (grid, video) in enumerate(zip(grids, pixels)):
            item = {name: (None if value is None else value[n]) for name, value in carried.items()}
            out.append(self._dytok_video(video, grid, None if seconds is None else seconds[n], item))
        return out

    def _video_relatives(self, inputs):
        merge = self.visual.spatial_merge_size
        seconds = inputs.get("second_per_grid_ts")
        return [vision_block(0, t, h // merge, w // merge, self._interval(None if seconds is None else seconds[n]))
                for n, (t, h, w) in enumerate(inputs["video_grid_thw"].tolist())]

    def _dytok_video(self, pixels, grid, seconds, item) -> torch.Tensor:
        merge = self.visual.spatial_merge_size
        units, height, width = grid[0], grid[1] // merge, grid[2] // merge
        per_unit = height * width
        interval = self._interval(seconds)
        budget = units * per_unit if item["dytok_budget"] is None else int(item["dytok_budget"].reshape(-1)[0])
        compressing = budget < units * per_unit
        features, signals = self._encode(pixels, grid, signals=compressing)
        relative = vision_block(0, units, height, width, interval)
        if not compressing:
            return torch.cat([features.flatten(0, 1), positions_to_channels(relative, features.dtype).to(features.device)], 1)
        guide = GUIDE_NAMES[int(item["dytok_guide"].reshape(-1)[0])]
        layers = [int(x) for x in item["dytok_layers"].reshape(-1)]
        weights = None
        if guide != "none":
            ids, visual, before, after = expand_marker(item["dytok_prompt_ids"], self.config.video_token_id, units * per_unit)
            if guide == "self":
                positions = layout_positions([("text", before), ("vision", units, height, width, interval), ("text", after)])
                device = features.device
                visual = visual.to(device)
                scores = self_guide_attention(self.language_model.model, ids.to(device), features.flatten(0, 1), visual, visual,
                                              positions.to(device), layers)
            else:
                scores = self._assistant_scores(pixels, grid, interval, ids, layers)
            weights = frame_weights(scores, units)
        budgets = split_budgets(None if weights is None else weights.tolist(), budget, units, per_unit, budget / (units * per_unit))
        tokens, kept = compress(features, budgets, signals)
        index = torch.tensor([u * per_unit + i for u, k in enumerate(kept) for i in k], dtype=torch.long)
        self.dytok_records.add(prompt_ids=item["dytok_prompt_ids"].reshape(-1).tolist(), units=units, per_unit=per_unit, budget=budget,
                               guide=guide, layers=layers, frame_weights=None if weights is None else weights.tolist(),
                               budgets=budgets, kept=kept)
        return torch.cat([tokens, positions_to_channels(relative[:, index], tokens.dtype).to(tokens.device)], 1)

    def _encode(self, pixels, grid, signals: bool):
        """The video's merged tokens [U, T, D] (vLLM's own tower) and, with `signals`, VisionZip's
        signals from the last full-attention block, as vidtok's Qwen2.5-VL adapter reads them: per
        temporal group, attention received (mean over heads and queries) and keys (mean over heads),
        averaged over the 2x2 patches of a token, in the merger output's raster order."""
        visual = self.visual
        merge = visual.spatial_merge_size
        units, h, w = grid
        per_unit = (h // merge) * (w // merge)
        if not signals:
            return visual(pixels, grid_thw=[grid]).reshape(units, per_unit, -1), None
        meta = visual.prepare_encoder_metadata([grid])
        full = [i for i in visual.fullatt_block_indexes if i < len(visual.blocks)]
        if not full:
            raise ValueError("the vision encoder has no full-attention block to rank tokens by (fullatt_block_indexes is empty)")
        block = visual.blocks[max(full)].attn
        seen = []

        def observe(module, args, kwargs):
            seen.append((kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)))

        handle = block.attn.register_forward_pre_hook(observe, with_kwargs=True)
        try:
            features = visual(pixels, grid_thw=[grid], encoder_metadata=meta)
        finally:
            handle.remove()
        query, key = seen[-1]  # [1, P, heads on this rank, d]
        local = query.shape[2]
        scaling = query.shape[-1] ** -0.5
        patches = h * w
        received, keys = [], []
        for g in range(units):  # the block attends within one temporal group
            q = query[0, g * patches : (g + 1) * patches].transpose(0, 1).float()
            k = key[0, g * patches : (g + 1) * patches].transpose(0, 1).float()
            probs = (q @ k.transpose(-1, -2) * scaling).softmax(-1)
            received.append(probs.mean(dim=(0, 1)))
            keys.append(k.mean(dim=0))
        tp = getattr(block, "tp_size", 1)
        attention = tp_mean(torch.cat(received), local, local * tp, tp)
        metric = tp_mean(torch.cat(keys), local, local * tp, tp)
        unit = merge**2
        order = meta["reverse_indices"].to(attention.device)
        attention = attention.reshape(-1, unit).mean(1)[order]
        metric = metric.reshape(-1, unit, metric.shape[-1]).mean(1)[order]
        frame = FrameSignals(attention=attention.reshape(units, per_unit), metric=metric.reshape(units, per_unit, -1))
        return features.reshape(units, per_unit, -1), frame

    def _assistant_scores(self, pixels, grid, interval, ids, layers) -> torch.Tensor:
        """The assistant's last-token attention on the uncompressed prompt ([layers, N]), by vidtok's adapter."""
        from ...models import adapter_for

        assistant = self._dytok.model
        adapter = adapter_for(assistant)
        merge = self.visual.spatial_merge_size
        units, h, w = grid
        normalised = self.visual.input_norm(pixels.to(adapter.device), adapter.dtype)  # identity unless vLLM normalises on device
        out = adapter.inner.get_video_features(normalised, video_grid_thw=torch.tensor([grid], device=adapter.device), return_dict=True)
        features = out.pooler_output[0].reshape(units, (h // merge) * (w // merge), -1)
        meta = {"groups": units, "height": h // merge, "width": w // merge, "interval": interval, "grid": (units, h, w)}
        encoded = EncodedVideo(features=features, newline=features[0, :0], signals=None, vision_hidden=None, meta=meta)
        return adapter.token_attention(ids[None].to(adapter.device), features.flatten(0, 1), layers, encoded)


__all__ = ["ARCHITECTURE", "DyToKQwen2_5_VL", "DyToKQwen2_5_VLProcessor", "tensor_parallel_size"]
