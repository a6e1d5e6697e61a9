"""LLaVA-OneVision (`llava_onevision` in transformers): frames -> SigLIP -> projector -> bilinear
pooling to a ceil(g/2) grid per frame, flattened, one `image_newline` after the whole video."""

from __future__ import annotations

import math
import weakref

import torch

from .._seam import observe_attention
from ..compressors.base import FrameSignals
from ..video import load_pixels
from .base import EncodedVideo, VideoAdapter

# Fallback when a tokenizer has no chat template: the LLaVA-OV (Qwen2) format.
DEFAULT_TEMPLATE = "<|im_start|>user <video>\n{question}<|im_end|>\n<|im_start|>assistant\n"


_NORMALISATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _normalisation(model, mean, std):
    """image_mean / image_std from the local checkpoint folder the model was loaded from, if it has a
    (video) preprocessor config; read once per model, since an adapter is built on every call."""
    if model not in _NORMALISATION:
        _NORMALISATION[model] = _read_normalisation(getattr(model, "name_or_path", ""), mean, std)
    return _NORMALISATION[model]


def _read_normalisation(folder, mean, std):
    import json
    import os

    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = os.path.join(folder, name) if folder else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            if "image_mean" in config and "image_std" in config:
                return tuple(config["image_mean"]), tuple(config["image_std"])
    return mean, std


class LlavaOnevisionAdapter(VideoAdapter):
    """Units are frames of ceil(g/2)^2 pooled tokens; the one image_newline after the video is kept
    uncompressed; positions are the plain 1-D ones the model computes itself."""

    model_type = "llava_onevision"
    unit = "frame"
    trailing_tokens = 1

    def __init__(self, model):
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

        if isinstance(model, LlavaOnevisionForConditionalGeneration):
            self.inner = model.model
        elif isinstance(model, LlavaOnevisionModel):
            self.inner = model
        else:
            raise ValueError(f"expected a LLaVA-OneVision model, got {type(model).__name__}")
        self.model = model
        config = model.config
        vision = config.vision_config
        if config.vision_feature_select_strategy != "full":
            raise ValueError(
                "vidtok needs vision_feature_select_strategy='full' (SigLIP has no CLS token to drop), "
                f"got {config.vision_feature_select_strategy!r}"
            )
        self.grid = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(self.grid / 2) ** 2
        self.image_size = vision.image_size
        self.video_token_id = config.video_token_id
        self.num_layers = config.text_config.num_hidden_layers
        # SigLIP's normalisation, unless the checkpoint folder says otherwise
        self.image_mean, self.image_std = _normalisation(model, (0.5,) * 3, (0.5,) * 3)

    def layout(self) -> dict:
        """What a guide must share with the main model for its frame weights to mean the same frames."""
        # no vocab_size: a released pair shares one tokenizer but pads its embedding tables differently
        # (LLaVA-OV 0.5B 151936 rows, 7B 152128); the token ids are what must agree
        return {
            "model_type": self.model_type,
            "image_size": self.image_size,
            "tokens_per_frame": self.tokens_per_frame,
            "video_token_id": self.video_token_id,
        }

    def pixels(self, video, frames: int | None = None, fps: float | None = None) -> torch.Tensor:
        """A path, uint8 frames or pixel values -> pixel values [F, 3, S, S] for this model."""
        return load_pixels(video, frames, self.image_size, self.image_mean, self.image_std, fps=fps)

    def video_shape(self, pixels) -> tuple[int, int]:
        return pixels.shape[0], self.tokens_per_frame

    def display(self, pixels):
        mean, std = torch.tensor(self.image_mean)[:, None, None], torch.tensor(self.image_std)[:, None, None]
        side = math.isqrt(self.tokens_per_frame)
        return (pixels.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1), (side, side)

    @property
    def device(self):
        return self.inner.image_newline.device

    @property
    def dtype(self):
        return self.inner.image_newline.dtype

    # prompt --------------------------------------------------------------------------------

    def input_ids(self, tokenizer, question: str, video_tokens: int) -> torch.Tensor:
        """Prompt ids with the single video marker expanded to `video_tokens` placeholders."""
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = DEFAULT_TEMPLATE.format(question=question)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        marks = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(marks) != 1:
            raise ValueError(
                f"the prompt holds {len(marks)} video tokens (id {self.video_token_id}), expected 1: "
                "the tokenizer does not match the model, or the question contains the video marker"
            )
        at = marks[0]
        ids = ids[:at] + [self.video_token_id] * video_tokens + ids[at + 1 :]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the frame tokens in the prompt: the trailing newline placeholder excluded."""
        return (input_ids[0] == self.video_token_id).nonzero().squeeze(1)[:-1]

    # vision --------------------------------------------------------------------------------

    @property
    def vision_layers(self):
        """SigLIP's encoder layers."""
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _feature_attention_module(self):
        config = self.model.config
        layers = self.vision_layers
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        # hidden_states[0] is the embedding output; hidden_states[i] comes out of encoder layer i - 1.
        index = feature_layer % (len(layers) + 1) - 1
        if index < 0:
            raise ValueError("vision_feature_layer selects the patch embeddings: there is no attention to rank tokens by")
        return layers[index].self_attn

    def encode_video(self, pixel_values: torch.Tensor, signals: bool = False) -> EncodedVideo:
        """[F, 3, S, S] -> features [F, T, D], newline [1, D], optional vision signals, and the
        vision tower's selected hidden states (for a guide that shares this tower).

        Runs the model's own get_video_features, so features equal those of an unmodified forward.
        With `signals`, also the feature layer's attention received and mean keys, pooled to the
        LLM's token grid exactly as the features are.
        """
        frames = pixel_values.shape[0]
        pixel_values = pixel_values.to(self.device, self.dtype)[None]
        observed = {}

        def observe(module, query, key, scaling, **_):
            received = []
            for f in range(query.shape[0]):  # one frame at a time: [H, N, N] at most
                probs = (query[f].float() @ key[f].float().transpose(-1, -2) * scaling).softmax(-1)
                received.append(probs.mean(dim=(0, 1)))
            observed["attention"] = torch.stack(received)
            observed["metric"] = key.float().mean(dim=1)

        if signals:
            with observe_attention(self.model, ["vision_config"], {self._feature_attention_module(): observe}):
                out = self.inner.get_video_features(pixel_values, return_dict=True)
        else:
            out = self.inner.get_video_features(pixel_values, return_dict=True)
        pooled = out.pooler_output[0]
        frame_signals = None
        if signals:
            frame_signals = FrameSignals(
                attention=self.inner.apply_pooling(observed["attention"][..., None])[..., 0],
                metric=self.inner.apply_pooling(observed["metric"]),
            )
        layer = self.model.config.vision_feature_layer
        hidden = out.hidden_states[layer] if isinstance(layer, int) else torch.cat([out.hidden_states[i] for i in layer], -1)
        return EncodedVideo(
            features=pooled[:-1].reshape(frames, self.tokens_per_frame, -1),
            newline=pooled[-1:],
            signals=frame_signals,
            vision_hidden=hidden,
        )

    def encode_videos(self, videos: list, signals: bool = False) -> list[EncodedVideo]:
        """Several videos in one vision-tower call: SigLIP, the projector and the pooling work frame
        by frame, so the frames of all videos are one batch, split back per video."""
        if len(videos) == 1:
            return [self.encode_video(videos[0], signals=signals)]
        counts = [v.shape[0] for v in videos]
        joint = self.encode_video(torch.cat([v.to(self.device, self.dtype) for v in videos]), signals=signals)

        def split(tensor):
            return tensor.split(counts)

        parts = [split(joint.features), split(joint.vision_hidden)]
        if signals:
            parts += [split(joint.signals.attention), split(joint.signals.metric)]
        out = []
        for n in range(len(videos)):
            frame_signals = FrameSignals(attention=parts[2][n], metric=parts[3][n]) if signals else None
            out.append(EncodedVideo(features=parts[0][n], newline=joint.newline, signals=frame_signals, vision_hidden=parts[1][n]))
        return out

    def project(self, vision_hidden: torch.Tensor, like: EncodedVideo | None = None) -> EncodedVideo:
        """Another model's selected vision hidden states [F, N, hv] through this model's projector
        and pooling: what encode_video gives when the two share a vision tower."""
        features = self.inner.apply_pooling(self.inner.multi_modal_projector(vision_hidden.to(self.device, self.dtype)))
        return EncodedVideo(features=features, newline=self.inner.image_newline[None], signals=None, vision_hidden=vision_hidden)

    def same_vision_tower(self, other) -> bool:
        """True when `other` (an adapter) has this vision tower: the same module or equal weights."""
        mine, theirs = self.inner.vision_tower, other.inner.vision_tower
        if mine is theirs:
            return True
        if mine.config.to_dict() != theirs.config.to_dict() or self.model.config.vision_feature_layer != other.model.config.vision_feature_layer:
            return False
        a, b = mine.state_dict(), theirs.state_dict()
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a)

    def subsample_units(self, encoded: EncodedVideo, pixels, stride: int):
        """Every stride-th frame: LLaVA-OV positions are the sequence order, so fewer frames are just a shorter video."""
        view = EncodedVideo(features=encoded.features[::stride], newline=encoded.newline, signals=None,
                            vision_hidden=encoded.vision_hidden[::stride], meta=encoded.meta)
        return view, pixels[::stride] if isinstance(pixels, torch.Tensor) else pixels

    def pool_frames(self, features: torch.Tensor, factor: int) -> torch.Tensor:
        """[F, T, D] on the g x g grid -> [F, T / factor^2, D]: a coarser view for a cheap guide."""
        side = math.isqrt(self.tokens_per_frame)
        if factor < 1 or side % factor:
            raise ValueError(f"guide_pool {factor} must divide the {side}x{side} token grid of a frame")
        grid = features.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, factor)
        return pooled.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[-1])

    # LLM -----------------------------------------------------------------------------------

    def model_inputs(self, input_ids: torch.Tensor, video_embeds: torch.Tensor, encoded=None, kept=None, companions=None) -> dict:
        """Keyword arguments for model(...) / model.generate(...): video_embeds [N, D] fill the N placeholders.
        (Positions are 1-D and the model's own: a compressed prompt is a shorter prompt.)"""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        placeholders = int((input_ids == self.video_token_id).sum())
        if placeholders != video_embeds.shape[0]:
            raise ValueError(f"{placeholders} video placeholders for {video_embeds.shape[0]} video tokens")
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=video_embeds[None])},
        }

    @property
    def decoder_layers(self):
        """The LLM's decoder layers, in order; layer i's attention module is `.self_attn`."""
        return self.inner.language_model.layers
