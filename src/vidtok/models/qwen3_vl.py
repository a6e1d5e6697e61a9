"""Qwen3-VL (`qwen3_vl`, and its MoE variant `qwen3_vl_moe`): the Qwen2.5-VL pipeline with three
differences that decide what a compressed prompt must look like.

- **Timestamps.** A video is laid out once per temporal group: `<t.t seconds>` text, vision start,
  the group's tokens, vision end. t is the mean time of the group's first and last frame. Under
  DyToK a group's placeholder count is its budget; a group with budget 0 keeps its timestamp and an
  empty start/end pair, so the model still sees the time line.
- **Positions.** Every group is its own 3-D block of one temporal step (the time is in the text),
  and text after a block starts at its largest position + 1. transformers' `get_rope_index` agrees
  here (for a one-step block max(H, W) is max + 1); vidtok still computes them itself, so kept
  tokens keep their full-layout positions.
- **DeepStack.** Features of a few vision blocks (each through its own merger) are added to the
  hidden states of the first LLM layers at the visual positions. Every DeepStack list keeps the
  same tokens, in the same order, as the main features. FastV must drop at or after the last
  layer that receives them.

Layout note: transformers 5.x's processor replaces only the bare `<|video_pad|>` of the chat
template's `<|vision_start|><|video_pad|><|vision_end|>`, leaving an outer start/end pair around
the per-group blocks; the processor Qwen3-VL was released with (transformers 4.57) replaced the
whole triple. vidtok follows the release layout (the triple is replaced; a bare placeholder too).
"""

from __future__ import annotations

import math
import re

import torch

from ..video import VideoError, read_clip_times
from .base import EncodedVideo
from .mrope import vision_block
from .qwen2_5_vl import Qwen2_5_VLAdapter, QwenVideo

# Qwen3VLVideoProcessor's defaults: pixels of the whole video (frames x height x width), ImageNet-standard normalisation
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 32 * 32, 768 * 32 * 32
STANDARD_MEAN = STANDARD_STD = (0.5, 0.5, 0.5)


def video_smart_resize(frames: int, height: int, width: int, factor: int, temporal: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's resizing rule: the pixel budget covers the whole video, frames x height x width
    (sides below `factor` are first scaled up to it); both sides multiples of `factor`."""
    frames = max(frames, temporal)  # the processor refuses a single frame; vidtok repeats it (see pixels)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"the frames' aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the model's limit of 200:1")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def group_timestamps(times, temporal: int) -> list[float]:
    """Seconds printed before each temporal group: the mean of its first and last frame's time."""
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_type = "qwen3_vl"
    family = "Qwen3-VL"
    default_mean, default_std = STANDARD_MEAN, STANDARD_STD
    default_min_pixels, default_max_pixels = VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS

    @staticmethod
    def model_classes():
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

        return Qwen3VLForConditionalGeneration, Qwen3VLModel

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.vision_start_id, self.vision_end_id = config.vision_start_token_id, config.vision_end_token_id
        self.deepstack_layers = len(getattr(config.vision_config, "deepstack_visual_indexes", ()) or ())

    def layout(self) -> dict:
        # dense and MoE Qwen3-VL lay a video out alike: either may guide the other (a 4B guiding a 30B-A3B)
        return {**super().layout(), "model_type": "qwen3_vl" if self.model_type == "qwen3_vl_moe" else self.model_type,
                "vision_start_token_id": self.vision_start_id, "vision_end_token_id": self.vision_end_id}

    # pixels --------------------------------------------------------------------------------

    def _read(self, path, frames, fps):
        def count(total, rate, fps):  # the video processor's: int(seconds x fps), within [min, max] frames
            return min(max(int(total / rate * fps), self.min_frames), self.max_frames, total)

        video, times = read_clip_times(path, frames, fps, fps_count=count)
        seconds = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.5
        return video, seconds, times

    def _target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        return video_smart_resize(frames, height, width, self.factor, self.temporal, self.min_pixels, self.max_pixels)

    def timestamps(self, pixels: QwenVideo) -> list[float]:
        # frames given without a file are taken as sampled at 2 fps (Qwen2.5-VL's assumption; the
        # processor itself would assume 24 fps with a warning)
        times = pixels.times or tuple(i * pixels.seconds_per_frame for i in range(pixels.shape[0]))
        return group_timestamps(times, self.temporal)

    # vision --------------------------------------------------------------------------------

    def _ranking_block(self):
        # every block attends over the whole group; the last one's output is what the merger turns into LLM tokens
        return self.vision_layers[-1].attn

    def encode_video(self, pixels: QwenVideo, signals: bool = False) -> EncodedVideo:
        """QwenVideo -> features [U, T, D] (merger output, raster within a group), the DeepStack
        features on the same grid (companions: one [U, T, D] per LLM layer they feed), optional
        VisionZip signals from the last block (attention received: mean over heads and queries of
        one group's attention; keys: mean over heads; both averaged over the 2x2 patches a token
        merges; no window reordering, Qwen3-VL's blocks attend over the whole group)."""
        return self.encode_videos([pixels], signals=signals)[0]

    def encode_videos(self, videos: list, signals: bool = False) -> list[EncodedVideo]:
        out, patch_signals, grids = self._run_tower(videos, signals)
        encoded = []
        for n, (groups, h, w) in enumerate(grids):
            per_unit = (h // self.merge) * (w // self.merge)
            features = out.pooler_output[n].reshape(groups, per_unit, -1)
            deepstack = [f[n].reshape(groups, per_unit, -1) for f in (getattr(out, "deepstack_features", None) or [])]  # companions
            frame_signals = self._token_signals(patch_signals[n], groups, per_unit) if signals else None
            meta = {"groups": groups, "height": h // self.merge, "width": w // self.merge, "grid": (groups, h, w)}
            encoded.append(EncodedVideo(features=features, newline=features[0, :0], signals=frame_signals, vision_hidden=None, meta=meta,
                                        companions=deepstack))
        return encoded

    def same_vision_tower(self, other) -> bool:
        # DeepStack mergers read intermediate blocks: an assistant runs its own tower (not shared)
        return False

    # prompt and LLM ------------------------------------------------------------------------

    def input_ids(self, tokenizer, question: str, video_tokens: int) -> torch.Tensor:
        raise TypeError("a Qwen3-VL prompt lays the video out per group (timestamps): use prompt_ids(tokenizer, question, counts, pixels)")

    def prompt_ids(self, tokenizer, question: str, counts: list[int], pixels: QwenVideo | None = None) -> torch.Tensor:
        """The chat prompt with the video laid out per group: timestamp, vision start, counts[g]
        placeholders, vision end."""
        stamps = None if pixels is None else self.timestamps(pixels)
        if stamps is None or len(stamps) != len(counts):
            raise ValueError(f"a Qwen3-VL prompt needs the video's frames for its timestamps, one per group ({len(counts)} counts)")
        text = self._chat_text(tokenizer, question)
        start, pad, end = (tokenizer.convert_ids_to_tokens(i) for i in (self.vision_start_id, self.video_token_id, self.vision_end_id))
        video = "".join(f"<{t:.1f} seconds>{start}{pad * n}{end}" for t, n in zip(stamps, counts))
        if text.count(pad) != 1:
            raise ValueError(
                f"the prompt holds {text.count(pad)} video placeholders ({pad}), expected 1: "
                "the tokenizer's chat template does not render a video, or it does not match the model"
            )
        # the template's start/pad/end triple (whitespace between allowed) becomes the blocks; a bare pad too
        wrapped = re.compile(rf"{re.escape(start)}\s*{re.escape(pad)}\s*{re.escape(end)}")
        text = wrapped.sub(lambda _: video, text, count=1) if wrapped.search(text) else text.replace(pad, video, 1)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if sum(i == self.video_token_id for i in ids) != sum(counts):
            raise ValueError(f"the tokenizer split the video placeholders: {sum(counts)} expected; it must hold {pad} as one special token")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def positions(self, input_ids: torch.Tensor, encoded: EncodedVideo, kept=None) -> torch.Tensor:
        """[3, 1, S] positions: text one step at a time; group g's kept tokens where the full layout
        puts them (a one-step block starting after its vision start); after a block's vision end,
        text resumes at the block's largest full-layout position + 1, kept tokens or not."""
        meta = encoded.meta
        height, width, groups = meta["height"], meta["width"], meta["groups"]
        block = vision_block(0, 1, height, width, 0.0)  # [3, H*W] offsets of a full group
        kept = kept if kept is not None else [range(height * width)] * groups
        ids = input_ids[0].tolist()
        parts, position, group, i = [], 0, 0, 0
        while i < len(ids):
            if ids[i] == self.video_token_id:
                raise ValueError(f"a video placeholder outside a vision start/end pair at prompt position {i}")
            parts.append(torch.full((3, 1), position))
            position += 1
            if ids[i] == self.vision_start_id:
                if group >= groups:
                    raise ValueError(f"the prompt has more vision blocks than the video's {groups} groups")
                n = len(kept[group])
                if ids[i + 1 : i + 1 + n] != [self.video_token_id] * n or i + 1 + n >= len(ids) or ids[i + 1 + n] != self.vision_end_id:
                    raise ValueError(f"group {group}'s block does not hold its {n} kept tokens between vision start and end")
                parts.append(block[:, torch.as_tensor(list(kept[group]), dtype=torch.long)] + position)
                position += max(height, width)
                group, i = group + 1, i + 1 + n
                continue
            i += 1
        if group != groups:
            raise ValueError(f"the prompt has {group} vision blocks for the video's {groups} groups")
        return torch.cat(parts, dim=1)[:, None].to(input_ids.device)

    def model_inputs(self, input_ids, video_embeds, encoded: EncodedVideo | None = None, kept=None, companions=None) -> dict:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        inputs = super().model_inputs(input_ids, video_embeds, encoded, kept)
        if not self.deepstack_layers:  # Qwen3.5: no DeepStack, the plain vision output
            return inputs
        if companions is None:  # every token: the uncompressed prompt (a guide pass, retention 1.0)
            companions = [c.flatten(0, 1) for c in encoded.companions]
        if any(c.shape[0] != video_embeds.shape[0] for c in companions):
            raise ValueError(f"DeepStack features of {[c.shape[0] for c in companions]} tokens for {video_embeds.shape[0]} video tokens")
        inputs["mm_encoder_outputs"] = {
            "video": BaseModelOutputWithDeepstackFeatures(pooler_output=(video_embeds,), deepstack_features=[(c,) for c in companions])
        }
        return inputs

    def check_drop_layer(self, layer: int) -> None:
        if layer < self.deepstack_layers:
            raise ValueError(
                f"FastV drops tokens from layer {layer} on, but DeepStack adds vision features to the visual tokens after "
                f"LLM layers 0-{self.deepstack_layers - 1}; use a FastV layer >= {self.deepstack_layers} for this model"
            )


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_type = "qwen3_vl_moe"
    family = "Qwen3-VL-MoE"

    @staticmethod
    def model_classes():
        from transformers import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel

        return Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5 (`qwen3_5`): Qwen3-VL's video layout, positions and vision tower (without DeepStack),
    in front of a hybrid LLM whose layers are either softmax attention or linear attention (gated
    delta rule with a short causal convolution; `config.text_config.layer_types`).

    Only attention layers have a last-token attention: guide layers, the inline prior and FastV's
    ranking layer K-1 must be among them. FastV may drop at any K: the layers from K on, linear
    ones included, then run on the kept tokens only, so a linear layer's recurrent and
    convolution state is the recurrence over the kept prompt tokens, which decoding continues.
    """

    model_type = "qwen3_5"
    family = "Qwen3.5"

    @staticmethod
    def model_classes():
        from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5Model

        return Qwen3_5ForConditionalGeneration, Qwen3_5Model

    @property
    def attention_layers(self) -> list[int]:
        types = getattr(self.model.config.text_config, "layer_types", None) or ["full_attention"] * self.num_layers
        return [i for i, kind in enumerate(types) if kind == "full_attention"]

    def check_drop_layer(self, layer: int) -> None:
        if layer - 1 not in self.attention_layers:
            valid = [a + 1 for a in self.attention_layers if a + 1 < self.num_layers]
            raise ValueError(
                f"FastV ranks tokens by the last token's attention at layer {layer - 1}, a linear-attention layer of this "
                f"model (no attention weights); pick a FastV layer just after an attention layer: {valid}"
            )


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5-MoE (`qwen3_5_moe`): Qwen3.5 with mixture-of-experts MLPs; layout, positions and the
    hybrid attention as Qwen3.5 (a dense Qwen3.5 may guide it)."""

    model_type = "qwen3_5_moe"
    family = "Qwen3.5-MoE"

    @staticmethod
    def model_classes():
        from transformers import Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeModel

        return Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeModel

    def layout(self) -> dict:
        return {**super().layout(), "model_type": "qwen3_5"}
