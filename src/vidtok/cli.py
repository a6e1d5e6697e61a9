"""vidtok command line: run | eval | viz | calibrate | synth."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

METHODS = ("full", "uniform", "random", "visionzip")
GUIDES = ("none", "self", "assistant")


class UsageError(ValueError):
    pass


def load_model(path):
    """A saved checkpoint folder (config + safetensors + tokenizer files) -> (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from .models import adapter_for, supported_model_types

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"no model at {str(path)!r}: expected a folder with config.json, safetensors and tokenizer files "
            "(vidtok never downloads; fetch a checkpoint first, e.g. `hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf --local-dir DIR`)"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in supported_model_types():
        raise UsageError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(supported_model_types())}")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    adapter_for(model)
    return model, AutoTokenizer.from_pretrained(path)


def build_method(name: str, retention: float, guide: str, assistant=None, layers=None, cap=None, floor=0, seed=0):
    from .compressors import COMPRESSORS, DyToK, Full

    if name not in COMPRESSORS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "full":
        if guide != "none":
            raise UsageError("--method full keeps every token, so there is nothing for a guide to do; use --guide none")
        if retention not in (None, 1.0):
            raise UsageError("--method full keeps every token; drop --retention or pick a compressing method")
        return Full()
    kwargs = {"seed": seed} if name == "random" else {}
    base = COMPRESSORS[name](retention=0.25 if retention is None else retention, **kwargs)
    if guide == "none":
        return base
    if guide == "assistant" and assistant is None:
        raise UsageError("--guide assistant needs --assistant PATH (an assistant model of the same family)")
    return DyToK(base, guide="self" if guide == "self" else assistant, layers=layers, cap=cap, floor=floor)


def cmd_run(args) -> int:
    from . import pipeline
    from .toy import calibrated_layers, default_question, default_video, load_default

    note = None
    if args.model is None:
        model, tokenizer, default_assistant, note = load_default()
        if args.assistant is None:
            args.assistant_model = default_assistant
    else:
        model, tokenizer = load_model(args.model)
    assistant = getattr(args, "assistant_model", None)
    if args.assistant is not None:
        assistant, assistant_tokenizer = load_model(args.assistant)
        if assistant_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the assistant's tokenizer ({args.assistant}) differs from the main model's; use an assistant of the same family")
    guide = args.guide or ("none" if args.method == "full" else "assistant" if assistant is not None else "self")
    video = args.video or default_video()
    question = args.question or (default_question() if args.video is None else None)
    if question is None:
        raise UsageError("give a QUESTION after the VIDEO")
    guide_model = model if guide == "self" else assistant
    layers = args.layers if args.layers is not None else (calibrated_layers(guide_model) if guide != "none" else None)
    method = build_method(args.method, args.retention, guide, assistant, layers, args.cap, args.floor, args.seed)
    frames = args.frames or (16 if args.video is None else 32)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        import torch

        torch.manual_seed(args.seed)
    result = pipeline.generate(model, tokenizer, video, question, method, frames=frames, **gen)
    plan = result.plan
    record = {
        "answer": result.text,
        "question": question,
        "video": str(video),
        "model": args.model or "default toy model",
        **{k: v for k, v in plan.to_dict().items() if k != "kept"},
        "kept": plan.kept,
    }
    if note:
        record["note"] = note
    if args.json:
        print(json.dumps(record))
    else:
        _report(record)
    return 0


def _report(r) -> None:
    guide = f" + DyToK (guide: {r['guide']}, layers {r['guide_layers']})" if r["guide"] else ""
    print(f"question: {r['question']}")
    print(f"answer:   {r['answer']}")
    print(f"method:   {r['method']}{guide}, retention {r['retention']:g}")
    print(f"kept {r['visual_tokens_kept']} of {r['visual_tokens_in']} visual tokens "
          f"({r['frames']} frames x {r['tokens_per_frame']}), budget {r['total_budget']}")
    print(f"budgets:  {' '.join(map(str, r['budgets']))}")
    if r["frame_weights"]:
        print(f"weights:  {' '.join(f'{w:.2f}' for w in r['frame_weights'])}")
    print("seconds:  " + ", ".join(f"{k} {v:.3f}" for k, v in r["seconds"].items()))
    if r.get("note"):
        print(f"note:     {r['note']}")


def _add_method_args(p, retention_default=None):
    p.add_argument("--method", default="visionzip", choices=METHODS, help="base compressor (default visionzip)")
    p.add_argument("--guide", choices=GUIDES, help="DyToK guide: none (static budgets), self, assistant (default: assistant if one is available, else self)")
    p.add_argument("--assistant", help="assistant model folder (same family and tokenizer) for --guide assistant")
    p.add_argument("--retention", type=float, default=retention_default, help="kept share of visual tokens in (0, 1] (default 0.25)")
    p.add_argument("--layers", help="guide layers, 'A-B' or 'A,B,C' (default: calibrated for the guide, else its last third)")
    p.add_argument("--cap", type=int, help="max tokens per frame (default: all of a frame's tokens)")
    p.add_argument("--floor", type=int, default=0, help="min tokens per frame (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random and for sampling")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtok", description="DyToK token compression for Video LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a question about a video")
    run.add_argument("video", nargs="?", help="video file (default: the shipped sample)")
    run.add_argument("question", nargs="?", help="question (default: the sample's)")
    run.add_argument("--model", help="model folder (default: the shipped toy model)")
    run.add_argument("--frames", type=int, help="frames to sample uniformly (default 32; 16 for the sample)")
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    _add_method_args(run)
    run.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .models import UnsupportedModelError
    from .video import VideoError

    try:
        return args.func(args)
    except (UsageError, VideoError, UnsupportedModelError, ValueError, TypeError) as error:
        print(f"vidtok: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
