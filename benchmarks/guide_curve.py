"""Accuracy vs guide cost: which cheap guide keeps the keyframe prior.

Every candidate guide setting (who guides, which layers, a pooled or frame-strided view) runs VisionZip +
DyToK at one retention on each split; its cost is the guide pass's analytic FLOPs as a share of
the compressed run's LLM side (guide + prefill), for these models and these prompts. Writes
guide_curve.json and guide_curve.png. Reproduce (README, testbed v2):

    python benchmarks/guide_curve.py --model M --assistant A --split data/test16 --split data/v2test \
        --out benchmarks/results/guide-curve
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CANDIDATES = [  # (guide, layers, guide_pool, guide_stride); None layers: the calibrated ones
    ("self", None, 1, 1),
    ("self", "0", 1, 1),
    ("self", "last", 1, 1),
    ("self", None, 1, 2),
    ("assistant", None, 1, 1),
    ("assistant", "0", 1, 1),
    ("assistant", None, 2, 1),
    ("assistant", None, 1, 2),
    ("assistant", None, 1, 4),
]


def main(argv=None) -> int:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from vidtok import adapter_for, flops
    from vidtok.budget import total_budget
    from vidtok.harness.evaluate import EvalConfig, evaluate
    from vidtok.testbed.synth import read_split
    from vidtok.calibration import calibrated_layers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--assistant", required=True)
    parser.add_argument("--split", action="append", required=True)
    parser.add_argument("--retention", type=float, default=0.125)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    assistant = AutoModelForImageTextToText.from_pretrained(args.assistant).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = Path(args.out)
    points = []
    for split in args.split:
        record = read_split(split)[0]
        adapter = adapter_for(model)
        pixels = adapter.pixels(record["video"], record.get("frames"))
        units, per_unit = adapter.video_shape(pixels)
        prompt = adapter.prompt_ids(tokenizer, record["question"], [per_unit] * units, pixels).shape[1]
        text = prompt - units * per_unit
        kept = total_budget(args.retention, units, per_unit)
        prefill = flops.llm_prefill_flops(model.config, text + kept)
        for guide, layers, pool, stride in CANDIDATES:
            guide_model = assistant if guide == "assistant" else model
            depth = adapter_for(guide_model).num_layers
            chosen = calibrated_layers(guide_model) if layers is None else [depth - 1] if layers == "last" else [int(layers)]
            name = f"{guide}-L{'-'.join(map(str, chosen))}" + (f"-pool{pool}" if pool != 1 else "") + (f"-stride{stride}" if stride != 1 else "")
            config = EvalConfig(split=split, out=str(out / Path(split).name / name), methods=["visionzip"], guides=[guide],
                                retentions=[args.retention], layers=",".join(map(str, chosen)), guide_pool=pool,
                                guide_stride=stride)
            summaries = evaluate(config, model, tokenizer, assistant, progress=False, overwrite=True)
            guided = next(s for s in summaries if s["guide"] == guide)
            full = next(s for s in summaries if s["method"] == "full")
            seen = -(-units // stride)
            guide_cost = flops.guide_flops(guide_model.config, text + seen * per_unit // pool**2, max(chosen))
            points.append({"split": split, "guide": guide, "layers": chosen, "guide_pool": pool, "guide_stride": stride, "name": name,
                           "accuracy": guided["accuracy"], "accuracy_ci95": guided["accuracy_ci95"], "by_kind": guided.get("by_kind"),
                           "full_accuracy": full["accuracy"], "guide_flops": guide_cost, "prefill_flops": prefill,
                           "guide_share": guide_cost / (guide_cost + prefill)})
            print(f"{Path(split).name:<10} {name:<22} accuracy {100 * guided['accuracy']:5.1f}%  guide share {100 * points[-1]['guide_share']:5.1f}%",
                  flush=True)
        static = EvalConfig(split=split, out=str(out / Path(split).name / "static"), methods=["visionzip"], guides=["none"],
                            retentions=[args.retention])
        s = next(s for s in evaluate(static, model, tokenizer, progress=False, overwrite=True) if s["method"] == "visionzip")
        points.append({"split": split, "guide": "none", "layers": None, "guide_pool": 1, "guide_stride": 1, "name": "static", "accuracy": s["accuracy"],
                       "accuracy_ci95": s["accuracy_ci95"], "by_kind": s.get("by_kind"), "guide_flops": 0, "prefill_flops": prefill,
                       "guide_share": 0.0})
    (out / "guide_curve.json").write_text(json.dumps({"retention": args.retention, "model": args.model, "assistant": args.assistant,
                                                      "points": points}, indent=1))
    plot(points, out / "guide_curve.png", args.retention)
    print(f"wrote {out}/guide_curve.json and guide_curve.png")
    return 0


def plot(points, path, retention) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({p["split"] for p in points})
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for i, p in enumerate(p for p in points if p["split"] == split):
            x, y = 100 * p["guide_share"], 100 * p["accuracy"]
            lo, hi = (100 * v for v in p["accuracy_ci95"])
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=f"C{i}", label=p["name"], capsize=3)
        ax.set_xlabel("guide share of the LLM side (analytic FLOPs, %)")
        ax.set_ylabel(f"accuracy at {100 * retention:g}% (%)")
        ax.set_title(Path(split).name, fontsize=9)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
