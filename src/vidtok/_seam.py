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
