"""One call: video + question -> answer, with a record of what was kept and why."""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import asdict, dataclass, field

import torch

from . import flops
from ._seam import attention_implementations, drop_tokens, observe_attention
from .budget import allocate_budgets, total_budget
from .compressors import Composed, Compressor, DyToK, FastV, FrameSignals, Full
from .compressors.fastv import fastv_keep
from .calibration import calibrated_layers
from .importance import frame_weights, guide_agreement, last_token_attention, last_token_attention_all_keys, spread_weights
from .models import adapter_for
from .video import fingerprint


@dataclass
class Plan:
    """What a call decided: frame weights, per-frame budgets, kept token indices, stage times.

    `retention`, `budgets`, `kept` and `visual_tokens_kept` describe the tokens that reach the LLM's
    last layers: with FastV (`layer` K), those kept from layer K on; `vision_retention` and
    `vision_budgets` what the encoder side passed to the LLM. With FastV alone or a FastV prior read
    inside the prefill, what is decided there (budgets, kept, inline frame weights) is filled in
    when the prefill runs, inside `Prepared.apply()`; until then it is None.
    """

    method: str
    guide: str | None
    retention: float
    frames: int  # units: frames, or temporal groups (see `unit`)
    tokens_per_frame: int  # tokens per unit
    total_budget: int
    budgets: list[int] | None
    frame_weights: list[float] | None
    guide_layers: list[int] | None
    kept: list[list[int]] | None
    visual_tokens_in: int
    visual_tokens_kept: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    layer: int | None = None  # FastV's layer K (None: nothing is dropped inside the LLM)
    flops_retention: float | None = None  # the retention a vision-side method needs for the same LLM prefill FLOPs
    vision_retention: float | None = None  # share of visual tokens the LLM receives (before layer K)
    vision_budgets: list[int] | None = None  # per-frame tokens the LLM receives, when FastV drops more inside it
    unit: str = "frame"  # the unit of importance and budget: "frame" or "temporal_group" (Qwen-VL: 2 frames)
    # how the budget was split across units: "uniform" (no guide), "proportional" (DyToK) or "binary" (keyframe selection)
    allocation: str = "uniform"
    # items prepared together; a stage run batched (guide, generate) charges each item its share of the batch's time
    batch_size: int = 1
    # several questions on one video in a batch: {"questions", "prefix_tokens" run once for all, "prompt_tokens" of this one}
    guide_shared: dict | None = None
    # DyToK(compare=True): the main model's own prior beside the assistant's ({"spearman", "top_overlap", "top", "main_weights", "main_layers"})
    guide_agreement: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """What `prepare` returns: the model inputs, the plan, and the context FastV's drop needs around the forward."""

    inputs: dict  # keyword arguments for model(**inputs) or model.generate(**inputs)
    plan: Plan
    # `with prepared.apply(): model.generate(**prepared.inputs)`: LLM-side methods (FastV) drop tokens
    # inside it, hooks installed for the block only; for encoder-side methods it does nothing.
    apply: Callable = field(default=nullcontext, repr=False)
    stage: object = field(default=None, repr=False)  # FastV's stage (None: nothing dropped inside the LLM), for a batched prefill


@dataclass
class Result:
    """What `generate` returns: the answer text, the plan, the generated ids (and logits when asked)."""

    text: str
    plan: Plan
    sequences: torch.Tensor  # prompt + new tokens
    prompt_tokens: int = 0  # prompt length as the LLM saw it (compressed video included)
    # [new tokens, vocab] raw logits of each generated token, with output_logits=True, return_dict_in_generate=True
    logits: torch.Tensor | None = None


class _Timer:
    """Adds wall time per stage into `seconds`; `sync` (torch.cuda.synchronize on a GPU) runs at
    both ends of a stage so queued kernels are charged to the stage that launched them."""

    def __init__(self, seconds: dict, sync=None):
        self.seconds = seconds
        self.sync = sync or (lambda: None)

    @contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class VideoCache:
    """Work on one video that several `prepare` calls can share: the vision encoder's output (per
    model and per whether VisionZip's signals were read) and a guide's frame weights (per guide
    model, layers, pooling and question). Each is exactly what the call would compute itself; a
    reused stage is timed as `<stage>_reused` in the plan (the seconds it took when computed),
    and `saved` sums them.

    Bound to one video's content (`video.fingerprint`: a file's path, size, mtime and inode; an
    array's bytes), checked at every call: frames overwritten in place, or a file rewritten, since
    the cache was filled make it drop what it holds and compute again (`refreshed` counts it); a
    different video is an error. The same content given as another object (a copy, `Path` for
    `str`) is the same video.

    `check_content=False` skips that check (a hash of the frames per call) for frames nothing else
    can change while the cache lives: `vidtok eval` decodes its own and hands them to no one else.

    `signals=True` reads the vision tower's signals (VisionZip's attention and keys) with every
    encode where the tower runs sdpa: reading them is the same sdpa kernel with an observer, so the
    features are bitwise a plain encode's, and one encode serves the methods that read the signals
    and those that do not. For a cache that both kinds share (`vidtok eval` sets it when one of its
    configurations reads them); the observer's own work (attention weights of one layer) is paid
    by every encode.
    """

    def __init__(self, video, *, check_content: bool = True, signals: bool = False):
        self.video = video
        self.check_content = check_content
        self.signals = bool(signals)
        self.fingerprint = fingerprint(video) if check_content else None
        self.sampling = None
        self.entries: dict = {}
        self.saved: dict[str, float] = {}
        self.computed: dict[str, int] = {}
        self.refreshed = 0

    def _same_source(self, video) -> bool:
        if isinstance(video, (str, os.PathLike)) and isinstance(self.video, (str, os.PathLike)):
            return os.path.realpath(os.fspath(video)) == os.path.realpath(os.fspath(self.video))
        return video is self.video

    def bind(self, video, frames, fps) -> None:
        if not self.check_content:
            if video is not self.video:
                raise ValueError("this VideoCache belongs to another video: make one VideoCache per video (VideoCache(video))")
            current = None
        else:
            current = fingerprint(video)
        if current != self.fingerprint:
            if not self._same_source(video):
                raise ValueError("this VideoCache belongs to another video: make one VideoCache per video (VideoCache(video))")
            # the same frames object or file with other content: everything held describes the old video
            self.entries.clear()
            self.sampling, self.fingerprint = None, current
            self.refreshed += 1
        if self.sampling is None:
            self.sampling = (frames, fps)
        elif self.sampling != (frames, fps):
            raise ValueError(f"this VideoCache holds the video sampled with frames, fps = {self.sampling}, not {(frames, fps)}")

    def has(self, key: tuple, owner) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry[2] is owner

    def fetch(self, key: tuple, stage: str, timer: "_Timer", compute, owner):
        if self.has(key, owner):
            value, seconds, _ = self.entries[key]
            timer.seconds[f"{stage}_reused"] = timer.seconds.get(f"{stage}_reused", 0.0) + seconds
            self.saved[stage] = self.saved.get(stage, 0.0) + seconds
            return value
        before = timer.seconds.get(stage, 0.0)
        with timer(stage):
            value = compute()
        return self.put(key, stage, value, timer.seconds[stage] - before, owner)

    def put(self, key: tuple, stage: str, value, seconds: float, owner):
        self.entries[key] = (value, seconds, owner)  # the owner (a model) pins its id
        self.computed[stage] = self.computed.get(stage, 0) + 1
        return value


def _fetch(cache: VideoCache | None, key: tuple, stage: str, timer, compute, owner):
    if cache is None:
        with timer(stage):
            return compute()
    return cache.fetch(key, stage, timer, compute, owner)


class ModelOutputError(ValueError):
    """A model computed NaN or infinite values: damaged weights, not a vidtok or input problem."""


def _finite(tensor: torch.Tensor, what: str, model) -> torch.Tensor:
    """`tensor`, or a ModelOutputError naming the model: NaN/inf would otherwise surface as an
    empty answer or a budget error far from their cause."""
    if not torch.isfinite(tensor).all():
        _damaged(what, model)
    return tensor


def _damaged(what: str, model):
    where = getattr(model, "name_or_path", "") or f"the {type(model).__name__} (built in code)"
    dtype = next(model.parameters()).dtype
    unsupported = "" if dtype == torch.float32 else f", or it does not run in {str(dtype).replace('torch.', '')} (load it in float32)"
    raise ModelOutputError(
        f"{where} produces NaN/inf {what}: its weights are likely damaged or incompatible{unsupported}; "
        "restore the checkpoint's *.safetensors (download or save it again)"
    )


def _finite_video(encoded, model):
    _finite(encoded.features, "vision features", model)
    return encoded


class _FiniteLogits:
    """A generate() logits processor that stops at the first NaN/inf logits (greedy decoding would
    otherwise turn them into token 0, an empty answer with no error)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, scores):
        # -inf is a processor's ban (suppressed tokens, a minimum length); NaN, +inf or a row with nothing finite is damage
        if torch.isnan(scores).any() or torch.isposinf(scores).any() or not torch.isfinite(scores).any(-1).all():
            _damaged("logits", self.model)
        return scores


def device_sync(device: torch.device):
    """The synchronising call for timing on `device` (None on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def _describe(method) -> tuple[Compressor, DyToK | None]:
    if method is None:
        return Full(), None
    if isinstance(method, DyToK):
        return method.base, method
    if isinstance(method, Compressor):
        return method, None
    raise TypeError(f"method must be a compressor (Full, Uniform, Random, VisionZip, DiverseSelect, SegmentMerge, FastV, Composed) or DyToK(...), got {type(method).__name__}")


def _stages(base: Compressor) -> tuple[Compressor, FastV | None]:
    """(encoder-side compressor, LLM-side FastV or None)."""
    if isinstance(base, Composed):
        return base.encoder, base.llm
    if isinstance(base, FastV):
        return Full(), base
    return base, None


def reads_vision_signals(method) -> bool:
    """Whether `method` compresses before the LLM with a base that reads the vision tower's signals."""
    return _stages(_describe(method)[0])[0].needs_vision_signals


def _inline_layers(dytok: DyToK, fastv: FastV, adapter) -> list[int]:
    below = [layer for layer in adapter.attention_layers if layer < fastv.layer]  # default: every attention layer below K
    layers = adapter.guide_layers(below if dytok.layers is None else dytok.layers)
    if max(layers) >= fastv.layer:
        raise ValueError(
            f"the inline prior reads layers {layers}, but FastV drops tokens from layer {fastv.layer} on: "
            f"inline layers must be below it (0..{fastv.layer - 1}); pick earlier layers or a later FastV layer"
        )
    return layers


class _FastVStage:
    """FastV for one prepared prompt: the last token's attention below K (the ranking at K-1; the
    inline prior's layers) is observed, and at layer K the kept tokens are chosen and the rest
    dropped (_seam.drop_tokens). Fills the plan's LLM-side fields at each prefill. Several stages
    run in one batched prefill through `_apply_fastv`."""

    def __init__(self, adapter, fastv, input_ids, lengths, encoder_kept, total, budgets, dytok, inline_layers, plan):
        self.adapter, self.fastv, self.plan = adapter, fastv, plan
        self.per_unit = plan.tokens_per_frame
        self.lengths, self.encoder_kept, self.total, self.budgets = lengths, encoder_kept, total, budgets
        self.dytok, self.inline_layers = dytok, inline_layers
        self.prompt_length = input_ids.shape[1]
        self.visual = adapter.visual_positions(input_ids)
        self.layers = sorted({fastv.layer - 1, *(inline_layers or ())})
        self.captured: dict = {}

    def observe(self, layer: int, query, key, scaling) -> None:
        """This prompt's query and keys at `layer` (its own positions only: no padding)."""
        visual = self.visual.to(query.device)
        if layer == self.fastv.layer - 1:
            self.captured["rank"] = _finite(last_token_attention_all_keys(query, key, visual, scaling)[0], "attention", self.adapter.model)
        if layer in (self.inline_layers or ()):
            self.captured[layer] = _finite(last_token_attention(query, key, visual, scaling)[0], "attention", self.adapter.model)

    def choose(self) -> torch.Tensor:
        """The prompt positions kept from layer K on (the prompt's own positions, ascending)."""
        scores = self.captured.pop("rank", None)
        if scores is None:
            raise RuntimeError(f"FastV's ranking layer {self.fastv.layer - 1} was never observed: its attention could not be captured")
        budgets = self.budgets
        if self.inline_layers is not None:
            weights = frame_weights(torch.stack([self.captured.pop(layer) for layer in self.inline_layers]), self.lengths)
            budgets = self.dytok.budgets(weights.tolist(), self.total, self.per_unit, available=self.lengths)
            self.plan.frame_weights = [float(w) for w in weights]
        kept = fastv_keep(scores, self.lengths, self.total, budgets)
        self.plan.budgets = [len(k) for k in kept]
        self.plan.kept = [[frame_kept[i] for i in k] for frame_kept, k in zip(self.encoder_kept, kept)]
        self.plan.visual_tokens_kept = sum(self.plan.budgets)
        starts = torch.tensor([0] + self.lengths).cumsum(0)[:-1]
        chosen = torch.cat([torch.tensor(k, dtype=torch.long) + s for k, s in zip(kept, starts.tolist())])
        keep = torch.ones(self.prompt_length, dtype=torch.bool)
        keep[self.visual.cpu()] = False
        keep[self.visual.cpu()[chosen]] = True
        return keep.nonzero().squeeze(1)

    def apply(self):
        return _apply_fastv([self], [0])


@contextmanager
def _apply_fastv(stages: list[_FastVStage], pads: list[int]):
    """FastV over a left-padded batch of prompts (`pads[b]` pads before prompt b): each stage sees
    its own query and keys, pads cut off, and keeps its own tokens; an item's pads are kept (and
    stay masked), so every item keeps as many positions when each drops as many tokens."""
    first = stages[0]
    length = first.prompt_length + pads[0]

    def observer(layer):
        def observe(module, query, key, scaling, **_):
            if query.shape[2] != length:  # a decoding step: the choice is made
                return
            for b, (stage, pad) in enumerate(zip(stages, pads)):
                if layer in stage.layers:
                    stage.observe(layer, query[b : b + 1, :, pad:], key[b : b + 1, :, pad:], scaling)

        return observe

    def choose() -> torch.Tensor:
        keeps = [torch.cat([torch.arange(pad), stage.choose() + pad]) for stage, pad in zip(stages, pads)]
        if len({len(k) for k in keeps}) != 1:
            raise RuntimeError(f"FastV items of one batch keep {sorted({len(k) for k in keeps})} positions; they must drop as many tokens each")
        return torch.stack(keeps)

    observers = {first.adapter.decoder_layers[layer].self_attn: observer(layer) for layer in first.layers}
    with observe_attention(first.adapter.model, ["text_config"], observers), drop_tokens(
        first.adapter.decoder_layers, first.fastv.layer, length, choose
    ):
        yield


def _guide_adapter(dytok: DyToK, adapter):
    if dytok.guide_name == "self" or dytok.guide is adapter.model:
        return adapter
    guide = adapter_for(dytok.guide)
    main_layout, guide_layout = adapter.layout(), guide.layout()
    mismatch = [f"{k} {v} vs {guide_layout.get(k)}" for k, v in main_layout.items() if v != guide_layout.get(k)]
    if mismatch:
        raise ValueError(
            "the assistant does not match the main model (main vs assistant): "
            + ", ".join(mismatch)
            + "; use an assistant of the same family, tokenizer and frame layout"
        )
    return guide


def _same_tower(dytok, main, guide) -> bool:
    """Whether main and guide share a vision tower; the weight comparison runs once per pair.

    Remembered on the DyToK object with weak references, so a new model that happens to reuse
    a freed model's id() is never mistaken for it.
    """
    key = (id(main.model), id(guide.model))
    entry = dytok._shared.get(key)
    if entry is None or entry[0]() is not main.model or entry[1]() is not guide.model:
        entry = (weakref.ref(main.model), weakref.ref(guide.model), main.same_vision_tower(guide))
        dytok._shared[key] = entry
    return entry[2]


@dataclass
class _GuidePass:
    """One item's guide pass: its prompt (ids, embeds, the view the guide sees) until the batched
    pass fills `weights`, or the weights a VideoCache already held."""

    key: tuple
    cache: VideoCache | None
    timer: _Timer
    weights: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    view: object = None
    units: int = 0
    frames: int = 0
    shared: dict | None = None  # several questions on one video: the prefix they shared


def _guide_pass(dytok, guide, main, layers, tokenizer, question, pixels, encoded, timer, cache=None) -> _GuidePass:
    """What the guide's last-token attention on one uncompressed prompt needs (its own vision pass,
    for an assistant, runs here), or the frame weights the cache holds."""
    # id(encoded): the main model's encoding this pass reads (its own, or its blocks' output), pinned by the cache
    key = ("weights", id(guide.model), tuple(layers), dytok.guide_pool, dytok.guide_stride, dytok.share_vision, question, id(encoded))
    if cache is not None and cache.has(key, guide.model):
        return _GuidePass(key, cache, timer, weights=cache.fetch(key, "guide", timer, None, guide.model))
    frames = encoded.features.shape[0]
    if guide is not main:  # an assistant sees the frames through its own vision tower...
        shared = dytok.share_vision and _same_tower(dytok, main, guide)
        source = encoded  # ...computed once when both models have the same tower
        encoded = _fetch(cache, ("guide_vision", id(guide.model), shared, id(source)), "guide_vision", timer,
                         lambda: _finite_video(guide.project(source.vision_hidden, source) if shared else guide.encode_video(pixels), guide.model),
                         guide.model)
    stride = dytok.guide_stride
    if stride > 1 and stride >= frames:
        raise ValueError(f"guide_stride {stride} leaves the guide 1 of the video's {frames} {guide.unit}s; use a stride below {frames}")
    view, view_pixels = (encoded, pixels) if stride == 1 else guide.subsample_units(encoded, pixels, stride)
    features = view.features
    if dytok.guide_pool > 1:
        features = guide.pool_frames(features, dytok.guide_pool)
    units = features.shape[0]
    ids = guide.prompt_ids(tokenizer, question, [features.shape[1]] * units, view_pixels)
    _check_length(guide, ids, "guide")
    embeds = torch.cat([features.flatten(0, 1), view.newline])
    return _GuidePass(key, cache, timer, ids=ids, embeds=embeds, view=view, units=units, frames=frames)


def _run_guide(dytok, guide, layers, passes: list[_GuidePass], pad_id) -> None:
    """The guide passes not served by a cache, in one left-padded forward; each item is charged its
    share of the batch's time."""
    todo = [p for p in passes if p.weights is None]
    if not todo:
        return
    # the questions on one video seen the same way (the cache key but the question) share the video's prefix
    groups: dict = {}
    for p in todo:
        groups.setdefault(p.key[:6] + p.key[7:], []).append(p)
    _check_memory(guide.model, len(todo), max(int(p.ids.shape[1]) for p in todo), 0, cache=False, who="guide")
    batch: dict[str, float] = {}
    alone, attention = [], {}
    with _Timer(batch, device_sync(guide.device))("guide"):
        _guide_forwards(guide, layers, groups, alone, attention, pad_id)
    share = batch["guide"] / len(todo)
    for p, scores in ((p, attention[id(p)]) for p in todo):
        weights = frame_weights(_finite(scores, "attention", guide.model), p.units)
        p.weights = weights if dytok.guide_stride == 1 else spread_weights(weights, dytok.guide_stride, p.frames)
        p.timer.seconds["guide"] = p.timer.seconds.get("guide", 0.0) + share
        if p.cache is not None:
            p.cache.put(p.key, "guide", p.weights, p.timer.seconds["guide"], guide.model)


def _guide_forwards(guide, layers, groups, alone, attention, pad_id) -> None:
    """Each group of questions on one video through the shared prefix where it can be, the rest in one batch."""
    for group in groups.values():
        shared = guide.token_attention_shared([(p.ids, p.embeds, p.view) for p in group], layers) if len(group) > 1 else None
        if shared is None:
            alone += group
            continue
        for p, scores in zip(group, shared[0]):
            attention[id(p)] = scores
            p.shared = {"questions": len(group), "prefix_tokens": shared[1], "prompt_tokens": int(p.ids.shape[1])}
    if alone:
        for p, scores in zip(alone, guide.token_attention_batch([(p.ids, p.embeds, p.view) for p in alone], layers, pad_id)):
            attention[id(p)] = scores


def _check_question(tokenizer, question: str) -> None:
    """A loaded tokenizer, and a question free of the tokenizer's special tokens: text such as
    "<video>" or "<|im_end|>" would become prompt structure (a second video marker, an early end
    of turn), so it is refused rather than silently escaped or obeyed."""
    if isinstance(tokenizer, (str, os.PathLike)) or not callable(tokenizer):
        raise TypeError(f"expected a loaded tokenizer, got {tokenizer!r}; load it with AutoTokenizer.from_pretrained(path)")
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if getattr(t, "special", False)}
    found = sorted(t for t in specials if t and t in question)
    if found:
        raise ValueError(
            f"the question contains the tokenizer's special token(s) {', '.join(map(repr, found))}, which would be read as "
            "prompt structure (a media marker, a turn delimiter); vidtok refuses them: remove them from the question"
        )


def _check_length(adapter, input_ids: torch.Tensor, who: str) -> None:
    """Refuse a prompt longer than the LLM's position limit (its positions would be out of training range)."""
    limit = getattr(adapter.model.config.get_text_config(), "max_position_embeddings", None)
    length = input_ids.shape[-1]
    if limit and length > limit:
        raise ValueError(
            f"the {who}'s prompt is {length} tokens, over its position limit of {limit} (max_position_embeddings); "
            "use fewer frames, a lower retention or a shorter question"
        )


def _pad_id(tokenizer) -> int | None:
    """The id that left-pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _as_batch(video, question, cache) -> tuple[list, list[str], list, bool]:
    """(videos, questions, caches, batched). A list of questions is a batch: with a list of as many
    videos, or one video they all ask about (decoded and encoded once). One question string is one
    call; `video` is then one video, whatever its type (a list of frames included)."""
    if isinstance(question, str):
        if isinstance(video, (list, tuple)) and video and not all(_is_frame_array(v) for v in video):
            raise ValueError(f"{len(video)} videos with one question string: pass a list of questions, one per video "
                             "(e.g. [question] * len(videos))")
        return [video], [question], [cache], False
    if not isinstance(question, (list, tuple)):
        raise TypeError(f"question must be a string, or a list of strings for a batch, got {type(question).__name__}")
    if not question:
        raise ValueError("an empty batch: give at least one question")
    # a list is one video per question, unless it is one video given as a list of frames (each [H, W, 3]: no video is 3-D)
    if isinstance(video, (list, tuple)) and not (video and all(_is_frame_array(v) for v in video)):
        videos = list(video)
        if len(videos) != len(question):
            raise ValueError(f"{len(videos)} videos for {len(question)} questions: give one video per question, "
                             "or one video that every question asks about")
    else:
        videos = [video] * len(question)
    if cache is not None and not isinstance(cache, (list, tuple)):
        caches = [cache] * len(question)
    else:
        caches = list(cache) if cache is not None else [None] * len(question)
        if len(caches) != len(question):
            raise ValueError(f"{len(caches)} caches for {len(question)} questions: give one per item, one for all, or None")
    return videos, list(question), caches, True


def _is_frame_array(value) -> bool:
    """An RGB frame [H, W, 3] (an item of a list of frames), as opposed to a video."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 3


@torch.no_grad()
def prepare(model, tokenizer, video, question, method=None, *, frames: int | None = None, fps: float | None = None,
            cache: VideoCache | None = None):
    """Encode, (guide,) compress and build the model inputs for one video and question, or a batch.

    `method`: None or Full() for no compression, a base compressor (same budget every unit),
    or DyToK(base, ...). `frames` (a fixed count) or `fps` (per second of video) choose the
    frames of a video file. Returns the inputs for model(**inputs) / model.generate(**inputs),
    inside `with prepared.apply():`. The model is left exactly as it was, also when this raises.
    `cache` (a VideoCache of this video) shares the vision encoder's output and guide passes
    between calls on the same video: the result is the same as without it.

    A batch: `question` a list, `video` a list of as many videos or one video for all; returns one
    Prepared per item, in order. The same video object (or path) is decoded and encoded once, and
    the guide passes of all items run in one left-padded forward.
    """
    videos, questions, caches, batched = _as_batch(video, question, cache)
    prepared = _prepare(model, tokenizer, videos, questions, method, frames, fps, caches)
    return prepared if batched else prepared[0]


def _prepare(model, tokenizer, videos, questions, method, frames, fps, caches) -> list[Prepared]:
    """The pipeline's stages over a batch (a single call is a batch of one): checks, decode and
    encode (per distinct video), guide (one batched pass), allocate, compress and build inputs."""
    for question in questions:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
    for cache in caches:
        if cache is not None and not isinstance(cache, VideoCache):
            raise TypeError(f"cache must be a vidtok.VideoCache of this video (cache=VideoCache(video)) or None, got {type(cache).__name__}")
    for question in dict.fromkeys(questions):
        _check_question(tokenizer, question)
    base, dytok = _describe(method)
    encoder, fastv = _stages(base)
    adapter = adapter_for(model)
    sync = device_sync(adapter.device)
    if fastv is not None:
        adapter.check_fastv_layer(fastv.layer)
    missing = [signal for signal in encoder.signals if signal not in adapter.vision_signals]
    if missing:
        raise ValueError(f"{encoder.name} reads the vision tower's {missing[0]}, which vidtok's {adapter.model.config.model_type} adapter "
                         f"does not give (it gives {', '.join(adapter.vision_signals) or 'none'}); pick a base that reads "
                         "only those (Uniform, Random need none), or add the signal to the family's adapter")
    inline = dytok is not None and dytok.guide_name == "inline"
    guide, layers = None, None
    if inline:
        layers = _inline_layers(dytok, fastv, adapter)
    elif dytok is not None and dytok.guide is not None:  # check the guide and its layers before any work
        guide = _guide_adapter(dytok, adapter)
        if guide is not adapter:  # a released pair pads its embedding tables differently: the tokenizer must fit both
            rows = guide.model.get_input_embeddings().num_embeddings
            if len(tokenizer) > rows:
                raise ValueError(f"the assistant's embedding table has {rows} rows, fewer than the main tokenizer's {len(tokenizer)} "
                                 "tokens: it was trained with another tokenizer; use an assistant of the same family and tokenizer")
        layers = guide.guide_layers(dytok.layers)

    # the same video object (or path) in several items: decoded once, its work shared through one cache
    shared: dict = {}
    items = []
    for video, question, cache in zip(videos, questions, caches):
        source = os.path.realpath(os.fspath(video)) if isinstance(video, (str, os.PathLike)) else id(video)
        if cache is None and len(videos) > 1:
            cache = shared.setdefault(("cache", source), VideoCache(video))
        if cache is not None:
            cache.bind(video, frames, fps)
        seconds: dict[str, float] = {}
        timer = _Timer(seconds, sync)
        if ("pixels", source) in shared:
            pixels = shared[("pixels", source)]
        else:  # a cache holds the video's pixels as this model's preprocessing made them (the cache fixes frames, fps)
            pixels = shared[("pixels", source)] = _fetch(cache, ("pixels", id(model)), "decode", timer,
                                                         lambda: adapter.pixels(video, frames, fps), model)
        items.append({"question": question, "cache": cache, "seconds": seconds, "timer": timer, "pixels": pixels})

    for item in items:  # budgets, refused now if impossible, not after the guide pass or inside the prefill
        num_frames, per_frame = adapter.video_shape(item["pixels"])
        retention = dytok.retention if dytok else base.retention
        vision_budget = total_budget(retention if fastv is None else encoder.retention, num_frames, per_frame)
        # FastV alone: the share kept from layer K is the method's retention (DyToK's, which defaults to FastV's own)
        llm_share = None if fastv is None else fastv.retention if isinstance(base, Composed) else retention
        llm_budget = vision_budget if fastv is None else total_budget(llm_share, 1, vision_budget)
        item.update(units=num_frames, per_unit=per_frame, retention=retention, vision_budget=vision_budget, llm_budget=llm_budget,
                    dropping=llm_budget < vision_budget, compressing=vision_budget < num_frames * per_frame)
        if dytok is not None:
            if item["compressing"]:
                dytok.budgets([1.0] * num_frames, vision_budget, per_frame, even=True)
            if item["dropping"]:
                even = allocate_budgets([1.0] * num_frames, vision_budget, per_frame)
                dytok.budgets([1.0] * num_frames, llm_budget, per_frame, available=even, even=True)

    _encode(adapter, items, encoder, sync)

    passes = {}
    for n, item in enumerate(items):
        if dytok is not None and guide is not None and (item["compressing"] or item["dropping"]):
            passes[n] = _guide_pass(dytok, guide, adapter, layers, tokenizer, item["question"], item["pixels"], item["encoded"],
                                    item["timer"], item["cache"])
    if passes:
        _run_guide(dytok, guide, layers, list(passes.values()), _pad_id(tokenizer))
    if passes and dytok.compare:  # the diagnostic: the main model's own prior on the same prompts
        itself = dataclasses.replace(dytok, guide="self", layers=calibrated_layers(model), compare=False)
        own_layers = adapter.guide_layers(itself.layers)
        own = {n: _guide_pass(itself, adapter, adapter, own_layers, tokenizer, items[n]["question"], items[n]["pixels"],
                              items[n]["encoded"], items[n]["timer"], items[n]["cache"]) for n in passes}
        _run_guide(itself, adapter, own_layers, list(own.values()), _pad_id(tokenizer))
        for n, p in own.items():
            items[n]["agreement"] = {**guide_agreement(passes[n].weights, p.weights), "main_weights": [float(w) for w in p.weights],
                                     "main_layers": own_layers}
    for n, item in enumerate(items):
        _allocate(item, passes.get(n), dytok)
    seconds: dict[str, float] = {}
    with _Timer(seconds, sync)("compress"):  # compressing and building the inputs: the batch's time, each item its share
        _compress(items, encoder)
        for item in items:
            _build_inputs(item, adapter, tokenizer)
    for item in items:
        item["timer"].seconds["compress"] = item["timer"].seconds.get("compress", 0.0) + seconds["compress"] / len(items)
    return [_finish(item, adapter, base, dytok, fastv, inline, layers, len(items)) for item in items]


def _encode(adapter, items, encoder, sync) -> None:
    """Each item's encoded video: from its cache, else computed in one vision-tower call per kind
    (VisionZip's signals read or not) for every video not yet encoded; each is charged its share."""
    model = adapter.model
    # a cache made with signals=True gets them with every encode where that leaves the features
    # bitwise unchanged (the tower runs sdpa, the kernel the observer runs): one encode serves all
    kernel = attention_implementations(model).get("vision_config")
    rich = kernel == "sdpa"

    def key(signals):  # a plain encode runs the tower's own kernel, which can be switched between calls
        return ("vision", id(model), signals, None if signals else kernel)

    todo: dict = {}
    for item in items:
        cache = item["cache"]
        item["signals"] = (item["compressing"] and encoder.needs_vision_signals) or (cache is not None and cache.signals and rich)
        if cache is not None and cache.has(key(item["signals"]), model):
            continue
        # items that share a cache share its video: encoded once, the others reuse it below
        todo.setdefault(item["signals"], {}).setdefault(id(item) if cache is None else id(cache), item)
    for signals, unique in todo.items():
        batch, seconds = list(unique.values()), {}
        with _Timer(seconds, sync)("vision"):
            encoded = adapter.encode_videos([item["pixels"] for item in batch], signals=signals)
        share = seconds["vision"] / len(batch)
        for item, video in zip(batch, encoded):
            _finite_video(video, model)
            item["timer"].seconds["vision"] = item["timer"].seconds.get("vision", 0.0) + share
            item["encoded"] = video
            if item["cache"] is not None:
                item["cache"].put(key(signals), "vision", video, share, model)
    for item in items:
        if "encoded" not in item:  # in a cache: its own, or one an item of this batch just filled
            item["encoded"] = item["cache"].fetch(key(item["signals"]), "vision", item["timer"], None, model)


def _allocate(item, guide_pass, dytok) -> None:
    """An item's per-unit budgets before the LLM: DyToK's split of its guide's prior (or of none,
    when it reads no guide), else an even split."""
    weights = None if guide_pass is None else guide_pass.weights
    # the split runs here with a guide pass's prior, or with none when it reads no guide (uniqueness)
    split = dytok is not None and (weights is not None or dytok.guide is None)
    prior = None if weights is None else weights.tolist()
    if split and item["compressing"]:
        budgets = dytok.budgets(prior, item["vision_budget"], item["per_unit"], features=item["encoded"].features)
    else:  # static, or nothing dropped before the LLM (FastV alone): DyToK's cap and floor shape FastV's split only
        budgets = allocate_budgets([1.0] * item["units"], item["vision_budget"], item["per_unit"])
    item.update(guide_pass=guide_pass, weights=weights, split=split, prior=prior, vision_budgets=budgets)


def _compress(items, encoder) -> None:
    """Every item's kept tokens: those of the items that compress from one compress_batch call,
    the others all of theirs."""
    todo = [item for item in items if item["compressing"]]
    videos = []
    for item in todo:  # companions (DeepStack) ride along as extra channels: the same tokens, merged the same way
        encoded = item["encoded"]
        stacked = torch.cat([encoded.features, *encoded.companions], dim=-1) if encoded.companions else encoded.features
        videos.append((stacked, item["vision_budgets"], dataclasses.replace(encoded.signals or FrameSignals(), width=encoded.features.shape[-1])))
    compressed = encoder.compress_batch(videos) if videos else []
    if len(compressed) != len(todo):
        raise ValueError(f"{encoder.name}.compress_batch returned {len(compressed)} results for {len(todo)} videos: it must return one per video, in order")
    for item, (tokens, kept) in zip(todo, compressed):
        encoded = item["encoded"]
        tokens, *companions = tokens.split([encoded.features.shape[-1]] + [c.shape[-1] for c in encoded.companions], dim=-1)
        item.update(tokens=tokens, kept=kept, companions=companions)
    for item in items:
        if not item["compressing"]:
            encoded = item["encoded"]
            item.update(tokens=encoded.features.flatten(0, 1), kept=[list(range(item["per_unit"])) for _ in range(item["units"])],
                        companions=[c.flatten(0, 1) for c in encoded.companions])


def _build_inputs(item, adapter, tokenizer) -> None:
    """An item's prompt ids and model inputs around its kept tokens."""
    encoded, kept = item["encoded"], item["kept"]
    video_embeds = torch.cat([item["tokens"], encoded.newline])
    input_ids = adapter.prompt_ids(tokenizer, item["question"], [len(k) for k in kept], item["pixels"])
    _check_length(adapter, input_ids, "model")
    item.update(input_ids=input_ids, inputs=adapter.model_inputs(input_ids, video_embeds, encoded, kept, item["companions"]))


def _finish(item, adapter, base, dytok, fastv, inline, layers, batch) -> Prepared:
    """One item's plan, and its FastV stage where the LLM drops tokens."""
    features = item["encoded"].features
    num_frames, per_frame = item["units"], item["per_unit"]
    vision_budget, llm_budget, dropping = item["vision_budget"], item["llm_budget"], item["dropping"]
    weights, split, prior, vision_budgets = item["weights"], item["split"], item["prior"], item["vision_budgets"]
    tokens, kept, input_ids, inputs = item["tokens"], item["kept"], item["input_ids"], item["inputs"]

    plan = Plan(
        method=base.label,
        guide=dytok.guide_name if dytok else None,
        retention=float(item["retention"]),
        frames=num_frames,
        tokens_per_frame=per_frame,
        total_budget=llm_budget,
        budgets=vision_budgets,
        frame_weights=None if weights is None else [float(w) for w in weights],
        guide_layers=layers if (weights is not None or (inline and dropping)) else None,
        kept=kept,
        visual_tokens_in=num_frames * per_frame,
        visual_tokens_kept=int(tokens.shape[0]),
        seconds=item["seconds"],
        vision_retention=vision_budget / (num_frames * per_frame),
        flops_retention=vision_budget / (num_frames * per_frame),
        unit=adapter.unit,
        allocation=str(dytok.allocation) if dytok else "uniform",
        batch_size=batch,
        guide_shared=None if item["guide_pass"] is None else item["guide_pass"].shared,
        guide_agreement=item.get("agreement"),
    )
    apply = nullcontext
    if fastv is not None:
        plan.layer = fastv.layer
        if dropping:
            lengths = [len(k) for k in kept]
            text_config = adapter.model.config.get_text_config()
            text_tokens = input_ids.shape[1] - vision_budget  # the trailing tokens and the prompt's text are never dropped
            cost = flops.fastv_prefill_flops(text_config, input_ids.shape[1], text_tokens + llm_budget, fastv.layer)
            plan.flops_retention = flops.equal_flops_retention(text_config, text_tokens, num_frames * per_frame, cost)
            plan.vision_budgets = vision_budgets
            budgets = None
            if split:  # an assistant's or a self pass's prior, or a query-agnostic split: the same split, capped by what each frame has
                budgets = dytok.budgets(prior, llm_budget, per_frame, available=lengths, features=features)
            plan.budgets, plan.kept, plan.visual_tokens_kept = budgets, None, None
            stage = _FastVStage(adapter, fastv, input_ids, lengths, kept, llm_budget, budgets, dytok, layers if inline else None, plan)
            apply = stage.apply
    return Prepared(inputs=inputs, plan=plan, apply=apply, stage=stage if fastv is not None and dropping else None)


@torch.no_grad()
def generate(model, tokenizer, video, question, method=None, *, frames: int | None = None, fps: float | None = None,
             cache: VideoCache | None = None, **generate_kwargs):
    """Answer `question` about `video` with `method` (see `prepare`); `generate_kwargs` go to model.generate.

    A batch (`question` a list; `video` a list of as many videos, or one video for all) returns one
    Result per item, in order, equal to answering them one at a time: the prompts are left-padded
    into one generate() call (FastV items grouped by what they drop, so that each group keeps as
    many positions per item).
    """
    videos, questions, caches, batched = _as_batch(video, question, cache)
    prepared = _prepare(model, tokenizer, videos, questions, method, frames, fps, caches)
    if prepared[0].plan.layer is not None and generate_kwargs.get("use_cache") is False:
        raise ValueError("FastV drops tokens from the KV cache of its layers: it needs use_cache=True (generate's default); drop use_cache=False")
    generate_kwargs.setdefault("max_new_tokens", 32)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(p.inputs["input_ids"].shape[1] for p in prepared)
    if limit and isinstance(generate_kwargs["max_new_tokens"], int) and longest + generate_kwargs["max_new_tokens"] > limit:
        warnings.warn(
            f"prompt ({longest} tokens) + max_new_tokens ({generate_kwargs['max_new_tokens']}) passes the model's position "
            f"limit of {limit}: tokens past it are out of the model's trained range",
            stacklevel=2,
        )
    from transformers import LogitsProcessorList

    generate_kwargs["logits_processor"] = LogitsProcessorList([*(generate_kwargs.get("logits_processor") or []), _FiniteLogits(model)])
    groups: dict = {}
    for n, p in enumerate(prepared):  # FastV: items that drop as many tokens share a prefill; the others share one anyway
        stage = p.stage
        groups.setdefault(None if stage is None else sum(stage.lengths) - stage.total, []).append(n)  # tokens dropped
    results: list = [None] * len(prepared)
    for members in groups.values():
        for n, result in zip(members, _generate_batch(model, tokenizer, [prepared[n] for n in members], generate_kwargs)):
            results[n] = result
    return results if batched else results[0]


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on `device`: the GPU's free memory, or the machine's available memory
    on the CPU (MemAvailable); None where it cannot be read."""
    if device.type == "cuda":  # free on the device, plus what torch's allocator holds but no tensor uses
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def _check_memory(model, batch: int, length: int, new_tokens: int | None, cache: bool = True, who: str = "model") -> None:
    """Refuse a batch whose KV cache (`cache`: a generate call; a guide pass keeps none) and prefill
    activations, estimated from the shapes, pass the free memory, before any of it is allocated,
    naming the batch size that fits."""
    config = model.config.get_text_config()
    free = free_memory(next(model.parameters()).device)
    if batch < 2 or free is None:
        return
    size = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tokens = length + (new_tokens if isinstance(new_tokens, int) else 0)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * size if cache else 0  # per item
    # one layer's live prefill activations: hidden states, q/k/v/o projections and the MLP's widest tensors
    activations = length * (6 * config.hidden_size + 3 * getattr(config, "intermediate_size", 4 * config.hidden_size)) * size
    need = batch * (kv + activations)
    if need > free:
        fit = max(1, free // (kv + activations))
        raise ValueError(
            f"a batch of {batch} {who} prompts of up to {length} tokens needs about {need / 2**30:.1f} GiB "
            f"({'KV cache and ' if cache else ''}prefill activations), and {free / 2**30:.1f} GiB is free: use a batch of at most "
            f"{fit}, fewer frames or a lower retention"
        )


def _generate_batch(model, tokenizer, prepared: list[Prepared], generate_kwargs) -> list[Result]:
    adapter = adapter_for(model)
    kwargs = dict(generate_kwargs)
    config = kwargs.get("generation_config") or model.generation_config
    samples = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    if samples > 1 and len(prepared) > 1:
        raise ValueError(f"num_return_sequences={samples} in a batch: answer such items one at a time (a single call returns every "
                         "sample in Result.sequences)")
    if len(prepared) > 1 and (kwargs.get("stopping_criteria") or kwargs.get("stop_strings") or getattr(config, "stop_strings", None)):
        # generate() stops a batch's rows by the end token only; a row another criterion stopped goes on generating
        raise ValueError("stopping_criteria / stop_strings in a batch: a batch stops each item at its end token only; "
                         "answer such items one at a time, or cut the answers afterwards")
    _check_memory(model, len(prepared), max(p.inputs["input_ids"].shape[1] for p in prepared), kwargs.get("max_new_tokens"))
    inputs, pads = adapter.batch_inputs([p.inputs for p in prepared], _pad_id(tokenizer))
    stages = [p.stage for p in prepared]
    apply = nullcontext() if stages[0] is None else _apply_fastv(stages, pads)
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    if len(prepared) > 1 and pad is None:
        pad = kwargs["pad_token_id"] = _pad_id(tokenizer)
    seconds: dict[str, float] = {}
    with apply, _Timer(seconds, device_sync(inputs["input_ids"].device))("generate"):
        out = model.generate(**inputs, **kwargs)
    sequences, step_logits = (out, None) if torch.is_tensor(out) else (out.sequences, getattr(out, "logits", None))
    share = seconds["generate"] / len(prepared)
    width = inputs["input_ids"].shape[1]
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if samples > 1:  # one item, several samples: every sample row as generate returned it, the answer from the first
        p = prepared[0]
        p.plan.seconds["generate"] = p.plan.seconds.get("generate", 0.0) + share
        text = tokenizer.decode(sequences[0, width:], skip_special_tokens=True).strip()
        return [Result(text=text, plan=p.plan, sequences=sequences, prompt_tokens=width)]
    results = []
    for b, (p, row) in enumerate(zip(prepared, sequences)):
        new = row[width:].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        if ends:  # a batch pads an item that ended early; alone it would have stopped there
            new = new[: ends[0] + 1]
        prompt = p.inputs["input_ids"][0]
        p.plan.seconds["generate"] = p.plan.seconds.get("generate", 0.0) + share
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        full = torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype, device=prompt.device)])[None]
        # beam search returns a row per beam: an item's first row is its own (every beam is alike at the first step)
        logits = None if step_logits is None else torch.stack([step[b * (step.shape[0] // len(prepared))] for step in step_logits[: len(new)]])
        results.append(Result(text=text, plan=p.plan, sequences=full, prompt_tokens=prompt.shape[0], logits=logits))
    return results


def fastv_retention_for_flops(model, tokenizer, question: str, video, layer: int, share: float, *, frames: int | None = None) -> float:
    """FastV's retention at `layer` whose LLM prefill costs at most `share` of the uncompressed
    prefill's FLOPs (LM head excluded), for this model's config and this prompt's length: the
    paper's comparison of methods at equal FLOPs."""
    _check_question(tokenizer, question)
    adapter = adapter_for(model)
    adapter.check_fastv_layer(FastV(retention=1.0, layer=layer).layer)  # the constructor checks it is a whole number
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"a FLOPs share must be in (0, 1], got {share!r}")
    pixels = adapter.pixels(video, frames)
    units, per_unit = adapter.video_shape(pixels)
    visual = units * per_unit
    prompt = adapter.prompt_ids(tokenizer, question, [per_unit] * units, pixels).shape[1]
    keep = flops.fastv_keep_for_flops(adapter.model.config.get_text_config(), prompt - visual, visual, layer, share)
    if keep < 1:
        raise ValueError(f"a FLOPs share of {share:g} leaves FastV no visual token at layer {layer}; raise the share or use an earlier --layer")
    return keep / visual
