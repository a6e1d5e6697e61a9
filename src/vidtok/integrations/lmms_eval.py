"""vidtok as an lmms-eval model: `lmms-eval --model vidtok --model_args pretrained=DIR,method=...`.

Registered through lmms-eval's `lmms_eval.models` entry-point group (see pyproject.toml), so an
unmodified lmms-eval 0.7.x finds it. Each request's video is decoded and answered by vidtok's
one-call API (`vidtok.generate`); the plan of every sample (budgets, kept tokens, frame weights,
stage seconds) goes to a per-sample JSONL beside lmms-eval's own sample logs, and the prompt and
answer token counts to lmms-eval's `token_counts` field. Data-parallel runs need nothing from
this class: lmms-eval shards documents by rank and gathers the results itself.

Bad `--model_args` end the run before any model loads with one line that names the key and the
fix (a `ModelArgsError`, a SystemExit: lmms-eval prints tracebacks for ordinary exceptions and
then exits 0, which would hide the mistake).
"""

from __future__ import annotations

import atexit

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..compressors import GUIDES, METHODS
from ..budget import check_retention
from ..harness.evaluate import check_layers_format

MODEL_ID = "vidtok"


class ModelArgsError(SystemExit):
    """A bad --model_args value: the process exits (status 1) with this one line on stderr."""

    def __init__(self, message: str):
        super().__init__(f"vidtok (lmms-eval --model_args): {message}")


def _close_process_group() -> None:
    """lmms-eval opens a gloo process group for data-parallel runs and leaves it to interpreter
    teardown, where its threads are sometimes killed mid-way ("terminate called without an active
    exception", SIGABRT after the results were written: a failed run). Closed at exit instead."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _default_guide(args) -> str:
    """none for full and a query-agnostic split, else the assistant when one is given, else self."""
    from ..allocation import as_allocation

    try:
        agnostic = args.allocation is not None and not as_allocation(args.allocation).needs_prior
    except ValueError as error:
        raise ModelArgsError(f"allocation={args.allocation!r}: {error}") from None
    return "none" if args.method == "full" or agnostic else "assistant" if args.assistant else "self"


@dataclass
class ModelArgs:
    """Every `--model_args` key the vidtok lmms-eval model accepts."""

    pretrained: str = field(default="toy", metadata={"help": "main model folder (config + safetensors + tokenizer), or a shipped toy name"})
    method: str = field(default="visionzip", metadata={"help": f"base compressor: {', '.join(METHODS)}"})
    guide: str | None = field(default=None, metadata={"help": "none | self | assistant | inline (fastv only) (default: assistant when given, else self; none for full)"})
    assistant: str | None = field(default=None, metadata={"help": "assistant model folder for guide=assistant"})
    retention: float | None = field(default=None, metadata={"help": "kept share of visual tokens in (0, 1] (default 0.25; full: 1)"})
    frames: int = field(default=32, metadata={"help": "frames sampled uniformly per video"})
    layers: str | None = field(default=None, metadata={"help": "guide layers 'A-B' or 'A;B;C' (default: calibrated, else the last third)"})
    layer: int = field(default=2, metadata={"help": "FastV's layer: dropped tokens are gone from this LLM layer on"})
    vision_retention: float | None = field(default=None, metadata={"help": "ENCODER+fastv: the encoder's share (retention: the share from layer on)"})
    cap: int | None = field(default=None, metadata={"help": "max tokens per frame"})
    floor: int = field(default=0, metadata={"help": "min tokens per frame"})
    seed: int = field(default=0, metadata={"help": "seed of method=random"})
    guide_pool: int = field(default=1, metadata={"help": "the guide sees frames average-pooled k x k"})
    guide_stride: int = field(default=1, metadata={"help": "the guide sees every k-th frame"})
    allocation: str | None = field(default=None, metadata={"help": "per-frame split: uniform, uniqueness (guide=none), proportional, binary, mix or mix:W (guided)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (this rank's GPU when there is one)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    max_new_tokens: int = field(default=32, metadata={"help": "used when the task gives none"})
    plan_log: str | None = field(default=None, metadata={"help": "per-sample plan JSONL (default: VIDTOK_PLAN_LOG, else none); one file per rank"})

    @classmethod
    def parse(cls, raw: dict) -> "ModelArgs":
        """Validate everything a user can get wrong, before anything heavy happens."""
        known = {f.name for f in fields(cls)}
        # lmms-eval adds these from its own flags (--batch_size N: N requests per vidtok.generate call)
        ignored = {"batch_size", "max_batch_size"}
        unknown = sorted(set(raw) - known - ignored)
        if unknown:
            raise ModelArgsError(f"unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        args = cls(**values)
        args.batch_size = _batch_size(raw.get("batch_size"))
        args._check(given=set(values))
        return args

    def _check(self, given=()) -> None:
        from ..compressors.options import check_options

        def need(ok, message):
            if not ok:
                raise ModelArgsError(message)

        need(self.method in METHODS, f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        need(self.guide is None or self.guide in GUIDES, f"guide={self.guide!r} is unknown; choose one of {', '.join(GUIDES)}")
        guide = self.guide or _default_guide(self)  # as __init__ resolves it
        try:  # the table run, eval and bench share: an option for a method it does not shape is refused
            check_options(given, [(self.method, guide)], spell=lambda option: f"{option.name}=")
        except ValueError as error:
            raise ModelArgsError(str(error)) from None
        if self.retention is not None:
            try:
                check_retention(self.retention)
            except ValueError as error:
                raise ModelArgsError(f"retention={self.retention!r}: {error}") from None
        need(isinstance(self.frames, int) and not isinstance(self.frames, bool) and self.frames >= 1, f"frames={self.frames!r} must be a positive integer")
        for name in ("floor", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{name}={value!r} must be a non-negative integer")
        for name in ("max_new_tokens", "guide_pool", "guide_stride"):  # 0 new tokens answers nothing; a 0 x 0 pool sees nothing
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{name}={value!r} must be a positive integer")
        need(self.cap is None or (isinstance(self.cap, int) and not isinstance(self.cap, bool) and self.cap >= 1),
             f"cap={self.cap!r} must be a positive integer")
        need(self.cap is None or self.floor <= self.cap, f"floor={self.floor} exceeds cap={self.cap}: a frame cannot keep more than its cap; lower floor= or raise cap=")
        if self.layers is not None:  # the format now; whether the layers exist once the guide is loaded
            try:
                check_layers_format(self.layer_spec)
            except ValueError:
                raise ModelArgsError(
                    f"cannot read layers {str(self.layers)!r}: write a range 'A-B' (inclusive) or a list 'A;B;C' (lmms-eval splits --model_args at commas)"
                ) from None
        if self.allocation is not None:
            from ..allocation import as_allocation

            try:
                as_allocation(self.allocation)
            except ValueError as error:
                raise ModelArgsError(f"allocation={self.allocation!r}: {error}") from None
        self._check_plan_log()
        need(isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 1, f"layer={self.layer!r} must be a positive integer (FastV's layer)")
        need(self.guide != "inline" or "fastv" in self.method, "guide=inline reads the main model's attention before FastV drops tokens: use method=fastv")
        need("+" not in self.method or self.vision_retention is not None, f"method={self.method} needs vision_retention=<the encoder's share>")
        need(self.dtype in ("float32", "bfloat16", "float16"), f"dtype={self.dtype!r}; use float32, bfloat16 or float16")
        if self.guide == "assistant":
            need(self.assistant is not None, "guide=assistant needs assistant=<checkpoint folder> (an assistant of the same family)")
        if self.method == "full":
            need(self.guide in (None, "none"), "method=full keeps every token: drop guide= (there is nothing to guide)")
            need(self.retention in (None, 1, 1.0), "method=full keeps every token: drop retention=")
        for name in ("pretrained", "assistant"):
            path = getattr(self, name)
            if path is not None and not _is_toy_name(path):
                need(Path(path, "config.json").is_file(), f"{name}={path!r} is not a model folder (no config.json there); vidtok never downloads: give a local checkpoint folder")

    def _check_plan_log(self) -> None:
        """The plan log's folder is made and written to at the first sample, deep inside lmms-eval's
        evaluation (a traceback, exit 0): prove it writable now (creating it, as that sample would)."""
        from ..harness.files import OutputError, writable_dir

        log = self.plan_log or os.environ.get("VIDTOK_PLAN_LOG")
        if not log:
            return
        key, path = ("plan_log" if self.plan_log else "VIDTOK_PLAN_LOG"), Path(log)
        if path.is_dir():
            raise ModelArgsError(f"{key}={log!r} is a folder; give a file name such as {str(path / 'plans.jsonl')!r}")
        try:
            writable_dir(path.parent, what=f"the folder of {key}")
        except OutputError as error:
            raise ModelArgsError(f"{key}={log!r}: {error}") from None
        if path.exists() and not os.access(path, os.W_OK):
            raise ModelArgsError(f"{key}={log!r} exists and is read-only; choose another path or make it writable")

    @property
    def layer_spec(self):
        if self.layers is None:
            return None
        text = str(self.layers).strip("\"'")
        return text.replace(";", ",")


def _batch_size(value) -> int:
    """lmms-eval's --batch_size: a whole number >= 1 (its "auto" probes memory by trial, which a
    compressed video's varying length would mislead: name a size)."""
    if value is None:
        return 1
    try:
        size = int(str(value))
    except ValueError:
        size = 0
    if size < 1:
        raise ModelArgsError(f"batch_size {value!r}: give --batch_size a whole number >= 1 (vidtok answers that many requests "
                             "per batch, with the same results as one at a time)")
    return size


def _is_toy_name(name) -> bool:
    from ..cli import SHIPPED

    return str(name) in SHIPPED


def _load(name):
    from ..cli import UsageError, load_model

    try:
        return load_model(name)
    except UsageError as error:
        raise ModelArgsError(str(error)) from None


def _check_fits(args: ModelArgs, guide: str, layers, model, assistant) -> None:
    """What only the loaded models can tell: the guide layers and FastV's layer within their depth,
    cap and floor within a frame's tokens, the floor and cap against the kept budget. vidtok
    checks these per sample, which inside lmms-eval's evaluation is a traceback and exit 0 on
    every request; here they end the run at startup with one line. `frames` frames are assumed
    (what every video is sampled to). The budget checks need a fixed number of tokens per frame
    (LLaVA-OneVision); a family whose units and their tokens follow each video (Qwen-VL's
    temporal groups, sized by the resolution) has them checked per sample."""
    from ..budget import total_budget
    from ..models import adapter_for

    main = adapter_for(model)
    frames = args.frames
    per_frame = getattr(main, "tokens_per_frame", None) if main.unit == "frame" else None
    composed, fastv = "+" in args.method, "fastv" in args.method
    which = f"layers={args.layers}" if args.layers is not None else f"the calibrated guide layers {layers}"
    try:
        if fastv:
            main.check_fastv_layer(args.layer)
    except ValueError as error:
        raise ModelArgsError(f"layer={args.layer}: {error}") from None
    try:
        if guide == "inline":
            chosen = main.guide_layers([a for a in main.attention_layers if a < args.layer] if layers is None else layers)
            if max(chosen) >= args.layer:
                raise ValueError(f"the inline prior reads layers {chosen}, but FastV drops tokens from layer {args.layer} on: "
                                 f"inline layers must be below it (0..{args.layer - 1}); pick earlier layers or a later layer=")
        elif guide != "none":
            adapter_for(assistant if guide == "assistant" else model).guide_layers(layers)
    except ValueError as error:
        raise ModelArgsError(f"{which}: {error}") from None
    if guide == "none" or per_frame is None:
        return
    cap = per_frame if args.cap is None else args.cap
    name = Path(str(args.pretrained)).name
    if cap > per_frame:
        raise ModelArgsError(f"cap={cap} exceeds the {per_frame} tokens a frame of {name} has; use cap<={per_frame}")
    if args.floor > cap:
        raise ModelArgsError(f"floor={args.floor} exceeds the {per_frame} tokens a frame of {name} has; use floor<={per_frame}")
    retention = 0.25 if args.retention is None else args.retention
    if composed:
        encoder, dropped = args.vision_retention, min(1.0, retention / args.vision_retention)
    else:
        encoder, dropped = (1.0, retention) if fastv else (retention, None)
    try:
        vision = total_budget(encoder, frames, per_frame)
        kept = vision if dropped is None else total_budget(dropped, 1, vision)
    except ValueError as error:
        raise ModelArgsError(f"retention={retention:g} with frames={frames}: {error}") from None
    if kept == frames * per_frame or (composed and guide == "inline"):
        # nothing compressed: no budget to split; composed + inline: FastV's floor and cap are
        # bounded per frame by what the encoder left, checked per sample
        return
    if args.floor * frames > kept:
        raise ModelArgsError(f"floor={args.floor} x frames={frames} = {args.floor * frames} exceeds the budget of {kept} tokens "
                             f"(retention={retention:g} of {frames} frames x {per_frame} tokens); lower floor= or raise retention=")
    if kept > frames * cap:
        raise ModelArgsError(f"the budget of {kept} tokens exceeds frames={frames} x cap={cap} = {frames * cap}; raise cap= or lower retention=")


def model_help() -> str:
    return "\n".join(f"  {f.name:<15} {f.metadata.get('help', '')}" for f in fields(ModelArgs))


def _base():
    from lmms_eval.api.model import lmms

    return lmms


class VidtokLMM(_base()):
    """lmms-eval model: vidtok's compression in front of any supported Video LLM."""

    is_simple = True

    def __init__(self, **model_args):
        super().__init__()
        import torch

        from ..compressors import build_method
        from ..calibration import default_guide_layers

        self.args = args = ModelArgs.parse(model_args)
        atexit.register(_close_process_group)
        self._device = _pick_device(args.device)
        dtype = getattr(torch, args.dtype)
        model, self.tokenizer = _load(args.pretrained)
        self.model = model.to(self._device, dtype).eval()
        assistant = None
        guide = args.guide or _default_guide(args)
        if args.assistant is not None:
            assistant, assistant_tokenizer = _load(args.assistant)
            if assistant_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ModelArgsError(f"assistant {args.assistant!r} has another tokenizer than {args.pretrained!r}; use an assistant of the same family")
            assistant = assistant.to(self._device, dtype).eval()
        layers = args.layer_spec if args.layer_spec is not None else default_guide_layers(guide, self.model, assistant, args.layer)
        try:
            self.method = build_method(args.method, args.retention, guide, assistant, layers, args.cap, args.floor, args.seed, args.guide_pool,
                                       layer=args.layer, vision_retention=args.vision_retention, guide_stride=args.guide_stride,
                                       allocation=args.allocation)
        except (TypeError, ValueError) as error:
            raise ModelArgsError(str(error)) from None
        _check_fits(args, guide, layers, self.model, assistant)
        self.guide = guide
        self.batch_size_per_gpu = args.batch_size
        log = args.plan_log or os.environ.get("VIDTOK_PLAN_LOG")
        self._plan_log = None if not log else Path(log)

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def _plan_path(self) -> Path | None:
        if self._plan_log is None:
            return None
        if self.world_size > 1:
            return self._plan_log.with_name(f"{self._plan_log.stem}.rank{self.rank}{self._plan_log.suffix}")
        return self._plan_log

    def generate_until(self, requests):
        from tqdm.auto import tqdm

        from ..pipeline import generate

        path = self._plan_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        out: list = [None] * len(requests)
        size = self.batch_size_per_gpu
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vidtok") as bar:
            for start in range(0, len(requests), size):
                chunk = range(start, min(start + size, len(requests)))
                # one generate() call per set of generation settings in the chunk (tasks may differ in them)
                groups: dict = {}
                for n in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[n].args
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                    videos = [v for v in visuals if isinstance(v, (str, os.PathLike))]
                    if len(videos) != 1 or len(visuals) != 1:
                        raise ValueError(f"{task} doc {doc_id}: vidtok answers about exactly one video per question, got {len(visuals)} visuals")
                    kwargs = _generation_kwargs(gen_kwargs, self.args.max_new_tokens)
                    groups.setdefault(json.dumps(kwargs, sort_keys=True), []).append((n, videos[0], context, gen_kwargs, doc_id, task, split))
                for key, members in groups.items():
                    results = generate(self.model, self.tokenizer, [m[1] for m in members], [m[2] for m in members], self.method,
                                       frames=self.args.frames, **json.loads(key))
                    for (n, video, _, gen_kwargs, doc_id, task, split), result in zip(members, results):
                        out[n] = self._answer(result, gen_kwargs, path, {"task": task, "split": split, "doc_id": doc_id, "video": str(video)})
                bar.update(len(chunk))
        return out

    def _answer(self, result, gen_kwargs, path, where: dict):
        from lmms_eval.api.instance import GenerationResult, TokenCounts

        text = _cut(result.text, gen_kwargs.get("until"))
        new_tokens = int(result.sequences.shape[1]) - result.prompt_tokens
        if path is not None:
            with open(path, "a") as f:
                f.write(json.dumps({**where, "answer": text, **result.plan.to_dict()}) + "\n")
        return GenerationResult(text=text, token_counts=TokenCounts(input_tokens=result.prompt_tokens, output_tokens=new_tokens))

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vidtok's lmms-eval model supports generate_until only (multiple-choice tasks answered by generation); "
            "loglikelihood scoring of compressed videos is not implemented"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vidtok's lmms-eval model does not support multi-round generation; use single-turn tasks")


def _pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelArgsError(f"device={name!r} is not a torch device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelArgsError(f"device={name!r} but torch sees no CUDA device; use device=cpu")
    return device


def _generation_kwargs(gen_kwargs: dict, default_new_tokens: int) -> dict:
    """lmms-eval's task gen_kwargs -> transformers generate kwargs (greedy unless the task samples)."""
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    kwargs = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", default_new_tokens)), "do_sample": sample}
    if sample:
        kwargs["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            kwargs["top_p"] = float(gen_kwargs["top_p"])
    return kwargs


def _cut(text: str, until) -> str:
    if isinstance(until, str):
        until = [until]
    for stop in until or []:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def manifest():
    """The lmms-eval entry point: `lmms_eval.models` group -> this callable -> a ModelManifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="vidtok.integrations.lmms_eval.VidtokLMM")


def tasks_path() -> str:
    """The folder of vidtok's own lmms-eval tasks, for `--include_path`."""
    return str(Path(__file__).with_name("lmms_tasks"))
