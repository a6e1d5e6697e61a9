"""The adapter contract: what vidtok needs from a model family, and nothing more.

The pipeline talks to every family through these methods and never branches on one. A video is
cut into *units*, the unit of importance and budget: a frame for LLaVA-OneVision, a temporal
group of `temporal_patch_size` frames for the Qwen-VL line, whose encoder merges them into one
set of tokens. Every unit of one video has the same number of tokens (`video_shape`), which may
depend on the video's resolution.

    pixels(video, frames, fps)    a path, uint8 frames or the family's own pixel input -> pixel input
    video_shape(pixels)           -> (units, tokens per unit)
    encode_video(pixels, signals) -> EncodedVideo: unit tokens [U, T, D] as the LLM sees them, the
                                     tokens that follow the video (LLaVA's newline; none for Qwen),
                                     optional vision signals on the same grid (VisionZip)
    prompt_ids(tokenizer, q, counts, pixels)
                                  the chat prompt with counts[u] placeholders for unit u (and the
                                  trailing tokens); families with one run of placeholders use
                                  input_ids(tokenizer, q, n), the run expanded to n; a timestamped
                                  layout (Qwen3-VL) builds one block per unit
    visual_positions(input_ids)   prompt positions of the unit tokens, unit-major
    model_inputs(ids, embeds, encoded, kept, companions)
                                  keyword arguments for model(...) / model.generate(...): the kept
                                  tokens' embeddings and, where the family has them, their
                                  positions from the full layout (kept: per unit, ascending) and
                                  their compressed companions (None: every token's)
    token_attention(ids, embeds, layers, encoded)
                                  the last prompt token's attention to the unit tokens at `layers`
    decoder_layers                the LLM's decoder layers (FastV drops tokens from one of them on)
    attention_layers              the layers with softmax attention, where a last-token attention
                                  exists (all, except in hybrid LLMs such as Qwen3.5's)
    guide_layers(layers)          guide layers resolved for this LLM (None: the last third of its
                                  attention layers); a layer without attention is a clear error
    check_fastv_layer(K)          FastV's layer K: inside 1..L-1, and one the family can drop from
                                  (check_drop_layer: DeepStack layers, a ranking layer without attention)
    layout()                      what an assistant must share with the main model
    pool_frames, subsample_units  optional cheap guide views (guide_pool, guide_stride); the
                                  default refuses them with a clear error

Adapters are built per call and hold no state between calls; only they know a model's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..compressors.base import FrameSignals


def cache_keyword(module) -> str:
    """The KV cache's keyword in a model's forward: transformers 5.24 renamed past_key_values to cache
    (the old name goes in 5.40); vLLM pins 5.19, which knows only the old one."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@dataclass
class EncodedVideo:
    features: torch.Tensor  # [U, T, D] unit tokens, projected, in the LLM's raster order within a unit
    newline: torch.Tensor  # [E, D] tokens after the video that are never compressed (E = 0 or 1)
    signals: FrameSignals | None
    vision_hidden: torch.Tensor  # what an assistant with an equal vision tower can reuse (see project())
    meta: dict = field(default_factory=dict)  # family-specific layout (grid, time scale) for positions
    # per-token features that travel with the unit tokens through compression, [U, T, Dc] each
    # (Qwen3-VL's DeepStack): compressed as extra channels of the same tokens, so every list keeps
    # exactly the tokens the main features keep, in the same order, merged the same way
    companions: list = field(default_factory=list)


class VideoAdapter:
    """Base class of the per-family adapters; subclasses implement every method below."""

    model_type: ClassVar[str] = ""
    unit: ClassVar[str] = "frame"  # the unit of importance and budget, as the plan names it
    trailing_tokens: ClassVar[int] = 0  # uncompressed tokens after the video (LLaVA-OV's newline: 1)
    # the vision tower's per-token signals the adapter can give a compressor (FrameSignals fields)
    vision_signals: ClassVar[tuple[str, ...]] = ("attention", "metric")
    frames_per_unit: ClassVar[int] = 1  # a frame-level label (a needle's frame) is unit frame // frames_per_unit

    model: Any
    num_layers: int

    def layout(self) -> dict:
        raise NotImplementedError

    def pixels(self, video, frames: int | None = None, fps: float | None = None):
        raise NotImplementedError

    def video_shape(self, pixels) -> tuple[int, int]:
        raise NotImplementedError

    def encode_video(self, pixels, signals: bool = False) -> EncodedVideo:
        raise NotImplementedError

    def encode_videos(self, videos: list, signals: bool = False) -> list[EncodedVideo]:
        """encode_video for several videos; a family whose tower takes them in one call overrides it."""
        return [self.encode_video(pixels, signals=signals) for pixels in videos]

    def display(self, pixels) -> tuple[torch.Tensor, tuple[int, int]]:
        """For pictures: the first frame of each unit as RGB in [0, 1], [U, H, W, 3], and a unit's token grid (rows, cols)."""
        raise NotImplementedError

    def project(self, vision_hidden, like: EncodedVideo) -> EncodedVideo:
        """Another model's vision output through this model's own head: what encode_video gives when
        the two share a vision tower (checked by same_vision_tower)."""
        raise NotImplementedError

    def same_vision_tower(self, other) -> bool:
        raise NotImplementedError

    def pool_frames(self, features: torch.Tensor, factor: int) -> torch.Tensor:
        raise ValueError(f"guide_pool is not supported for {self.model_type}; use guide_pool=1")

    def subsample_units(self, encoded: EncodedVideo, pixels, stride: int):
        """(encoded, pixels) of every `stride`-th unit, as a video of its own: a cheap guide's view."""
        raise ValueError(f"guide_stride is not supported for {self.model_type}; use guide_stride=1")

    def input_ids(self, tokenizer, question: str, video_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def prompt_ids(self, tokenizer, question: str, counts: list[int], pixels=None) -> torch.Tensor:
        return self.input_ids(tokenizer, question, sum(counts) + self.trailing_tokens)

    def check_fastv_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers - 1:
            raise ValueError(f"FastV's layer {layer} is outside 1..{self.num_layers - 1} for an LLM of {self.num_layers} layers; "
                             "pick a layer in that range")
        self.check_drop_layer(layer)

    def check_drop_layer(self, layer: int) -> None:
        """What a family adds to check_fastv_layer (nothing here)."""

    @property
    def attention_layers(self) -> list[int]:
        return list(range(self.num_layers))

    def guide_layers(self, layers=None) -> list[int]:
        from ..importance import parse_layers

        attention = self.attention_layers
        if layers is None:  # the last third of the attention layers (16..23 of 24, the reference setting)
            return attention[len(attention) - max(1, len(attention) // 3) :]
        chosen = parse_layers(layers, self.num_layers)
        other = [layer for layer in chosen if layer not in attention]
        if other:
            raise ValueError(
                f"guide layer(s) {other} have no softmax attention (linear-attention layers), so no last-token attention "
                f"to read; pick among the attention layers {attention}"
            )
        return chosen

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_inputs(self, input_ids, video_embeds, encoded: EncodedVideo | None = None, kept=None, companions=None) -> dict:
        raise NotImplementedError

    def token_attention(self, input_ids, video_embeds, layers: list[int], encoded: EncodedVideo | None = None) -> torch.Tensor:
        """The last prompt token's attention to the unit tokens at `layers`: [len(layers), N]."""
        return self.token_attention_batch([(input_ids, video_embeds, encoded)], layers)[0]

    def token_attention_batch(self, items, layers: list[int], pad_id: int | None = None) -> list[torch.Tensor]:
        """token_attention for several prompts ((input_ids, video_embeds, encoded) each) in one
        left-padded forward: each item's own last token and visual positions, [len(layers), N_i] each.
        Runs the LLM only up to the attention of the deepest chosen layer (no later layers, no LM
        head, no KV cache), with sdpa everywhere."""
        inputs = [self.model_inputs(ids, embeds, encoded) for ids, embeds, encoded in items]
        batch, pads = self.batch_inputs(inputs, pad_id)
        visual = [self.visual_positions(ids) + pad for (ids, _, _), pad in zip(items, pads)]
        return capture_last_token_attention(self, visual, layers, lambda: self.inner(**batch, use_cache=False))

    def token_attention_shared(self, items, layers: list[int]) -> tuple[list[torch.Tensor], int] | None:
        """token_attention for prompts on one video that differ only after it (several questions):
        in a causal LLM the video's keys and values do not depend on what follows, so the shared
        prefix (everything up to the first token that differs, the whole video included) runs once
        into a KV cache, and each prompt's own tokens run on a copy of it. Returns (the attention of
        each item, the prefix length), or None where the prompts differ before the video ends."""
        import copy

        from transformers import DynamicCache

        inputs = [self.model_inputs(ids, embeds, encoded) for ids, embeds, encoded in items]
        ids = [item["input_ids"][0] for item in inputs]
        shortest = min(len(i) for i in ids)
        prefix = next((n for n in range(shortest) if any(int(i[n]) != int(ids[0][n]) for i in ids)), shortest)
        prefix = min(prefix, shortest - 1)  # every prompt runs at least its last token on top of the prefix
        placeholders = (ids[0] == self.video_token_id).nonzero()
        if prefix <= int(placeholders.max()):
            return None

        def head(value, n):
            return value[..., :n] if torch.is_tensor(value) else value

        first = {k: head(v, prefix) if k in ("input_ids", "attention_mask", "position_ids") else v for k, v in inputs[0].items()}
        cache = DynamicCache(config=self.model.config.get_text_config())
        # stopped inside the deepest guide layer, as every guide pass: the cache holds the layers the questions read
        key = cache_keyword(self.inner)
        run_until(self, max(layers), lambda: self.inner(**first, **{key: cache}, use_cache=True))
        out = []
        for item, (raw_ids, _, _) in zip(inputs, items):
            rest = {"input_ids": item["input_ids"][:, prefix:], "attention_mask": item["attention_mask"]}
            if "position_ids" in item:
                rest["position_ids"] = item["position_ids"][..., prefix:]
            own = copy.deepcopy(cache)
            visual = self.visual_positions(raw_ids)
            out += capture_last_token_attention(self, [visual], layers, lambda: self.inner(**rest, **{key: own}, use_cache=True))
        return out, prefix

    def batch_inputs(self, items: list[dict], pad_id: int | None = None) -> tuple[dict, list[int]]:
        """Per-prompt model inputs (batch 1 each, from model_inputs) -> one batch, left-padded as a
        tokenizer pads for generation, and each item's pad count. Pads are masked; each item keeps
        its own positions (LLaVA's 1-D ones counted from its first real token, Qwen's 3-D ones as
        model_inputs computed them); the video embeddings follow the items in order. One item is
        returned as it is."""
        if len(items) == 1:
            return items[0], [0]
        if pad_id is None or pad_id in (getattr(self, "video_token_id", None), getattr(self, "image_token_id", None)):
            raise ValueError(f"a batch needs a pad token id that is not a media placeholder, got {pad_id!r}; set tokenizer.pad_token")
        length = max(item["input_ids"].shape[1] for item in items)
        pads = [length - item["input_ids"].shape[1] for item in items]
        pad = torch.nn.functional.pad
        batch = {
            "input_ids": torch.cat([pad(item["input_ids"], (p, 0), value=pad_id) for item, p in zip(items, pads)]),
            "attention_mask": torch.cat([pad(item["attention_mask"], (p, 0), value=0) for item, p in zip(items, pads)]),
        }
        if "position_ids" in items[0]:  # [3, 1, S] each -> [3, B, S]
            batch["position_ids"] = torch.cat([pad(item["position_ids"], (p, 0), value=0) for item, p in zip(items, pads)], dim=1)
        else:  # 1-D positions: what generate() derives from the mask, so that a plain forward sees them too
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["mm_encoder_outputs"] = {key: _merge([item["mm_encoder_outputs"][key] for item in items]) for key in items[0]["mm_encoder_outputs"]}
        return batch, pads

    @property
    def decoder_layers(self):
        raise NotImplementedError

    @property
    def vision_layers(self):
        """The vision tower's repeated blocks, in order."""
        raise NotImplementedError

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


def _merge(values):
    """The encoder outputs of several prompts as one: tensors [1, N, D] joined along the tokens,
    tuples (one entry per video) and lists (DeepStack layers) entry by entry, in item order."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values, dim=-2)
    if isinstance(first, tuple):
        return tuple(x for value in values for x in value)
    if isinstance(first, list):
        return [_merge(list(column)) for column in zip(*values)]
    return type(first)(**{key: _merge([value[key] for value in values]) for key in first.keys()})


def run_until(adapter, layer: int, forward) -> None:
    """Run `forward()` and stop inside `layer`'s attention: its KV cache entry is written (the cache
    is updated before attention runs), no later layer runs."""
    from .._seam import StopForward, observe_attention

    def stop(module, query, key, scaling, **_):
        raise StopForward

    with observe_attention(adapter.model, ["text_config"], {adapter.decoder_layers[layer].self_attn: stop}):
        try:
            forward()
        except StopForward:
            return
    raise RuntimeError(f"layer {layer} was never run: the forward stopped before it")


def capture_last_token_attention(adapter, visual: list[torch.Tensor], layers: list[int], forward) -> list[torch.Tensor]:
    """Run `forward()` (the LLM on a batch of full prompts, left-padded) with observers on `layers`:
    each item's last token's attention to its unit tokens (`visual[b]`, positions in the batch),
    [len(layers), N_b] per item. Stops inside the deepest chosen layer."""
    from .._seam import StopForward, observe_attention
    from ..importance import last_token_attention

    deepest = max(layers)
    captured: dict[int, list[torch.Tensor]] = {}

    def observer(layer):
        def observe(module, query, key, scaling, **_):
            captured[layer] = [last_token_attention(query[b : b + 1], key[b : b + 1], v.to(query.device), scaling)[0]
                               for b, v in enumerate(visual)]
            if layer == deepest:
                raise StopForward

        return observe

    observers = {adapter.decoder_layers[layer].self_attn: observer(layer) for layer in layers}
    with observe_attention(adapter.model, ["text_config"], observers):
        try:
            forward()
        except StopForward:
            pass
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise RuntimeError(f"guide layers {missing} were never run: the guide's attention could not be captured")
    return [torch.stack([captured[layer][b] for layer in layers]) for b in range(len(visual))]
