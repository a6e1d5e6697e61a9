"""vidtok command line: run | eval | viz | calibrate | bench | synth."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .compressors import GUIDES, METHODS, build_method

class UsageError(ValueError):
    pass


# shipped toy models, usable wherever a model folder is (a folder of that name in the working directory wins);
# each asset folder's own name too ("toy-main"): it is what a user sees in the package
SHIPPED = {"toy": "toy-main", "toy-main": "toy-main", "toy-assistant": "toy-assistant",
           "toy-llava-ov": "toy-main", "toy-llava-ov-assistant": "toy-assistant",
           "toy-qwen2.5-vl": "toy-qwen2.5-vl", "toy-qwen2.5-vl-assistant": "toy-qwen2.5-vl-assistant",
           "toy-v2": "toy-v2-main", "toy-v2-main": "toy-v2-main", "toy-v2-assistant": "toy-v2-assistant"}


def shipped_path(name) -> Path:
    from .testbed.toy import ASSETS

    path = Path(name)
    return ASSETS / SHIPPED[str(name)] if str(name) in SHIPPED and not path.exists() else path


def load_model(path):
    """A saved checkpoint folder (config + safetensors + tokenizer files), or a shipped toy name -> (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from .models import adapter_for, supported_model_types

    path = shipped_path(path)
    if not (path / "config.json").is_file():
        # a name that is no folder was likely meant as a shipped one: list them
        shipped = "" if path.exists() else f"; or name a shipped toy model: {', '.join(SHIPPED)}"
        raise UsageError(
            f"no model at {str(path)!r}: expected a folder with config.json, safetensors and tokenizer files "
            "(vidtok never downloads; fetch a checkpoint first, e.g. `hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf --local-dir DIR`)"
            + shipped
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as error:  # corrupt or unreadable JSON, unknown model_type, ...
        raise UsageError(f"cannot read the model config {path / 'config.json'}: {_first_line(error)}; restore the checkpoint's config.json") from error
    if config.model_type not in supported_model_types():
        raise UsageError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(supported_model_types())}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise UsageError(
            f"cannot load the tokenizer in {path}: {_first_line(error)}; "
            "the folder needs the tokenizer files saved with the model (tokenizer.json, tokenizer_config.json)"
        ) from error
    try:
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
    except Exception as error:  # missing, truncated or corrupt safetensors, unreadable files
        raise UsageError(
            f"cannot load the model weights in {path}: {_first_line(error)}; "
            "the folder needs complete *.safetensors files (download or save the checkpoint again)"
        ) from error
    adapter_for(model)
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def _load(args):
    """(model, tokenizer, assistant or None, note or None) from --model/--assistant, else the shipped toy pair."""
    from .testbed.toy import load_default

    note, assistant = None, None
    if args.model is None:
        model, tokenizer, assistant, note = load_default()
    else:
        model, tokenizer = load_model(args.model)
    if getattr(args, "assistant", None) is not None:
        assistant, assistant_tokenizer = load_model(args.assistant)
        if assistant_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the assistant's tokenizer ({args.assistant}) differs from the main model's; use an assistant of the same family")
    return model, tokenizer, assistant, note


def _method(args, model, assistant, tokenizer=None, video=None, question=None):
    """The method the flags name; with --match-flops, FastV's retention solved for that FLOPs share
    (returns the method and the video's pixels, decoded once for the solve)."""
    from .calibration import default_guide_layers

    guide = args.guide or ("none" if args.method == "full" or _agnostic(args.allocation) else "assistant" if assistant is not None else "self")
    _check_given(args, [(args.method, guide)])
    layers = args.layers if args.layers is not None else default_guide_layers(guide, model, assistant, args.layer)
    retention = args.retention
    if getattr(args, "match_flops", None) is not None:
        if args.method != "fastv":
            raise UsageError("--match-flops picks FastV's keep ratio: use it with --method fastv")
        if args.retention is not None:
            raise UsageError("--match-flops sets the retention itself; drop --retention")
        from .pipeline import fastv_retention_for_flops

        video = fastv_video = _pixels(model, video, args)
        retention = fastv_retention_for_flops(model, tokenizer, question, fastv_video, args.layer, args.match_flops)
    method = build_method(args.method, retention, guide, assistant, layers, args.cap, args.floor, args.seed, args.guide_pool,
                          layer=args.layer, vision_retention=args.vision_retention, guide_stride=args.guide_stride,
                          allocation=args.allocation)
    return method, video


def _agnostic(allocation) -> bool:
    """Whether a named split reads no guide (then --guide defaults to none)."""
    from .allocation import as_allocation

    try:
        return allocation is not None and not as_allocation(allocation).needs_prior
    except ValueError as error:
        raise UsageError(str(error)) from None


METHOD_DEFAULTS = {"layer": 2, "floor": 0, "seed": 0, "guide_pool": 1, "guide_stride": 1}  # argparse leaves them None: given or not


def _check_given(args, runs) -> None:
    """Refuse the options given on the command line that apply to none of `runs` (the one table in
    compressors/options.py), then fill in the defaults of those not given."""
    from .compressors.options import check_options

    given = {name for name in vars(args) if getattr(args, name) is not None}
    if getattr(args, "sample", False):  # vidtok run --sample: --seed also seeds the sampling
        given.discard("seed")
    try:
        check_options(given, runs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name, value in METHOD_DEFAULTS.items():
        if getattr(args, name, value) is None:
            setattr(args, name, value)


def _pixels(model, video, args):
    from .models import adapter_for

    if getattr(args, "fps", None) is not None:
        return adapter_for(model).pixels(video, None, args.fps)
    return adapter_for(model).pixels(video, args.frames if args.frames is not None else (16 if args.video is None else 32))


def _video_and_question(args):
    from .testbed.toy import default_question, default_video

    video = args.video or default_video()
    question = args.question or (default_question() if args.video is None else None)
    if question is None:
        raise UsageError("give a QUESTION after the VIDEO")
    if getattr(args, "fps", None) is not None:
        if args.frames is not None:
            raise UsageError("give --frames or --fps, not both")
        return video, question, None
    return video, question, args.frames if args.frames is not None else (16 if args.video is None else 32)


def cmd_run(args) -> int:
    from . import pipeline

    model, tokenizer, assistant, note = _load(args)
    video, question, frames = _video_and_question(args)
    source = video
    method, video = _method(args, model, assistant, tokenizer, video, question)  # --match-flops: video is now decoded pixels
    if args.sample:
        import torch

        torch.manual_seed(args.seed)
    fps = args.fps if isinstance(video, (str, os.PathLike)) else None  # already-decoded pixels carry their sampling
    result = pipeline.generate(
        model, tokenizer, video, question, method, frames=frames, fps=fps, max_new_tokens=args.max_new_tokens, do_sample=args.sample
    )
    record = {
        "answer": result.text,
        "question": question,
        "video": str(source),
        "model": args.model or "default toy model",
        **result.plan.to_dict(),
        "method": args.method,  # as asked: keyframe names its allocation; its encoder-side base is "base"
        "base": result.plan.method,
    }
    if note:
        record["note"] = note
    if args.json:
        print(json.dumps(record))
    else:
        _report(record)
    return 0


def cmd_viz(args) -> int:
    from . import pipeline
    from .harness.files import figure_target
    from .harness.viz import render

    out, fmt = figure_target(args.out)  # before any model is loaded
    model, tokenizer, assistant, note = _load(args)
    video, question, frames = _video_and_question(args)
    method, video = _method(args, model, assistant, tokenizer, video, question)
    pixels = _pixels(model, video, args)
    result = pipeline.generate(model, tokenizer, pixels, question, method, max_new_tokens=args.max_new_tokens)
    from .models import adapter_for

    images, grid = adapter_for(model).display(pixels)
    render(images, result.plan, question, result.text, out, grid=grid, format=fmt)
    print(f"wrote {out}" + (f" ({note})" if note else ""))
    return 0


def _run_label(summary: dict) -> str:
    """The method column: its name, and a split other than the guide's default after a slash."""
    return summary["method"] + (f"/{summary['allocation']}" if summary.get("allocation") else "")


def cmd_eval(args) -> int:
    from .harness.evaluate import EvalConfig, evaluate
    from .harness.files import writable_dir
    from .testbed.synth import read_split

    split = Path(args.split)
    read_split(split)  # a missing or malformed split is named before any model loads
    model_name = Path(args.model).name if args.model else "toy-main"
    out = args.out or f"runs/eval/{split.stem if split.is_file() else split.name}-{model_name}"
    writable_dir(out)
    config = EvalConfig(  # checks the methods, guides, retentions and layers before any model loads
        split=str(split),
        out=out,
        methods=args.methods.split(","),
        guides=args.guides.split(","),
        retentions=args.retentions,
        layers=args.layers,
        limit=args.limit,
        seed=args.seed,
        guide_pool=args.guide_pool,
        guide_stride=args.guide_stride,
        layer=args.layer,
        allocations=args.allocations.split(",") if args.allocations is not None else None,
        batch_size=args.batch_size,
    )
    if args.assistant is not None:
        from .compressors.options import check_options
        from .harness.evaluate import configurations

        try:
            check_options(["assistant"], [(run[0], run[1]) for run in configurations(config)])
        except ValueError as error:
            raise UsageError(str(error)) from None
    model, tokenizer, assistant, note = _load(args)
    if note:
        raise UsageError(f"nothing to evaluate: {note}")
    summaries = evaluate(config, model, tokenizer, assistant, progress=not args.quiet, overwrite=args.overwrite)
    print(f"{'method':<20} {'guide':<10} {'retention':>9} {'accuracy':>9} {'95% CI':>15} {'needle kept':>12} {'tokens':>7} {'failed':>6}")
    for s in summaries:
        if s["accuracy"] is None:
            print(f"{_run_label(s):<20} {s['guide']:<10} {s['retention']:>9g} {'-':>9} {'-':>15} {'-':>12} {'-':>7} {s['failed']:>6}")
            continue
        ci = f"[{100 * s['accuracy_ci95'][0]:.1f}, {100 * s['accuracy_ci95'][1]:.1f}]"
        kept = "-" if s["needle_survival"] is None else f"{100 * s['needle_survival']:.1f}%"
        print(f"{_run_label(s):<20} {s['guide']:<10} {s['retention']:>9g} {100 * s['accuracy']:>8.1f}% {ci:>15} {kept:>12} "
              f"{s['mean_kept_tokens']:>7.1f} {s['failed']:>6}")
    kinds = sorted({k for s in summaries for k in (s.get("by_kind") or {})})
    if kinds:
        print("accuracy by question kind (%):")
        print(f"{'method':<20} {'guide':<10} {'retention':>9} " + " ".join(f"{k:>8}" for k in kinds))
        for s in summaries:
            by = s.get("by_kind") or {}
            print(f"{_run_label(s):<20} {s['guide']:<10} {s['retention']:>9g} "
                  + " ".join(f"{100 * by[k]['accuracy']:>8.1f}" if k in by else f"{'-':>8}" for k in kinds))
    failed = {f["index"]: f["reason"] for s in summaries for f in s["failures"]}
    if failed:
        index, reason = next(iter(failed.items()))
        print(f"{len(failed)} sample(s) failed and are left out of the accuracy (e.g. sample {index}: {reason}); "
              "reasons in each results.json under 'failures'; fix them and re-run to retry")
    print(f"results in {out}/ (summary.json, accuracy.png)")
    return 0


def cmd_calibrate(args) -> int:
    from .harness.analysis import calibrate, plot_prior
    from .harness.files import figure_target, writable_dir
    from .testbed.synth import read_split
    from .testbed.toy import ASSETS

    def check_writable(folder):
        try:
            writable_dir(folder, "the model folder")
        except ValueError as error:
            raise UsageError(f"{error}; or pass --dry-run to only report the layers") from None

    records = read_split(args.split)[: args.limit]
    if not records:  # said before a model is loaded, and as what it is (not "lacks labels")
        jsonl = Path(args.split) / "questions.jsonl" if Path(args.split).is_dir() else Path(args.split)
        raise UsageError(f"the split {jsonl} is empty (no question records); "
                         "write a labelled one with `vidtok synth OUT_DIR` and calibrate on OUT_DIR")
    plot = figure_target(args.plot, "--plot")[0] if args.plot else None
    folder = None if args.dry_run else (shipped_path(args.model) if args.model else ASSETS / "toy-main")
    if folder is not None and folder.is_dir():  # before loading (a missing folder is load_model's to name, not to create here)
        check_writable(folder)
    model, tokenizer = _load(args)[:2]
    folder = None if args.dry_run else (shipped_path(args.model) if args.model else model.name_or_path)
    if folder is not None:
        check_writable(folder)
    assistant = load_model(shipped_path(args.assistant))[0] if args.assistant else None
    result = calibrate(model, tokenizer, records, folder, assistant)
    for row in result["prior"]["layers"]:
        print(f"layer {row['layer']:>2}: needle mass {row['needle_mass']:.3f} (uniform {row['uniform_share']:.3f}), "
              f"argmax hit {row['argmax_hit_rate']:.2f}, first+last {row['first_last_share']:.3f}")
    print(f"chosen guide layers: {result['guide_layers']}" + (f" (stored in {folder}/vidtok.json)" if folder else ""))
    if assistant is not None:
        a = result["agreement"]
        spearman = "-" if a["spearman"] is None else f"{a['spearman']:.3f}"
        print(f"assistant vs this model ({a['samples']} questions; assistant layers {a['assistant_layers']}, this model's {a['main_layers']}): "
              f"rank correlation {spearman}, same top frame {100 * a['same_argmax']:.1f}%, "
              f"{100 * a['top_overlap']:.1f}% of this model's top {a['top']} frames also in the assistant's")
    if plot:
        plot_prior(result["prior"], plot, Path(str(args.model or model.name_or_path)).name)
        print(f"wrote {plot}")
    return 0


def cmd_bench(args) -> int:
    from .harness.bench import BenchConfig, resolve_device, run_bench, table
    from .harness.files import writable_dir

    config = BenchConfig.load(args.config)  # checks every key of the file; argparse checked the flags
    if args.repeats is not None:
        config.repeats = args.repeats
    if args.warmup is not None:
        config.warmup = args.warmup
    if args.device is not None:
        config.device = args.device
    # a device this machine lacks is the user's to fix, before the result folder is made
    resolve_device(config.device, "--device" if args.device is not None else f"device in {args.config}")
    out = args.out or f"benchmarks/results/bench-{config.name}"
    writable_dir(out)
    report = run_bench(config, out, log=(lambda *a: None) if args.quiet else print)
    if "throughput" in report:
        from .harness.throughput import throughput_table

        print(throughput_table(report["throughput"]))
        print(f"results in {out}/ (bench.json, bench.png)")
        return 0
    print(table(report["rows"]))
    for retention, goal in (report.get("goal") or {}).items():
        got = goal["default_guide_speedup"]
        verdict = "no default-guide row" if got is None else f"default guide {got:.2f}x: " + (
            "reached" if goal["reached"] else f"short by {goal['short_by']:.2f}x")
        print(f"goal at {retention}: LLM-side >= {goal['goal']:g}x, {verdict}" + (f"; {goal['why']}" if "why" in goal else ""))
    print(f"results in {out}/ (bench.json, {'sweep.png' if config.sweep_frames else 'bench.png'})")
    if report.get("stopped"):
        print(f"the sweep stopped: {report['stopped']['reason']}")
    return 0


def cmd_synth(args) -> int:
    from .harness.files import writable_dir
    from .testbed.synth import write_split

    writable_dir(args.out)
    if args.task == "events":
        from .testbed.events import write_event_split

        if args.needles is not None:
            raise UsageError("--needles sets the needle task's needle count; the events task always has three events")
        if args.scene is not None:
            raise UsageError("--scene keeps the needle task's clutter for k frames; the events task has its own backgrounds")
        # `is not None`: an empty --kinds is refused by event_samples, not taken for "the defaults"
        kinds = {"kinds": tuple(k.strip() for k in args.kinds.split(",")) if args.kinds.strip() else ()} if args.kinds is not None else {}
        path = write_event_split(args.out, args.seed, args.count, frames=args.frames or 32, **kinds)
    elif args.kinds is not None:
        raise UsageError("--kinds picks testbed v2's question kinds: use it with --task events")
    else:
        path = write_split(args.out, args.seed, args.count, frames=args.frames or 16, needles=args.needles or 2,
                           **({"scene": args.scene} if args.scene is not None else {}))
    print(f"wrote {args.count} videos and {path}")
    return 0


def _report(r) -> None:
    base = r.get("base", r["method"])
    if r.get("allocation") == "binary":
        method = f"keyframe selection (guide: {r['guide']}, layers {r['guide_layers']}; {base} within a partly kept frame)"
    else:
        method = base + (f" + DyToK (guide: {r['guide']}, layers {r['guide_layers']})" if r["guide"] else "")
        split = r.get("allocation", "uniform")
        if split not in ("uniform", "proportional"):
            method += f", {split} split" + (" (query-agnostic)" if not r["guide"] else "")
    print(f"question: {r['question']}")
    print(f"answer:   {r['answer']}")
    fastv = f", FastV layer {r['layer']} (same prefill FLOPs as retention {r['flops_retention']:.3f} before the LLM)" if r.get("layer") else ""
    print(f"method:   {method}, retention {r['retention']:g}{fastv}")
    print(f"kept {r['visual_tokens_kept']} of {r['visual_tokens_in']} visual tokens "
          f"({r['frames']} {'temporal groups' if r.get('unit') == 'temporal_group' else 'frames'} x {r['tokens_per_frame']}), "
          f"budget {r['total_budget']}")
    print(f"budgets:  {' '.join(map(str, r['budgets']))}")
    if r["frame_weights"]:
        print(f"weights:  {' '.join(f'{w:.2f}' for w in r['frame_weights'])}")
    print("seconds:  " + ", ".join(f"{k} {v:.3f}" for k, v in r["seconds"].items()))
    if r.get("note"):
        print(f"note:     {r['note']}")


def _count(text: str) -> int:
    """argparse type: an int >= 1 (0 would silently mean "the default" downstream)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _count0(text: str) -> int:
    """argparse type: an int >= 0 (a negative count would silently mean none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _numbers(text: str) -> list[float]:
    """argparse type: comma-separated numbers (their range is EvalConfig's to check)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.125,0.25, got {text!r}") from None


def _add_method_args(p, retention_default=None):
    p.add_argument("--method", default="visionzip", choices=METHODS,
                   help="base compressor (default visionzip); fastv drops tokens inside the LLM; ENCODER+fastv chains both")
    p.add_argument("--guide", choices=GUIDES, help="DyToK guide: none (static budgets), self, assistant, inline (FastV: the main model's own "
                   "attention below --layer, same prefill) (default: assistant if one is available, else self)")
    p.add_argument("--layer", type=_count, help="FastV: the LLM layer from which dropped tokens are gone (default 2, as in FastV)")
    p.add_argument("--vision-retention", type=float, help="ENCODER+fastv: the encoder's share; --retention is the share kept from --layer on")
    p.add_argument("--assistant", help="assistant model folder (same family and tokenizer) for --guide assistant")
    p.add_argument("--retention", type=float, default=retention_default, help="kept share of visual tokens in (0, 1] (default 0.25)")
    p.add_argument("--layers", help="guide layers, 'A-B' or 'A,B,C' (default: calibrated for the guide, else its last third)")
    p.add_argument("--cap", type=_count, help="max tokens per frame (default: all of a frame's tokens)")
    p.add_argument("--floor", type=int, help="min tokens per frame (default 0)")
    p.add_argument("--guide-pool", type=_count, help="the guide sees each frame average-pooled k x k (default 1: full grid)")
    p.add_argument("--guide-stride", type=_count,
                   help="the guide sees every k-th frame, the others weighted by interpolation (default 1: every frame)")
    p.add_argument("--seed", type=int, help="seed for --method random and for sampling (default 0)")
    p.add_argument("--allocation", help="the per-frame split: uniform or uniqueness (query-agnostic, --guide none), proportional "
                   "(DyToK), binary or mix[:W] (the prior's share W, default 0.5) with a guide (default: proportional with a guide)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtok", description="DyToK token compression for Video LLMs")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the command; SUPPRESS keeps the top-level value
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")

    def video_args(q):
        q.add_argument("video", nargs="?", help="video file (default: the shipped sample)")
        q.add_argument("question", nargs="?", help="question (default: the sample's)")
        q.add_argument("--model", help="model folder (default: the shipped toy model)")
        q.add_argument("--frames", type=_count, help="frames to sample uniformly (default 32; 16 for the sample)")
        q.add_argument("--fps", type=float, help="instead of --frames: sample this many frames per second of video")
        q.add_argument("--max-new-tokens", type=_count, default=16)
        _add_method_args(q)

    run = sub.add_parser("run", parents=[debug], help="answer a question about a video")
    video_args(run)
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--match-flops", type=float, help="FastV: keep as many tokens as a prefill of this share of the full one's FLOPs allows")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(func=cmd_run)

    viz = sub.add_parser("viz", parents=[debug], help="one PNG: frames, importance, budgets and kept tokens")
    video_args(viz)
    viz.add_argument("--out", default="vidtok-viz.png", help="PNG to write (default vidtok-viz.png)")
    viz.set_defaults(func=cmd_viz)

    ev = sub.add_parser("eval", parents=[debug], help="methods x guides x retentions over a split (JSONL + mp4)")
    ev.add_argument("split", help="questions.jsonl or its folder")
    ev.add_argument("--model", help="model folder (default: the shipped toy model)")
    ev.add_argument("--assistant", help="assistant model folder (default: the shipped toy assistant)")
    ev.add_argument("--methods", default="visionzip,uniform,random", help="comma-separated: full, uniform, random, visionzip, fastv")
    ev.add_argument("--guides", default="none,self,assistant", help="comma-separated: none, self, assistant, inline (fastv only)")
    ev.add_argument("--retentions", type=_numbers, default="0.0625,0.125,0.25,0.5", help="comma-separated kept shares in (0, 1]")
    ev.add_argument("--layers", help="guide layers for every run (default: calibrated per guide)")
    ev.add_argument("--limit", type=_count, help="first N questions only")
    ev.add_argument("--seed", type=int, help="method random: its seed (default 0)")
    ev.add_argument("--guide-pool", type=_count, help="guided runs: the guide sees frames pooled k x k (default 1)")
    ev.add_argument("--guide-stride", type=_count, help="guided runs: the guide sees every k-th frame (default 1)")
    ev.add_argument("--layer", type=_count, help="FastV's layer (default 2)")
    ev.add_argument("--allocations", help="comma-separated per-frame splits, each run where it fits: default (uniform without a guide, "
                    "proportional with one), uniqueness (guide none), mix[:W], binary (guided)")
    ev.add_argument("--batch-size", type=_count, default=1,
                    help="records per generate() call (default 1); the results equal batch size 1's")
    ev.add_argument("--out", help="result folder (default runs/eval/<split>-<model>)")
    ev.add_argument("--overwrite", action="store_true",
                    help="recompute result folders made by a different evaluation (other split, limit, model, layers, ...) instead of refusing")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    cal = sub.add_parser("calibrate", parents=[debug], help="pick a guide's layers from a labelled split; store them with the model")
    cal.add_argument("split", help="labelled questions.jsonl (with needle_frame) or its folder")
    cal.add_argument("--model", help="guide model folder (default: the shipped toy model)")
    cal.add_argument("--limit", type=_count)
    cal.add_argument("--plot", help="also write the per-layer prior as a PNG here")
    cal.add_argument("--dry-run", action="store_true", help="report only; do not write vidtok.json")
    cal.add_argument("--assistant", help="also report how far this assistant's frame weights agree with the model's (rank correlation, "
                     "shared top frames); a diagnostic, not stored")
    cal.set_defaults(func=cmd_calibrate)

    bench = sub.add_parser("bench", parents=[debug], help="time full vs compressed side by side: stages, TTFT, memory, FLOPs")
    bench.add_argument("config", help="bench config JSON (see benchmarks/configs/)")
    bench.add_argument("--out", help="result folder (default benchmarks/results/bench-<name>)")
    bench.add_argument("--repeats", type=_count, help="timed repeats per configuration (median reported)")
    bench.add_argument("--warmup", type=_count0, help="untimed warm-up calls per configuration")
    bench.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's device, itself auto by default)")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)

    syn = sub.add_parser("synth", parents=[debug], help="write a synthetic needle split (mp4 + questions.jsonl)")
    syn.add_argument("out")
    syn.add_argument("--count", type=_count, default=200)
    syn.add_argument("--seed", type=int, default=1)
    syn.add_argument("--task", choices=("needle", "events"), default="needle",
                     help="needle: v1 (one-token needles, one frame each); events: v2 (multi-frame events, 2x2-token objects, five question kinds)")
    syn.add_argument("--frames", type=_count, help="frames per video (default 16 for needle, 32 for events)")
    syn.add_argument("--needles", type=_count, help="needle task: needles per video (default 2)")
    syn.add_argument("--scene", type=_count, help="needle task: the clutter persists for runs of k frames, a needle changes one object "
                     "of its frame (default 1: new clutter every frame)")
    syn.add_argument("--kinds", help="events task: question kinds in turn, comma-separated (default all five)")
    syn.set_defaults(func=cmd_synth)
    return p


def _os_problem(error: OSError) -> str:
    """One line for a file-system error: what, where, and what to do."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    what = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}{where}: free some disk space or write elsewhere (--out); work finished so far is kept"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}{where}: check the permissions, or choose a path you can write to"
    return f"{what}{where}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if getattr(args, "debug", False):  # the traceback of any error, unfiltered
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:  # UsageError, VideoError, UnsupportedModelError included
        print(f"vidtok: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vidtok run --json | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        print(f"vidtok: error: {_os_problem(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vidtok: interrupted" + ("; `vidtok eval` resumes where it stopped" if args.command == "eval" else ""), file=sys.stderr)
        return 130
    except Exception as error:  # not the user's doing: say so in one line, the traceback is one flag away
        print(f"vidtok: internal error: {type(error).__name__}: {_first_line(error)}; run again with --debug for the traceback "
              "and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
