"""Observe attention through transformers' own seam, without patching any class.

A model's sub-config is pointed, for the duration of a `with observe_attention(...)` block, at an
attention function registered under our own name. That function hands (query, key) of the
observed modules to an observer and then runs the stock sdpa kernel, so nothing is ever
materialised that sdpa would not build. The previous implementation is restored on exit, also
when the block raised. Observers live in a ContextVar keyed by module identity: two models (or
two threads) in one process never see each other's observers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

import torch

CAPTURE_IMPLEMENTATION = "vidtok_capture"

Observer = Callable[..., None]
_OBSERVERS: ContextVar[Mapping[int, Observer]] = ContextVar("vidtok_observers", default=MappingProxyType({}))
_registered = False


class StopForward(Exception):
    """Raised by an observer once it has all it needs: later layers are never run."""


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observer = _OBSERVERS.get().get(id(module))
    if observer is not None:
        observer(module=module, query=query, key=key, scaling=kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
        AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
        _registered = True


def attention_implementations(model) -> dict[str, str]:
    """The attention implementation of the model and of each of its sub-configs."""
    config = model.config
    found = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            found[key] = sub._attn_implementation
    return found


@contextmanager
def observe_attention(model, sub_configs: Sequence[str], observers: Mapping[object, Observer]) -> Iterator[None]:
    """Within the block, call `observers[module](module=, query=, key=, scaling=)` on every attention call
    of those modules (post-RoPE query/key as the kernel receives them)."""
    _register()
    previous = attention_implementations(model)
    token = _OBSERVERS.set({**_OBSERVERS.get(), **{id(m): fn for m, fn in observers.items()}})
    try:
        model.set_attn_implementation({key: CAPTURE_IMPLEMENTATION for key in sub_configs})
        yield
    finally:
        _OBSERVERS.reset(token)
        model.set_attn_implementation({key: previous[key] for key in sub_configs})


def _take(value, index: torch.Tensor, batch_dim: int, seq_dim: int):
    """value's entries at index[b] along `seq_dim`, item by item along `batch_dim` (index [B, K];
    a value with batch size 1 is shared by every item)."""
    if not torch.is_tensor(value):
        return value
    index = index.to(value.device)
    if value.shape[batch_dim] != index.shape[0]:
        value = value.expand(*[index.shape[0] if d == batch_dim else -1 for d in range(value.ndim)])
    view = [1] * value.ndim
    view[batch_dim], view[seq_dim] = index.shape
    size = list(value.shape)
    size[seq_dim] = index.shape[1]
    return value.gather(seq_dim, index.view(view).expand(size))


def _cut(kwargs: dict, rows: torch.Tensor | None, columns: Callable[[int], torch.Tensor]) -> dict:
    """A decoder layer's keyword inputs, computed by transformers once at full length, cut to each
    item's kept tokens (rows, columns [B, K]): query rows (positions, rotary tables; prefill only)
    and mask key columns (every step)."""
    out = dict(kwargs)
    mask = out.get("attention_mask")
    if torch.is_tensor(mask) and mask.ndim == 4:  # [B, 1, Q, K]; None means sdpa's own causal mask, right as it is
        if rows is not None:
            mask = _take(mask, rows, 0, 2)
        out["attention_mask"] = _take(mask, columns(mask.shape[-1]), 0, 3)
    elif torch.is_tensor(mask) and mask.ndim == 2 and rows is not None:  # a linear-attention layer's padding mask [B, S] (prefill)
        out["attention_mask"] = _take(mask, rows, 0, 1)
    elif mask is not None:
        raise RuntimeError(f"cannot drop tokens under a {type(mask).__name__} attention mask of shape {getattr(mask, 'shape', None)}")
    if rows is not None:
        if out.get("position_embeddings") is not None:  # cos, sin [..., B, S, d]
            out["position_embeddings"] = tuple(_take(t, rows, t.ndim - 3, t.ndim - 2) for t in out["position_embeddings"])
        if out.get("position_ids") is not None:  # [B, S] or [3, B, S]
            ids = out["position_ids"]
            out["position_ids"] = _take(ids, rows, ids.ndim - 2, ids.ndim - 1)
        if out.get("cache_position") is not None:  # one for the batch; every item keeps as many tokens
            out["cache_position"] = out["cache_position"][rows[0].to(out["cache_position"].device)]
    return out


def _unfilled(cache, index: int) -> bool:
    """Whether layer `index` of the cache has seen no token yet. A linear-attention (recurrent)
    layer has no sequence length to read (transformers raises for one), only a state flag."""
    layers = getattr(cache, "layers", None) or []
    layer = layers[index] if index < len(layers) else None
    if layer is not None and hasattr(layer, "has_previous_state"):
        return not any(layer.has_previous_state.values())
    return cache.get_seq_length(index) == 0


@contextmanager
def drop_tokens(layers: Sequence[torch.nn.Module], start: int, prompt_length: int, choose: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, decoder layers `start`.. run on the prompt positions `choose()` returns only
    ([B, K]: each item of the batch its own K positions, as many for every item).

    `choose()` runs once per prefill, when layer `start` is reached (earlier layers have run on every
    token, so their observers have fired). The hidden states are cut there; every later layer's mask,
    position and rotary inputs are cut to match, so the kept tokens keep their full-layout positions.
    Their cache therefore holds only the kept tokens, and each decoding step's mask columns are cut
    to it. Layers before `start`, and the cache's length as transformers reads it (layer 0), stay
    full, so decoding continues the full layout's positions. Hooks are removed on exit, also after
    a raise.
    """
    state: dict = {"keep": None, "rows": None}

    def columns(mask_len: int) -> torch.Tensor:
        # each item's kept prompt positions, then every position generated after the prompt
        keep = state["keep"]
        after = torch.arange(prompt_length, mask_len, device=keep.device).expand(keep.shape[0], -1)
        return torch.cat([keep, after], dim=1)

    def first(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and type(cache).__name__ != "DynamicCache":
            # a static or quantised cache places tokens by position: it cannot hold a shorter sequence per layer
            raise RuntimeError(f"FastV needs transformers' DynamicCache (generate's default), got {type(cache).__name__}")
        if cache is None or _unfilled(cache, start):  # a prefill
            if hidden.shape[1] != prompt_length:
                raise RuntimeError(
                    f"FastV expects the {prompt_length}-token prompt in one forward, got {hidden.shape[1]} tokens; "
                    "prefill the prepared inputs as they are, with the KV cache on (no chunked prefill, no use_cache=False)"
                )
            state["keep"] = state["rows"] = choose().to(hidden.device)
            hidden = _take(hidden, state["keep"], 0, 1)
        elif state["keep"] is None:
            raise RuntimeError("a cache prefilled outside vidtok's FastV context reached it; prefill inside the context")
        else:
            state["rows"] = None
        kwargs = _cut(kwargs, state["rows"], columns)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def later(module, args, kwargs):
        return args, _cut(kwargs, state["rows"], columns)

    handles = []
    try:
        handles.append(layers[start].register_forward_pre_hook(first, with_kwargs=True))
        handles += [layer.register_forward_pre_hook(later, with_kwargs=True) for layer in layers[start + 1 :]]
        yield
    finally:
        for handle in handles:
            handle.remove()
