"""`vidtok eval`: methods x guides x retentions over a split of JSONL + mp4 files.

One result folder per configuration, named from it (`visionzip-assistant-r0.125`), holding
identity.json (what produced it: split hash, limit, seed, layers, model, assistant and tokenizer
fingerprints, method, vidtok version), predictions.jsonl (one line per sample, fsync'd once per batch, failed
samples with their reason) and results.json (accuracy with a 95% Wilson interval, needle-token
survival, mean kept tokens and seconds, failures). An interrupted run resumes from the last
finished sample; results of a different evaluation are never reused. A PNG of accuracy vs
retention sits beside them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import JsonlLog, atomic_write_json, writable_dir


@dataclass
class EvalConfig:
    split: str = field(metadata={"help": "questions.jsonl (or its folder) of the split"})
    out: str = field(default="runs/eval", metadata={"help": "result root; one folder per configuration"})
    methods: list[str] = field(default_factory=lambda: ["visionzip", "uniform", "random"])
    guides: list[str] = field(default_factory=lambda: ["none", "self", "assistant"])
    retentions: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5])
    layers: str | None = field(default=None, metadata={"help": "guide layers; None: calibrated or the default"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N samples only"})
    # None: not given (its default is filled in below); given for no configuration it shapes, refused
    seed: int | None = field(default=None, metadata={"help": "method random: its seed (default 0)"})
    guide_pool: int | None = field(default=None, metadata={"help": "guided runs: the guide sees frames pooled k x k (default 1)"})
    guide_stride: int | None = field(default=None, metadata={"help": "guided runs: the guide sees every k-th frame (default 1)"})
    layer: int | None = field(default=None, metadata={"help": "FastV's layer K (default 2)"})
    # None: each guide's default split (uniform without a guide, proportional with one); "default" names it in a list
    allocations: list[str] | None = field(default=None, metadata={"help": "per-unit splits: default, uniqueness, mix[:W], binary, ..."})
    # not part of a result's identity: a batch answers as its items would one at a time
    batch_size: int = field(default=1, metadata={"help": "records answered per generate() call"})

    def __post_init__(self):
        from ..budget import check_retention
        from ..compressors.options import check_options

        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        from ..compressors import GUIDES, METHODS

        for r in self.retentions:
            check_retention(r)
        bad = [m for m in self.methods if m not in METHODS] + [g for g in self.guides if g not in GUIDES]
        if bad:
            raise ValueError(f"unknown methods/guides {bad}; methods: {METHODS}, guides: {GUIDES}")
        composed = [m for m in self.methods if "+" in m]
        if composed:
            raise ValueError(f"eval runs single compressors; {composed[0]} (a composition) runs through `vidtok run` and the API")
        if "inline" in self.guides and "fastv" not in self.methods:
            raise ValueError("the inline guide reads the main model's attention before FastV drops tokens: add fastv to the methods")
        check_layers_format(self.layers)
        if self.allocations is not None:
            from ..allocation import as_allocation

            if not self.allocations:
                raise ValueError("allocations is empty: name at least one split (default, uniqueness, mix, ...) or leave it out")
            for name in self.allocations:
                if name != "default":
                    as_allocation(name)
            unused = [a for a in self.allocations if not any(run[5] == (None if a == "default" else a) for run in configurations(self))]
            if unused:
                raise ValueError(f"the split {unused[0]!r} fits none of the guides {self.guides} and methods {self.methods} "
                                 "(uniform, uniqueness: guide none; proportional, binary, mix: guide self or assistant; "
                                 "inline: proportional, binary); add a guide it fits or drop it")
        given = [name for name in ("layers", "seed", "guide_pool", "guide_stride", "layer") if getattr(self, name) is not None]
        check_options(given, [(run[0], run[1]) for run in configurations(self)])
        for name, value in (("seed", 0), ("guide_pool", 1), ("guide_stride", 1), ("layer", 2)):
            if getattr(self, name) is None:
                setattr(self, name, value)


def check_layers_format(layers) -> None:
    """A layers string must read as 'A-B' or 'A,B,C' (parse_layers' reading, without building the
    range): checkable before any model loads; whether the layers exist is the model's to say."""
    import re

    if not isinstance(layers, str):  # None, or the API's ints and ranges: checked against the model
        return
    text = layers.replace(" ", "")
    span = re.fullmatch(r"(\d+)-(\d+)", text)
    try:
        if span is None:
            [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"cannot read layers {layers!r}: write a range 'A-B' (inclusive) or a list 'A,B,C'") from None
    if span is not None and int(span[1]) > int(span[2]):
        raise ValueError(f"no guide layers chosen from {layers!r}: a range 'A-B' needs A <= B")


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # at p = 0 or 1 the bound is exactly 0 or 1; round-off would put it a hair inside
    return (0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == total else min(1.0, centre + half))


def _fits(allocation: str | None, method: str, guide: str) -> bool:
    """Whether a named split (None: the guide's default) applies to a method and guide."""
    if allocation is None:
        return True
    from ..allocation import as_allocation

    split = as_allocation(allocation)
    if method == "keyframe":
        return False
    if guide == "inline":
        return split.name in ("proportional", "binary")
    return split.needs_prior == (guide != "none")


def configurations(config: EvalConfig) -> list[tuple[str, str, float, int, int, str | None]]:
    """(method, guide, retention, guide_pool, guide_stride, allocation) per configuration, full first;
    allocation None: the guide's default split."""
    runs = [("full", "none", 1.0, 1, 1, None)]
    allocations = [None if a == "default" else a for a in (config.allocations or ["default"])]
    for method in config.methods:
        if method == "full":
            continue
        for guide in config.guides:
            if guide == "inline" and method != "fastv":  # the inline prior exists only inside FastV's prefill
                continue
            if method == "keyframe" and guide in ("none", "inline"):  # selection needs a guide pass's frame weights
                continue
            for allocation in allocations:
                if not _fits(allocation, method, guide):
                    continue
                for retention in config.retentions:
                    view = (1, 1) if guide == "none" else (config.guide_pool, config.guide_stride)
                    runs.append((method, guide, retention, *view, allocation))
    return runs


def run_name(method: str, guide: str, retention: float, guide_pool: int = 1, guide_stride: int = 1, allocation: str | None = None) -> str:
    view = (f"-pool{guide_pool}" if guide_pool != 1 else "") + (f"-stride{guide_stride}" if guide_stride != 1 else "")
    split = "" if allocation is None else "-" + allocation.replace(":", "")
    return f"{method}-{guide}{view}{split}-r{retention:g}"


class ResultMismatchError(ValueError):
    """A result folder holds results of a different evaluation than the one asked for."""


EVAL_GENERATION = {"max_new_tokens": 2, "do_sample": False}  # part of every result's identity


def model_fingerprint(model) -> dict:
    """What identifies a model's behaviour, cheaply: its class, its config (paths and versions
    left out) and a hash of every weight tensor's name, shape, dtype and 64 values spread over it.
    Retrained, re-quantised or re-configured weights change it; moving the folder does not."""
    import hashlib

    import torch

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    weights = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            picks = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 64)).long().to(flat.device)
            weights.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            weights.update(flat[picks].float().cpu().numpy().tobytes())
    return {
        "class": type(model).__name__,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, getattr(tokenizer, "chat_template", None)], default=str).encode()).hexdigest()


def split_file(split) -> Path:
    path = Path(split)
    return path / "questions.jsonl" if path.is_dir() else path


def split_name(method) -> str:
    """The per-unit split a built method runs: its DyToK allocation, else uniform."""
    return str(method.allocation) if hasattr(method, "allocation") else "uniform"


def run_identity(run, method, config: EvalConfig, split_sha256: str, model_id: dict, tokenizer_id: str, assistant_id, layers) -> dict:
    """Everything that decides a configuration's numbers; a stored result is reused only when equal."""
    from .. import __version__

    name, guide, retention, pool, stride, allocation = run
    return {
        "vidtok": __version__,
        "split_sha256": split_sha256,
        "limit": config.limit,
        "method": name,
        "guide": guide,
        "retention": retention,
        "guide_pool": pool,
        **({"guide_stride": stride} if stride != 1 else {}),  # absent at 1: identities written before it still match
        **({"allocation": split_name(method)} if allocation is not None else {}),  # absent by default, as above
        "guide_layers": layers,
        "seed": config.seed if name == "random" else None,  # only the random compressor draws
        "description": str(method),
        "model": model_id,
        "tokenizer_sha256": tokenizer_id,
        "assistant": assistant_id if guide == "assistant" else None,
        "generation": EVAL_GENERATION,
    }


def _differences(stored: dict, current: dict) -> str:
    keys = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    shown = []
    for k in keys:
        a, b = stored.get(k), current.get(k)
        short = lambda v: (json.dumps(v)[:40] + "...") if len(json.dumps(v)) > 43 else json.dumps(v)  # noqa: E731
        shown.append(f"{k} {short(a)} -> {short(b)}")
    return "; ".join(shown)


def _record_problem(record: dict, frames: int, tokens_per_frame: int) -> str | None:
    """Why a record cannot be scored against this video, or None."""
    if ("needle_frame" in record) != ("needle_token" in record):  # needle survival needs both
        have, lack = ("needle_frame", "needle_token") if "needle_frame" in record else ("needle_token", "needle_frame")
        return f"the record has {have} but no {lack}; give both (or neither)"
    for key, size, what in (("needle_frame", frames, "frames"), ("needle_token", tokens_per_frame, "tokens per frame")):
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                return f"{key} {value!r} is outside the video's {size} {what}"
    if not isinstance(record.get("answer"), str):
        return f"answer {record.get('answer')!r} is not a string"
    evidence = record.get("evidence")
    if evidence is not None:
        pairs = evidence if isinstance(evidence, list) else None
        if pairs is None or any(not isinstance(p, list) or len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)
                                or not (0 <= p[0] < frames and 0 <= p[1] < tokens_per_frame) for p in pairs):
            return f"evidence must be [frame, token] pairs inside the video's {frames} frames x {tokens_per_frame} tokens"
    if "kind" in record and not isinstance(record["kind"], str):
        return f"kind {record['kind']!r} is not a string"
    return None


# What the summary reads from a scored line; a line lacking one (hand-edited, another tool's) is
# treated as damaged and its sample recomputed, instead of a KeyError on every later run.
_SCORED = ("correct", "needle_kept", "kept_tokens", "seconds")


def _row_problem(row: dict) -> str | None:
    """Why a predictions.jsonl object is not a usable sample line, or None."""
    index = row.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"no sample index, got {index!r}"
    if "failed" not in row:
        missing = [k for k in _SCORED if k not in row]
        if missing:
            return f"sample {index} lacks {', '.join(missing)}"
    return None


class _Run:
    """One configuration's folder: identity.json, append-only predictions.jsonl, results.json."""

    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = folder, identity
        self.log = JsonlLog(folder / "predictions.jsonl")
        self.rows: dict[int, dict] = {}
        self.changed = False

    def mismatch(self) -> str | None:
        """Why the folder's results cannot be reused, or None (also when the folder is new)."""
        ours = [self.folder / n for n in ("identity.json", "predictions.jsonl", "results.json")]
        if not any(p.exists() for p in ours):
            return None
        path = self.folder / "identity.json"
        if not path.is_file():
            return f"{self.folder} holds results without an identity record (made by an older vidtok)"
        try:
            stored = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            return f"{path} is unreadable ({error})"
        if stored != self.identity:
            return f"{self.folder} holds results of a different evaluation ({_differences(stored, self.identity)})"
        return None

    def open(self, fresh: bool, log) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in ("results.json", "predictions.jsonl", "identity.json"):
                (self.folder / name).unlink(missing_ok=True)
        if not (self.folder / "identity.json").is_file():
            atomic_write_json(self.folder / "identity.json", self.identity)
        rows, problems = self.log.read(check=_row_problem)
        for problem in problems:
            log(problem)
        for row in rows:  # the last line of a sample wins: a failure retried later is replaced
            self.rows[row["index"]] = row
        self.changed = bool(problems)

    def needs(self, index: int) -> bool:
        row = self.rows.get(index)
        return row is None or "failed" in row  # failures are retried: a fixed video then counts

    def add(self, row: dict) -> None:
        self.log.append(row, durable=False)  # fsync'd with the rest of its batch (`evaluate`)
        self.rows[row["index"]] = row
        self.changed = True


@contextmanager
def _exclusive(root: Path):
    """One `vidtok eval` per result root at a time; the kernel drops the lock when a process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / ".vidtok-eval.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ValueError(
                f"another vidtok eval (pid {f.read().strip() or '?'}) is writing to {root}; wait for it or pass another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _stderr(message: str) -> None:
    print(f"vidtok: {message}", file=sys.stderr)


def evaluate(config: EvalConfig, model, tokenizer, assistant=None, progress: bool = True, overwrite: bool = False, log=_stderr) -> list[dict]:
    """Evaluate every configuration; returns the summaries of all of them.

    Each configuration's folder records the identity of what produced it (`run_identity`): a
    folder whose identity matches is resumed sample by sample (a finished one is not recomputed);
    one whose identity differs is an error before any compute, unless `overwrite`, which
    recomputes it. Each sample is appended to predictions.jsonl as soon as it is done (a
    killed run keeps it), and each batch's lines are fsync'd together. A sample whose video is unreadable or whose record is impossible is recorded as failed
    with its reason and counted apart; the run goes on.
    """
    import hashlib

    from tqdm.auto import tqdm

    from ..compressors import build_method
    from ..models import adapter_for
    from ..pipeline import generate
    from ..testbed.synth import read_split
    from ..calibration import default_guide_layers

    records = read_split(config.split)[: config.limit]
    if not records:
        raise ValueError(f"the split {config.split} is empty")
    runs = configurations(config)
    if any(run[1] == "assistant" for run in runs) and assistant is None:
        raise ValueError("guide 'assistant' needs an assistant model; pass --assistant or drop it from --guides")
    root = writable_dir(config.out)
    adapter = adapter_for(model)
    if any(run[0] == "fastv" for run in runs):  # refused once, before any sample, not sample by sample
        adapter.check_fastv_layer(config.layer)
    split_sha256 = hashlib.sha256(split_file(config.split).read_bytes()).hexdigest()
    model_id, tokenizer_id = model_fingerprint(model), tokenizer_fingerprint(tokenizer)
    assistant_id = model_fingerprint(assistant) if assistant is not None else None

    methods, states = {}, {}
    for run in runs:
        method, guide, retention, pool, stride, allocation = run
        guide_model = assistant if guide == "assistant" else model
        layers = config.layers if config.layers is not None else default_guide_layers(guide, model, assistant, config.layer)
        methods[run] = build_method(method, None if method == "full" else retention, guide, assistant, layers, seed=config.seed,
                                    guide_pool=pool, layer=config.layer, guide_stride=stride, allocation=allocation)
        guide_adapter = adapter_for(guide_model)
        if guide == "inline" and layers is None:  # every attention layer below FastV's
            layers = [layer for layer in guide_adapter.attention_layers if layer < config.layer]
        resolved = guide_adapter.guide_layers(layers) if guide != "none" else None
        identity = run_identity(run, methods[run], config, split_sha256, model_id, tokenizer_id, assistant_id, resolved)
        states[run] = _Run(root / run_name(*run), identity)

    with _exclusive(root):
        stale = {run: state.mismatch() for run, state in states.items()}
        stale = {run: why for run, why in stale.items() if why}
        if stale and not overwrite:
            raise ResultMismatchError(
                f"{len(stale)} result folder(s) cannot be reused: {next(iter(stale.values()))}"
                + (f" (and {len(stale) - 1} more)" if len(stale) > 1 else "")
                + "; pass --overwrite (evaluate(..., overwrite=True)) to recompute them, or another --out to keep them"
            )
        for run, state in states.items():
            if run in stale:
                log(f"recomputing {state.folder}: {stale[run]}")
            state.open(fresh=run in stale, log=log)
        try:
            _forget_changed_videos(records, states, log)
            todo = [i for i in range(len(records)) if any(s.needs(i) for s in states.values())]
            sharing = {"videos": 0, "configurations": 0, "computed": {}, "saved_seconds": {}}
            size = config.batch_size
            with tqdm(total=len(todo), disable=not progress, desc="eval") as bar:
                for start in range(0, len(todo), size):  # a kill costs at most the batch in flight
                    _evaluate_records(todo[start : start + size], records, states, methods, adapter, model, tokenizer, generate, sharing)
                    for state in states.values():  # one fsync per folder per batch, not one per line
                        state.log.sync()
                    bar.update(len(todo[start : start + size]))
        finally:
            for state in states.values():
                state.log.close()

        summaries = []
        for run, state in states.items():
            # Always rebuilt from predictions.jsonl (cheap): a run stopped between appending a
            # sample and rewriting results.json (kill, full disk) leaves an old results.json behind,
            # and "nothing changed this run" does not mean it agrees with the predictions.
            summary = json.loads(json.dumps(_summarise(run, methods[run], state, len(records), config)))  # as stored: lists, not tuples
            results = state.folder / "results.json"
            stored = None
            if results.is_file():
                try:
                    stored = json.loads(results.read_text())
                except ValueError as error:
                    log(f"{results} is damaged ({error}); rebuilt from predictions.jsonl")
            if isinstance(stored, dict) and _same_numbers(stored, summary):
                if stored.get("split") == summary["split"]:
                    summary = stored  # unchanged: kept as written (its finish time included)
                else:  # the same split (its sha256 is in the identity) read from another path, e.g. a copy:
                    # the numbers stand, so no warning, but the record names the path they now come from
                    summary = {**summary, "finished": stored.get("finished", summary["finished"])}
                    atomic_write_json(results, summary)
            else:
                if isinstance(stored, dict) and not state.changed:
                    log(f"{results} did not match predictions.jsonl (an earlier run stopped before rewriting it); rebuilt from it")
                atomic_write_json(results, summary)
            summaries.append(summary)
        atomic_write_json(root / "summary.json", [{k: v for k, v in s.items() if k not in ("config", "identity")} for s in summaries])
        atomic_write_json(root / "sharing.json", sharing)  # this invocation's: rewritten every run, never stale
        if sharing["videos"]:
            saved = sharing["saved_seconds"]
            log(f"shared work: {sharing['videos']} videos, {sharing['configurations']} runs; the vision encoder ran "
                f"{sharing['computed'].get('vision', 0)} times (+{sharing['computed'].get('guide_vision', 0)} assistant towers), "
                f"guide passes {sharing['computed'].get('guide', 0)} times; sharing saved {saved.get('vision', 0.0):.1f} s of vision, "
                f"{saved.get('guide_vision', 0.0):.1f} s of assistant vision and {saved.get('guide', 0.0):.1f} s of guide passes "
                f"(sharing.json)")
        plot_accuracy(summaries, root / "accuracy.png")
        if any(s.get("by_kind") for s in summaries):
            plot_by_kind(summaries, root / "accuracy_by_kind.png")
    return summaries


def _same_numbers(stored: dict, summary: dict) -> bool:
    """Whether a stored results.json says what the predictions say (its time, the command's config
    and the split's path aside: none changes a number; the split's content is in the identity)."""
    volatile = ("finished", "config", "split")
    return {k: v for k, v in stored.items() if k not in volatile} == {k: v for k, v in summary.items() if k not in volatile}


def _forget_changed_videos(records, states, log) -> None:
    """Drop the scored samples whose video file is no longer what they were scored on (replaced or
    rewritten in place since), so that they are computed again: a result must never describe
    another video than the split's. Each sample line holds its video's size, mtime and sha256; a
    file with the same size and mtime is trusted, any other is hashed again (a copied split keeps
    its results). Lines without that record (an earlier vidtok) are recomputed too."""
    from ..video import file_identity

    changed, unknown = [], 0
    for index, record in enumerate(records):
        rows = [state.rows[index] for state in states.values() if index in state.rows and "failed" not in state.rows[index]]
        if not rows:
            continue
        stored = [row.get("video_file") for row in rows]
        current = file_identity(record["video"], known=stored[0]) if stored[0] else None
        if all(s and current and s["sha256"] == current["sha256"] for s in stored):
            continue
        if all(stored):
            changed.append(index)
        else:
            unknown += 1
        for state in states.values():
            state.rows.pop(index, None)
    if changed:
        log(f"the video of {len(changed)} scored sample(s) changed since (e.g. sample {changed[0]}: {records[changed[0]]['video']}): "
            "recomputing them")
    if unknown:
        log(f"{unknown} scored sample(s) predate video fingerprints: recomputing them")


def _evaluate_records(indices, records, states, methods, adapter, model, tokenizer, generate, sharing=None) -> None:
    """Every pending configuration on a batch of records (one generate() call per configuration); a
    failure is recorded, never raised, and only for its own record: a batch that raises is run again
    one record at a time. Each record's configurations share one VideoCache: the video is encoded
    once per vision tower (and per whether VisionZip's signals are read), each guide pass runs once;
    `sharing` counts it."""
    import torch

    from ..pipeline import VideoCache, reads_vision_signals
    from ..video import file_identity

    ready = {}
    for index in indices:
        record = records[index]
        # hashed before decoding: what was read is what the sample is scored on (read again on resume)
        head = {"index": index, "id": record.get("id"), "question": record.get("question"), "video_file": file_identity(record["video"])}
        if "kind" in record:
            head["kind"] = record["kind"]
        try:
            pixels = adapter.pixels(record["video"], record.get("frames"))
            problem = _record_problem(record, pixels.shape[0], adapter.video_shape(pixels)[1])
        except ValueError as error:  # VideoError included: unreadable, too short, impossible frame count
            problem = str(error)
        pending = [run for run, state in states.items() if state.needs(index)]
        if problem:
            for run in pending:
                states[run].add({**head, "failed": problem})
            continue
        # the evaluation's own decoded frames, never handed out: no content check per call
        # one encode per video for all configurations when some read the tower's signals (VideoCache)
        signals = any(reads_vision_signals(methods[run]) for run in pending)
        ready[index] = (head, pixels, VideoCache(pixels, check_content=False, signals=signals), pending)

    for run, state in states.items():
        batch = [index for index, (_, _, _, pending) in ready.items() if run in pending]
        if not batch:
            continue

        def answer(members):
            return generate(model, tokenizer, [ready[i][1] for i in members], [records[i]["question"] for i in members], methods[run],
                            cache=[ready[i][2] for i in members], **EVAL_GENERATION)

        def record(index, outcome):
            head = ready[index][0]
            state.add({**head, "failed": str(outcome)} if isinstance(outcome, Exception) else
                      _scored(head, records[index], outcome, adapter.frames_per_unit))

        try:
            outcomes = answer(batch)
        except (ValueError, torch.OutOfMemoryError):  # some record cannot be answered this way, or the batch is too big:
            for index in batch:  # one at a time, each recorded as soon as it is done
                try:
                    record(index, answer([index])[0])
                except (ValueError, torch.OutOfMemoryError) as error:
                    record(index, error)
            continue
        for index, outcome in zip(batch, outcomes):
            record(index, outcome)

    if sharing is not None:
        for _, _, cache, pending in ready.values():
            sharing["videos"] += 1
            sharing["configurations"] += len(pending)
            for stage, n in cache.computed.items():
                sharing["computed"][stage] = sharing["computed"].get(stage, 0) + n
            for stage, seconds in cache.saved.items():
                sharing["saved_seconds"][stage] = sharing["saved_seconds"].get(stage, 0.0) + seconds


def _scored(head: dict, record: dict, result, frames_per_unit: int) -> dict:
    """A sample's line: its prediction scored against the record, and what the plan kept."""
    plan = result.plan
    words = result.text.split()
    prediction = words[0] if words else ""
    unit = record["needle_frame"] // frames_per_unit if "needle_frame" in record else None  # Qwen-VL: a frame pair
    survived = record["needle_token"] in plan.kept[unit] if unit is not None else None
    evidence = {(f // frames_per_unit, t) for f, t in record.get("evidence") or []}
    evidence_kept = sum(t in plan.kept[u] for u, t in evidence) / len(evidence) if evidence else None
    return {
        **head,
        "answer": record["answer"],
        "prediction": prediction,
        "correct": prediction == record["answer"],
        "needle_kept": survived,
        "evidence_kept": evidence_kept,
        "budgets": plan.budgets,
        "frame_weights": plan.frame_weights,
        "kept_tokens": plan.visual_tokens_kept,
        "seconds": plan.seconds,
    }


def _summarise(run, method, state: _Run, total: int, config: EvalConfig) -> dict:
    name, guide, retention, pool, stride, allocation = run
    rows = [state.rows[i] for i in range(total)]
    samples = [r for r in rows if "failed" not in r]
    failed = [{"index": r["index"], "id": r.get("id"), "reason": r["failed"]} for r in rows if "failed" in r]
    correct = sum(s["correct"] for s in samples)
    survived = [s["needle_kept"] for s in samples if s["needle_kept"] is not None]
    n = len(samples)
    return {
        "method": name,
        "guide": guide,
        "retention": retention,
        "guide_pool": pool,
        "guide_stride": stride,
        "allocation": None if allocation is None else split_name(method),
        "description": str(method),
        "guide_layers": state.identity["guide_layers"],
        "samples": n,
        "failed": len(failed),
        "accuracy": correct / n if n else None,
        "accuracy_ci95": wilson(correct, n) if n else None,
        "needle_survival": sum(survived) / len(survived) if survived else None,
        "mean_kept_tokens": sum(s["kept_tokens"] for s in samples) / n if n else None,
        "by_kind": _by_kind(samples),
        # a stage reused from another configuration is timed as "<stage>_reused" (the seconds it took once)
        "mean_seconds": {k: sum(s["seconds"].get(k, 0.0) for s in samples) / n for k in sorted({k for s in samples for k in s["seconds"]})},
        "failures": failed,
        "split": str(config.split),
        "config": asdict(config),
        "identity": state.identity,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _by_kind(samples: list[dict]) -> dict | None:
    """Accuracy (95% Wilson) and evidence survival per question kind, for splits whose records name one."""
    kinds = sorted({s["kind"] for s in samples if "kind" in s})
    if not kinds:
        return None
    out = {}
    for kind in kinds:
        rows = [s for s in samples if s.get("kind") == kind]
        correct = sum(s["correct"] for s in rows)
        kept = [s["evidence_kept"] for s in rows if s.get("evidence_kept") is not None]
        out[kind] = {"samples": len(rows), "accuracy": correct / len(rows), "accuracy_ci95": wilson(correct, len(rows)),
                     "evidence_kept": sum(kept) / len(kept) if kept else None}
    return out


def plot_by_kind(summaries: list[dict], path: Path) -> None:
    """One panel per question kind: accuracy vs retention per method, full as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [s for s in summaries if s.get("by_kind")]
    kinds = sorted({k for s in summaries for k in s["by_kind"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 4), squeeze=False)
    groups = sorted({(s["method"], s["guide"], s.get("allocation") or "") for s in summaries if s["method"] != "full"})
    for ax, kind in zip(axes[0], kinds):
        for s in summaries:
            if s["method"] == "full" and kind in s["by_kind"]:
                ax.axhline(100 * s["by_kind"][kind]["accuracy"], color="black", linestyle=":", label="full")
        for i, (method, guide, split) in enumerate(groups):
            pts = sorted((s["retention"], s["by_kind"][kind]) for s in summaries
                         if (s["method"], s["guide"], s.get("allocation") or "") == (method, guide, split) and kind in s["by_kind"])
            xs = [100 * r for r, _ in pts]
            label = {"keyframe": "keyframe selection"}.get(method, method) + ("" if guide == "none" else f" ({guide})")
            label += f", {split} split" if split else ""
            ax.plot(xs, [100 * k["accuracy"] for _, k in pts], "o-", color=f"C{i}", label=label)
            ax.fill_between(xs, [100 * k["accuracy_ci95"][0] for _, k in pts], [100 * k["accuracy_ci95"][1] for _, k in pts],
                            color=f"C{i}", alpha=0.08)
        ax.set_xscale("log", base=2)
        ticks = sorted({100 * s["retention"] for s in summaries if s["method"] != "full"})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{kind} ({summaries[0]['by_kind'].get(kind, {}).get('samples', 0)} questions)", fontsize=9)
        ax.set_xlabel("visual tokens kept (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [s for s in summaries if s["accuracy"] is not None]  # a configuration whose every sample failed
    fig, ax = plt.subplots(figsize=(9, 4.8))
    full = [s for s in summaries if s["method"] == "full"]
    if full:
        ax.axhline(100 * full[0]["accuracy"], color="black", linestyle=":", label="full (all tokens)")
    styles = {"none": "--", "self": "-", "assistant": "-."}
    colours = {"visionzip": "tab:blue", "uniform": "tab:orange", "random": "tab:gray"}
    def view(s):
        return s["method"], s["guide"], s.get("guide_pool", 1), s.get("guide_stride", 1), s.get("allocation") or ""

    groups = sorted({view(s) for s in summaries if s["method"] != "full"})
    for n, (method, guide, pool, stride, split) in enumerate(groups):
        pts = sorted(
            ((s["retention"], s) for s in summaries if view(s) == (method, guide, pool, stride, split)),
            key=lambda p: p[0],
        )
        xs = [100 * r for r, _ in pts]
        ys = [100 * s["accuracy"] for _, s in pts]
        lo = [100 * s["accuracy_ci95"][0] for _, s in pts]
        hi = [100 * s["accuracy_ci95"][1] for _, s in pts]
        seen = (f", guide pool {pool}" if pool != 1 else "") + (f", guide stride {stride}" if stride != 1 else "")
        label = method if guide == "none" else f"{method} + DyToK ({guide}{seen})"
        label += f", {split} split" if split else ""
        # a split other than the default gets its own colour: it shares its method's otherwise
        colour = colours.get(method) if not split else f"C{(n + 3) % 10}"
        ax.plot(xs, ys, styles.get(guide, "-"), marker="o", color=colour, label=label)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.08)
    ax.set_xscale("log", base=2)
    ticks = sorted({100 * s["retention"] for s in summaries if s["method"] != "full"})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens kept (%)")
    ax.set_ylabel("accuracy (%)")
    n = summaries[0]["samples"] if summaries else 0
    ax.set_title(f"accuracy vs retention ({n} questions, 95% Wilson bands)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
