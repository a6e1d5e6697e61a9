"""The model side of the plugin, shared by the families: the guide passes, the per-unit split and
VisionZip's selection, all with vidtok's own code, inside vLLM's worker.

    self guide       the main model's own decoder layers (vLLM's modules and weights), run once on
                     the uncompressed prompt up to the deepest guide layer; each layer's attention
                     call is answered by a plain causal sdpa that also reads the last token's
                     attention to the video (vidtok.importance.last_token_attention). Nothing is
                     written to vLLM's KV cache; no weight is copied.
    assistant guide  a Hugging Face transformers checkpoint of the same family, loaded once in the
                     worker beside the main model, on its device, and run by vidtok's adapter
                     (`VideoAdapter.token_attention`), as vidtok.generate runs it.
    split            DyToK's proportional split (vidtok.DyToK.budgets), or the even split with no
                     guide; VisionZip (vidtok.VisionZip.compress) keeps each unit's budget.

With tensor parallelism every rank holds some heads: a mean over heads is summed across ranks.
"""

from __future__ import annotations

import collections
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ...budget import allocate_budgets
from ...compressors import DyToK, FrameSignals, VisionZip
from ...importance import last_token_attention
from .settings import GUIDE_CODES

GUIDE_NAMES = {code: name for name, code in GUIDE_CODES.items()}
RECORDS = 256  # the last compressed videos a worker remembers (tests and debugging read them)


class _Stop(Exception):
    pass


def tp_mean(value: torch.Tensor, local_heads: int, total_heads: int, tp_size: int) -> torch.Tensor:
    """A mean over this rank's heads -> the mean over every rank's heads."""
    if tp_size == 1:
        return value
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(value * local_heads) / total_heads


def tensor_parallel_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


@contextmanager
def _attention_answered_by(attn: torch.nn.Module, forward):
    """`attn(q, k, v)` calls `forward` for the block only (an instance attribute, removed after)."""
    had = "forward" in attn.__dict__
    previous = attn.__dict__.get("forward")
    attn.forward = forward
    try:
        yield
    finally:
        if had:
            attn.forward = previous
        else:
            del attn.forward


@torch.no_grad()
def self_guide_attention(text_model, input_ids: torch.Tensor, video: torch.Tensor, placed: torch.Tensor, visual: torch.Tensor,
                         positions: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """The last prompt token's attention to the unit tokens at `layers` ([len(layers), N]), from
    vLLM's own decoder layers (a Qwen2Model: embed_input_ids, layers[i].self_attn.attn).

    input_ids [S] (the uncompressed prompt), video the video's embeddings at prompt positions
    `placed`, of which the unit tokens are at `visual` [N] (LLaVA-OV's trailing newline is placed,
    not read), positions [S] or [3, S]. Stops inside the deepest layer's attention."""
    hidden = text_model.embed_input_ids(input_ids).clone()
    hidden[placed] = video.to(hidden.dtype)
    deepest, wanted = max(layers), set(layers)
    captured: dict[int, torch.Tensor] = {}
    tp = tensor_parallel_size()
    length = input_ids.shape[0]
    residual = None
    for index in range(deepest + 1):
        layer = text_model.layers[index]
        if not hasattr(layer, "self_attn"):
            raise ValueError("dytok_guide='self' runs the decoder layers up to the deepest guide layer in one worker: it does not "
                             "work with pipeline parallelism; use tensor parallelism, or an assistant guide")
        attention = layer.self_attn
        heads, kv_heads, dim, scaling = attention.num_heads, attention.num_kv_heads, attention.head_dim, attention.scaling

        def answer(q, k, v, *args, _index=index, **kwargs):
            query = q.reshape(length, heads, dim).transpose(0, 1)[None]
            key = k.reshape(length, kv_heads, dim).transpose(0, 1)[None]
            if _index in wanted:
                scores = last_token_attention(query, key, visual.to(q.device), scaling)[0]
                captured[_index] = tp_mean(scores, heads, heads * tp, tp)
            if _index == deepest:
                raise _Stop
            value = v.reshape(length, kv_heads, dim).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(query, key.repeat_interleave(heads // kv_heads, 1),
                                                 value.repeat_interleave(heads // kv_heads, 1), is_causal=True, scale=scaling)
            return out[0].transpose(0, 1).reshape(length, heads * dim)

        try:
            with _attention_answered_by(attention.attn, answer):
                hidden, residual = layer(positions, hidden, residual)
        except _Stop:
            break
    return torch.stack([captured[layer] for layer in layers])


def expand_marker(prompt_ids: torch.Tensor, marker: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The prompt with its one video marker repeated `count` times: (ids [S], positions of the
    repeats [count], tokens before, tokens after)."""
    ids = prompt_ids.reshape(-1).long()
    at = (ids == marker).nonzero().reshape(-1)
    if at.numel() != 1:
        raise ValueError(f"the guide's prompt holds {at.numel()} video markers (id {marker}), expected 1")
    at = int(at[0])
    full = torch.cat([ids[:at], torch.full((count,), marker, dtype=ids.dtype), ids[at + 1:]])
    return full, torch.arange(at, at + count), at, ids.shape[0] - at - 1


def split_budgets(weights, budget: int, units: int, per_unit: int, retention: float) -> list[int]:
    """Per-unit budgets as vidtok.generate splits them: DyToK's (default cap and floor) with a
    guide's weights, the even split without."""
    if weights is None:
        return allocate_budgets([1.0] * units, budget, per_unit)
    return DyToK(VisionZip(retention=retention), retention=retention).budgets([float(w) for w in weights], budget, per_unit)


def compress(features: torch.Tensor, budgets: list[int], signals: FrameSignals):
    """VisionZip on each unit's budget: (tokens [sum(budgets), D], kept indices per unit)."""
    return VisionZip().compress(features, budgets, signals)


def positions_to_channels(positions: torch.Tensor, dtype) -> torch.Tensor:
    """[3, N] non-negative ints -> [N, 6] channels exact in any float dtype (two base-256 digits per axis)."""
    positions = positions.long()
    if positions.numel() and int(positions.max()) >= 256 * 256:
        raise ValueError(f"a position of {int(positions.max())} is past what the plugin carries (65535)")
    return torch.cat([positions // 256, positions % 256]).T.to(dtype)


def channels_to_positions(channels: torch.Tensor) -> torch.Tensor:
    """[N, 6] -> [3, N]."""
    digits = channels.float().round().long().T
    return digits[:3] * 256 + digits[3:]


class Records:
    """The last compressed videos of a worker: what was kept and why (read by tests through
    LLM.apply_model; `clear()` between checks)."""

    def __init__(self):
        self.items = collections.deque(maxlen=RECORDS)

    def add(self, **record) -> None:
        self.items.append(record)

    def clear(self) -> None:
        self.items.clear()

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self):
        return len(self.items)


def load_assistant(folder: str, main_config, device, dtype, layout_keys: dict, main_tokenizer_folder: str | None):
    """The assistant checkpoint (transformers), on the main model's device and dtype; refused with
    the fix named when it is of another family, layout or tokenizer."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    if not os.path.isdir(folder):
        raise ValueError(f"dytok_assistant={folder!r} is not a checkpoint folder; give the assistant's local folder")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != main_config.model_type:
        raise ValueError(f"the assistant {folder!r} is a {config.model_type}, the main model a {main_config.model_type}: "
                         "use an assistant of the main model's family (e.g. LLaVA-OV-0.5B for LLaVA-OV-7B)")
    mismatch = [f"{name} {main} vs {theirs}" for name, (main, theirs) in
                ((name, (get(main_config), get(config))) for name, get in layout_keys.items()) if main != theirs]
    if mismatch:
        raise ValueError(f"the assistant {folder!r} does not match the main model (main vs assistant): {', '.join(mismatch)}; "
                         "use an assistant of the same family, tokenizer and frame layout")
    if main_tokenizer_folder is not None:
        theirs, mine = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(main_tokenizer_folder)
        if theirs.get_vocab() != mine.get_vocab():
            raise ValueError(f"the assistant {folder!r} has another tokenizer than the main model: the guide reads the main "
                             "model's prompt token ids, so the two must share one tokenizer")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model


__all__ = ["Records", "channels_to_positions", "compress", "expand_marker", "load_assistant", "positions_to_channels",
           "self_guide_attention", "split_budgets", "tp_mean"]
