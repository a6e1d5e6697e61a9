"""Qwen2.5-VL (`qwen2_5_vl` in transformers): frames -> pairs of frames (temporal patch 2) -> a
windowed-attention ViT with a few full-attention blocks -> 2x2 patch merger -> LLM tokens; 3-D
rotary positions (mrope) that vidtok computes itself from the original rule (models/mrope.py).

The unit of importance and budget is the temporal group: the encoder merges each pair of frames
into one set of (H/28) x (W/28) tokens, so a frame alone has no tokens of its own.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .._seam import observe_attention
from ..compressors.base import FrameSignals
from ..video import VideoError, as_frames, check_frames, read_clip
from .base import EncodedVideo, VideoAdapter
from .mrope import layout_positions

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the video processor's defaults (transformers' Qwen2VLVideoProcessor): pixels per frame after resizing
MIN_PIXELS, MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
SECONDS_PER_FRAME = 0.5  # frames given without a file: taken as sampled at 2 fps, the processor's default rate

DEFAULT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class QwenVideo:
    """Pixel input of a Qwen-VL model: normalised frames [F, 3, H, W] (F a multiple of the temporal
    patch, H and W of patch x merge) and the seconds between two of them (the temporal position scale)."""

    pixels: torch.Tensor
    seconds_per_frame: float
    times: tuple[float, ...] | None = None  # each frame's time in seconds, where the layout prints it (Qwen3-VL)

    @property
    def shape(self):
        return self.pixels.shape


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL resizing rule: both sides multiples of `factor`, the area within [min, max]
    pixels, the aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"the frames' aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the model's limit of 200:1")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _preprocessor_settings(folder: str) -> dict:
    """image_mean/std and min/max pixels from a checkpoint's (video) preprocessor config, if it has one."""
    found: dict = {}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # the video file wins
        path = os.path.join(folder, name) if folder else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            size = config.get("size") or {}
            for key, value in (("image_mean", config.get("image_mean")), ("image_std", config.get("image_std")),
                               ("min_frames", config.get("min_frames")), ("max_frames", config.get("max_frames")),
                               ("min_pixels", config.get("min_pixels", size.get("shortest_edge"))),
                               ("max_pixels", config.get("max_pixels", size.get("longest_edge")))):
                if value is not None:
                    found[key] = value
    return found


_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Qwen2_5_VLAdapter(VideoAdapter):
    model_type = "qwen2_5_vl"
    unit = "temporal_group"
    trailing_tokens = 0
    family = "Qwen2.5-VL"
    default_mean, default_std = CLIP_MEAN, CLIP_STD
    default_min_pixels, default_max_pixels = MIN_PIXELS, MAX_PIXELS

    @staticmethod
    def model_classes() -> tuple[type, type]:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

        return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

    def __init__(self, model):
        generation, base = self.model_classes()
        if isinstance(model, generation):
            self.inner = model.model
        elif isinstance(model, base):
            self.inner = model
        else:
            raise ValueError(f"expected a {self.family} model, got {type(model).__name__}")
        self.model = model
        self.frames_per_unit = model.config.vision_config.temporal_patch_size
        config, vision = model.config, model.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.factor = self.patch * self.merge
        self.video_token_id = config.video_token_id
        self.num_layers = config.text_config.num_hidden_layers
        self.tokens_per_second = getattr(vision, "tokens_per_second", None) or getattr(config, "tokens_per_second", 2)
        if model not in _SETTINGS:  # read once per model: an adapter is built on every call
            _SETTINGS[model] = _preprocessor_settings(getattr(model, "name_or_path", "") or "")
        settings = _SETTINGS[model]
        self.image_mean = tuple(settings.get("image_mean", self.default_mean))
        self.image_std = tuple(settings.get("image_std", self.default_std))
        self.min_pixels = int(settings.get("min_pixels", self.default_min_pixels))
        self.max_pixels = int(settings.get("max_pixels", self.default_max_pixels))
        self.min_frames, self.max_frames = int(settings.get("min_frames", 4)), int(settings.get("max_frames", 768))

    def layout(self) -> dict:
        # no vocab_size: a released pair shares one tokenizer but pads its embedding tables differently
        # (Qwen2.5-VL 3B 151936 rows, 7B 152064); the token ids are what must agree
        return {
            "model_type": self.model_type,
            "patch_size": self.patch,
            "spatial_merge_size": self.merge,
            "temporal_patch_size": self.temporal,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "video_token_id": self.video_token_id,
        }

    # pixels --------------------------------------------------------------------------------

    def pixels(self, video, frames: int | None = None, fps: float | None = None) -> QwenVideo:
        """A path, uint8 frames [F, H, W, 3], normalised pixels [F, 3, H, W] or a QwenVideo -> QwenVideo.

        Frames are resized by the model's rule (smart_resize: multiples of patch x merge, area
        within the preprocessor's min/max pixels, bicubic), normalised with its mean/std, and an
        odd count is completed by repeating the last frame (as the model's processor does).
        """
        if isinstance(video, QwenVideo):  # already completed to whole groups: frames=5 gave 6
            if frames is not None and video.shape[0] not in (frames, frames + (-frames % self.temporal)):
                raise VideoError(f"the video has {video.shape[0]} frames, {frames} were asked for")
            return self._checked(video.pixels, video.seconds_per_frame, None, video.times)
        check_frames(frames)
        seconds, times = SECONDS_PER_FRAME, None
        if isinstance(video, (str, os.PathLike)):
            video, seconds, times = self._read(video, frames, fps)
            frames = None if fps is not None else frames
        elif fps is not None:
            raise VideoError("fps sampling needs a video file; for frames or pixel values already sampled, drop fps")
        if isinstance(video, torch.Tensor) and video.is_floating_point():
            pixels = video
        else:
            pixels = self._resize(as_frames(video))
        return self._checked(pixels, seconds, frames, times)

    def _read(self, path, frames, fps):
        video, seconds = read_clip(path, frames, fps)
        return video, seconds, None

    def _target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The resized frame size: Qwen2.5-VL's rule bounds each frame's area."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def _resize(self, frames: np.ndarray) -> torch.Tensor:
        from PIL import Image

        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise VideoError(f"expected RGB frames [F>0, H>0, W>0, 3], got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise VideoError(f"expected uint8 frames, got {frames.dtype}")
        height, width = self._target_size(frames.shape[0], frames.shape[1], frames.shape[2])
        resized = np.stack([
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) if f.shape[:2] != (height, width) else f
            for f in frames
        ])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
        return (pixels - torch.tensor(self.image_mean)[:, None, None]) / torch.tensor(self.image_std)[:, None, None]

    def _checked(self, pixels: torch.Tensor, seconds: float, frames: int | None, times=None) -> QwenVideo:
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
            raise VideoError(f"pixel values must be [F>0, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % self.factor or pixels.shape[3] % self.factor:
            raise VideoError(
                f"pixel values of {pixels.shape[2]}x{pixels.shape[3]} are not multiples of {self.factor} (patch x merge); "
                "pass uint8 frames or a video file and vidtok resizes them by the model's rule"
            )
        if pixels.is_floating_point() and not torch.isfinite(pixels).all():
            bad = int((~torch.isfinite(pixels)).sum())
            raise VideoError(f"the pixel values hold {bad} NaN or infinite values; clean the frames (e.g. torch.nan_to_num) before calling")
        if frames is not None and pixels.shape[0] != frames:
            raise VideoError(f"the video has {pixels.shape[0]} frames, {frames} were asked for")
        if times is None:  # frames given without a file: evenly spaced; a padding frame then repeats the last time
            times = [i * seconds for i in range(pixels.shape[0])]
        if len(times) not in (pixels.shape[0], pixels.shape[0] + (-pixels.shape[0] % self.temporal)):
            raise VideoError(f"{len(times)} frame times for {pixels.shape[0]} frames")
        if pad := -pixels.shape[0] % self.temporal:  # the processor's rule: repeat the last frame (and its time)
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        times = tuple(float(t) for t in times) + (float(times[-1]),) * (pixels.shape[0] - len(times))
        return QwenVideo(pixels, float(seconds), times)

    def video_shape(self, pixels: QwenVideo) -> tuple[int, int]:
        _, _, height, width = pixels.shape
        return pixels.shape[0] // self.temporal, (height // self.factor) * (width // self.factor)

    def display(self, pixels: QwenVideo):
        mean, std = torch.tensor(self.image_mean)[:, None, None], torch.tensor(self.image_std)[:, None, None]
        first = pixels.pixels[:: self.temporal].float().cpu()
        return (first * std + mean).clamp(0, 1).permute(0, 2, 3, 1), (pixels.shape[2] // self.factor, pixels.shape[3] // self.factor)

    def _grid(self, pixels: QwenVideo) -> tuple[int, int, int]:
        return pixels.shape[0] // self.temporal, pixels.shape[2] // self.patch, pixels.shape[3] // self.patch

    def _patchify(self, pixels: QwenVideo) -> torch.Tensor:
        """[F, 3, H, W] -> [T * h * w, 3 * tp * p * p] in the encoder's order: group, merge block
        row, block column, row and column within the block."""
        t, h, w = self._grid(pixels)
        p, m, tp = self.patch, self.merge, self.temporal
        x = pixels.pixels.reshape(t, tp, 3, h // m, m, p, w // m, m, p)
        return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * tp * p * p)

    # vision --------------------------------------------------------------------------------

    @property
    def vision_layers(self):
        """The ViT's blocks (windowed and full-attention)."""
        return self.inner.visual.blocks

    def _ranking_block(self):
        blocks = self.vision_layers
        full = [i for i in self.model.config.vision_config.fullatt_block_indexes if i < len(blocks)]
        if not full:
            raise ValueError("the vision encoder has no full-attention block to rank tokens by (fullatt_block_indexes is empty)")
        return blocks[max(full)].attn

    def encode_video(self, pixels: QwenVideo, signals: bool = False) -> EncodedVideo:
        """QwenVideo -> features [U, T, D] (the merger's output, unit-major, raster within a unit),
        no trailing token, optional VisionZip signals, and the grid for the positions.

        With `signals`, VisionZip's attention received and keys come from the **last full-attention
        block**: the windowed blocks only see a window, so their attention says nothing about the
        whole frame. That block attends within one temporal group at a time (one kernel call per
        group); each patch's attention received (mean over heads and queries) and key (mean over
        heads) are averaged over the 2x2 patches one LLM token merges, and put back from the
        encoder's window order into raster order, as the merger's output is.
        """
        return self.encode_videos([pixels], signals=signals)[0]

    def encode_videos(self, videos: list, signals: bool = False) -> list[EncodedVideo]:
        """Several videos in one tower call (a grid row each; every block attends within one video)."""
        from transformers.vision_utils import get_vision_window_index

        out, patch_signals, grids = self._run_tower(videos, signals)
        # the blocks' output, in the encoder's window order (video by video): an assistant whose blocks are these runs
        # only its own merger
        hidden = out.last_hidden_state.split([g * h * w for g, h, w in grids])
        encoded = []
        for n, (pixels, (groups, h, w)) in enumerate(zip(videos, grids)):
            per_unit = (h // self.merge) * (w // self.merge)
            features = out.pooler_output[n].reshape(groups, per_unit, -1)
            frame_signals = None
            if signals:
                vision = self.model.config.vision_config
                window_index, _ = get_vision_window_index(torch.tensor([[groups, h, w]]), self.merge, vision.window_size, self.patch)
                frame_signals = self._token_signals(patch_signals[n], groups, per_unit, torch.argsort(window_index))
            interval = self.tokens_per_second * self.temporal * pixels.seconds_per_frame
            meta = {"groups": groups, "height": h // self.merge, "width": w // self.merge, "interval": interval, "grid": (groups, h, w)}
            encoded.append(EncodedVideo(features=features, newline=features[0, :0], signals=frame_signals, vision_hidden=hidden[n], meta=meta))
        return encoded

    def _run_tower(self, videos: list, signals: bool):
        """The vision tower on the videos' patches (one grid row each): (its output, and with `signals`
        per video the ranking block's attention received [P] (mean over heads and queries) and keys
        [P, d] (mean over heads) per patch in the encoder's order, else None; the grids (groups, h, w)).
        The block attends within one temporal group per kernel call: one softmax(QK^T) of a group at a
        time, never a video's, and the groups come video by video."""
        grids = [self._grid(pixels) for pixels in videos]
        grid = torch.tensor(grids, device=self.device)
        patches = torch.cat([self._patchify(pixels) for pixels in videos]).to(self.device, self.dtype)
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

        def observe(module, query, key, scaling, **_):
            probs = (query[0].float() @ key[0].float().transpose(-1, -2) * scaling).softmax(-1)
            chunks.append((probs.mean(dim=(0, 1)), key[0].float().mean(dim=0)))

        if not signals:
            return self.inner.get_video_features(patches, video_grid_thw=grid, return_dict=True), None, grids
        with observe_attention(self.model, ["vision_config"], {self._ranking_block(): observe}):
            out = self.inner.get_video_features(patches, video_grid_thw=grid, return_dict=True)
        if len(chunks) != sum(g for g, _, _ in grids):
            raise RuntimeError(f"the ranking block attended in {len(chunks)} pieces for {sum(g for g, _, _ in grids)} temporal groups")
        per_video, start = [], 0
        for groups, _, _ in grids:
            mine = chunks[start : start + groups]
            per_video.append((torch.cat([a for a, _ in mine]), torch.cat([k for _, k in mine])))
            start += groups
        return out, per_video, grids

    def _token_signals(self, patch_signals, groups: int, per_unit: int, order=None) -> FrameSignals:
        """Per-patch signals averaged over the 2x2 patches one LLM token merges; `order` puts the
        tokens into the merger output's raster order (None: they already are)."""
        attention, keys = patch_signals
        unit = self.merge**2
        attention, keys = attention.reshape(-1, unit).mean(1), keys.reshape(-1, unit, keys.shape[-1]).mean(1)
        if order is not None:
            attention, keys = attention[order.to(attention.device)], keys[order.to(keys.device)]
        return FrameSignals(attention=attention.reshape(groups, per_unit), metric=keys.reshape(groups, per_unit, -1))

    def project(self, vision_hidden, like: EncodedVideo) -> EncodedVideo:
        """Another model's vision blocks' output (window order) through this model's merger, back to raster order."""
        from transformers.vision_utils import get_vision_window_index

        groups, h, w = like.meta["grid"]
        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(torch.tensor([[groups, h, w]]), self.merge, vision.window_size, self.patch)
        merged = self.inner.visual.merger(vision_hidden.to(self.device, self.dtype))[torch.argsort(window_index).to(self.device)]
        return EncodedVideo(features=merged.reshape(groups, -1, merged.shape[-1]), newline=merged[:0], signals=None,
                            vision_hidden=vision_hidden, meta=like.meta)

    def same_vision_tower(self, other) -> bool:
        """True when `other`'s vision blocks are these (same geometry and weights); the mergers, which
        map into each LLM's width, may differ (a 3B assistant and a 7B main model)."""
        mine, theirs = self.inner.visual, other.inner.visual
        if mine is theirs:
            return True
        ignore = ("out_hidden_size",)
        if {k: v for k, v in mine.config.to_dict().items() if k not in ignore} != {k: v for k, v in theirs.config.to_dict().items() if k not in ignore}:
            return False
        a = {k: v for k, v in mine.state_dict().items() if not k.startswith("merger.")}
        b = {k: v for k, v in theirs.state_dict().items() if not k.startswith("merger.")}
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a)

    # prompt and LLM ------------------------------------------------------------------------

    def _chat_text(self, tokenizer, question: str) -> str:
        """The chat prompt as text, its video a single placeholder (the checkpoint's template, else Qwen's chat format)."""
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return DEFAULT_TEMPLATE.format(question=question)

    def input_ids(self, tokenizer, question: str, video_tokens: int) -> torch.Tensor:
        """The chat prompt with its one video placeholder (between vision start and end) repeated `video_tokens` times."""
        ids = tokenizer(self._chat_text(tokenizer, question), add_special_tokens=False)["input_ids"]
        marks = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(marks) != 1:
            raise ValueError(
                f"the prompt holds {len(marks)} video placeholders (id {self.video_token_id}), expected 1: "
                "the tokenizer's chat template does not render a video, or it does not match the model"
            )
        at = marks[0]
        ids = ids[:at] + [self.video_token_id] * video_tokens + ids[at + 1 :]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids[0] == self.video_token_id).nonzero().squeeze(1)

    def positions(self, input_ids: torch.Tensor, encoded: EncodedVideo, kept=None) -> torch.Tensor:
        """[3, 1, S] positions of a (compressed) prompt: every token where the full layout puts it."""
        visual = self.visual_positions(input_ids)
        meta = encoded.meta
        per_unit = meta["height"] * meta["width"]
        first, last = int(visual[0]), int(visual[-1])
        after = input_ids.shape[1] - last - 1
        full = layout_positions([("text", first), ("vision", meta["groups"], meta["height"], meta["width"], meta["interval"]), ("text", after)])
        video = full[:, first : first + meta["groups"] * per_unit]
        if kept is not None:
            index = torch.tensor([u * per_unit + i for u, k in enumerate(kept) for i in k], dtype=torch.long)
            video = video[:, index]
        if video.shape[1] != visual.numel() or last - first + 1 != visual.numel():
            raise ValueError(f"{visual.numel()} video placeholders (contiguous: {last - first + 1 == visual.numel()}) for {video.shape[1]} kept tokens")
        return torch.cat([full[:, :first], video, full[:, full.shape[1] - after :]], dim=1)[:, None].to(input_ids.device)

    def model_inputs(self, input_ids: torch.Tensor, video_embeds: torch.Tensor, encoded: EncodedVideo | None = None, kept=None, companions=None) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if encoded is None:
            raise ValueError("Qwen2.5-VL inputs need the encoded video's layout for their 3-D positions")
        placeholders = int((input_ids == self.video_token_id).sum())
        if placeholders != video_embeds.shape[0]:
            raise ValueError(f"{placeholders} video placeholders for {video_embeds.shape[0]} video tokens")
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            # passed, so the model neither computes its own (get_rope_index) nor touches its rope_deltas
            "position_ids": self.positions(input_ids, encoded, kept),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(video_embeds,))},
        }

    @property
    def decoder_layers(self):
        return self.inner.language_model.layers
