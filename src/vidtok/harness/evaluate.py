"""`vidtok eval`: methods x guides x retentions over a split of JSONL + mp4 files.

One result folder per configuration, named from it (`visionzip-assistant-r0.125`); a folder
whose results.json exists is skipped, so an interrupted run resumes. Each holds per-sample
predictions, accuracy with a 95% Wilson interval, needle-token survival, mean kept tokens and
seconds. A PNG of accuracy vs retention sits beside them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path



@dataclass
class EvalConfig:
    split: str = field(metadata={"help": "questions.jsonl (or its folder) of the split"})
    out: str = field(default="runs/eval", metadata={"help": "result root; one folder per configuration"})
    methods: list[str] = field(default_factory=lambda: ["visionzip", "uniform", "random"])
    guides: list[str] = field(default_factory=lambda: ["none", "self", "assistant"])
    retentions: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5])
    layers: str | None = field(default=None, metadata={"help": "guide layers; None: calibrated or the default"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N samples only"})
    seed: int = 0
    guide_pool: int = field(default=1, metadata={"help": "guided runs: the guide sees frames pooled k x k"})

    def __post_init__(self):
        from ..budget import check_retention
        from ..compressors import GUIDES, METHODS

        for r in self.retentions:
            check_retention(r)
        bad = [m for m in self.methods if m not in METHODS] + [g for g in self.guides if g not in GUIDES]
        if bad:
            raise ValueError(f"unknown methods/guides {bad}; methods: {METHODS}, guides: {GUIDES}")


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # at p = 0 or 1 the bound is exactly 0 or 1; round-off would put it a hair inside
    return (0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == total else min(1.0, centre + half))


def configurations(config: EvalConfig) -> list[tuple[str, str, float, int]]:
    runs = [("full", "none", 1.0, 1)]
    for method in config.methods:
        if method == "full":
            continue
        for guide in config.guides:
            for retention in config.retentions:
                runs.append((method, guide, retention, 1 if guide == "none" else config.guide_pool))
    return runs


def run_name(method: str, guide: str, retention: float, guide_pool: int = 1) -> str:
    return f"{method}-{guide}" + (f"-pool{guide_pool}" if guide_pool != 1 else "") + f"-r{retention:g}"


def evaluate(config: EvalConfig, model, tokenizer, assistant=None, progress: bool = True) -> list[dict]:
    """Run every configuration not yet on disk; returns the summaries of all of them."""
    from tqdm.auto import tqdm

    from ..compressors import build_method
    from ..pipeline import generate
    from ..models import adapter_for
    from ..testbed.synth import read_split
    from ..testbed.toy import calibrated_layers

    records = read_split(config.split)[: config.limit]
    if not records:
        raise ValueError(f"the split {config.split} is empty")
    root = Path(config.out)
    runs = configurations(config)
    pending = [r for r in runs if not (root / run_name(*r) / "results.json").is_file()]
    if any(run[1] == "assistant" for run in pending) and assistant is None:
        raise ValueError("guide 'assistant' needs an assistant model; pass --assistant or drop it from --guides")
    adapter = adapter_for(model)
    methods = {}
    for method, guide, retention, pool in pending:
        guide_model = model if guide == "self" else assistant
        layers = config.layers if config.layers is not None else (calibrated_layers(guide_model) if guide != "none" else None)
        methods[(method, guide, retention, pool)] = build_method(
            method, None if method == "full" else retention, guide, assistant, layers, seed=config.seed, guide_pool=pool
        )
    rows = {r: [] for r in pending}
    for record in tqdm(records, disable=not progress or not pending, desc="eval"):
        pixels = adapter.pixels(record["video"], record.get("frames"))
        for key, method in methods.items():
            result = generate(model, tokenizer, pixels, record["question"], method, max_new_tokens=2, do_sample=False)
            plan = result.plan
            words = result.text.split()
            prediction = words[0] if words else ""
            survived = None
            if "needle_frame" in record:
                survived = record["needle_token"] in plan.kept[record["needle_frame"]]
            rows[key].append(
                {
                    "id": record.get("id"),
                    "question": record["question"],
                    "answer": record["answer"],
                    "prediction": prediction,
                    "correct": prediction == record["answer"],
                    "needle_kept": survived,
                    "budgets": plan.budgets,
                    "frame_weights": plan.frame_weights,
                    "kept_tokens": plan.visual_tokens_kept,
                    "seconds": plan.seconds,
                }
            )
    for key, samples in rows.items():
        method, guide, retention, pool = key
        correct = sum(s["correct"] for s in samples)
        survived = [s["needle_kept"] for s in samples if s["needle_kept"] is not None]
        summary = {
            "method": method,
            "guide": guide,
            "retention": retention,
            "guide_pool": pool,
            "description": str(methods[key]),
            "guide_layers": getattr(methods[key], "layers", None),
            "samples": len(samples),
            "accuracy": correct / len(samples),
            "accuracy_ci95": wilson(correct, len(samples)),
            "needle_survival": sum(survived) / len(survived) if survived else None,
            "mean_kept_tokens": sum(s["kept_tokens"] for s in samples) / len(samples),
            "mean_seconds": {k: sum(s["seconds"].get(k, 0.0) for s in samples) / len(samples) for k in samples[0]["seconds"]},
            "split": str(config.split),
            "config": asdict(config),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        folder = root / run_name(*key)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        (folder / "results.json").write_text(json.dumps(summary, indent=1))
    summaries = [json.loads((root / run_name(*r) / "results.json").read_text()) for r in runs]
    (root / "summary.json").write_text(json.dumps([{k: v for k, v in s.items() if k != "config"} for s in summaries], indent=1))
    plot_accuracy(summaries, root / "accuracy.png")
    return summaries


def plot_accuracy(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    full = [s for s in summaries if s["method"] == "full"]
    if full:
        ax.axhline(100 * full[0]["accuracy"], color="black", linestyle=":", label="full (all tokens)")
    styles = {"none": "--", "self": "-", "assistant": "-."}
    colours = {"visionzip": "tab:blue", "uniform": "tab:orange", "random": "tab:gray"}
    groups = sorted({(s["method"], s["guide"], s.get("guide_pool", 1)) for s in summaries if s["method"] != "full"})
    for method, guide, pool in groups:
        pts = sorted(
            ((s["retention"], s) for s in summaries if (s["method"], s["guide"], s.get("guide_pool", 1)) == (method, guide, pool)),
            key=lambda p: p[0],
        )
        xs = [100 * r for r, _ in pts]
        ys = [100 * s["accuracy"] for _, s in pts]
        lo = [100 * s["accuracy_ci95"][0] for _, s in pts]
        hi = [100 * s["accuracy_ci95"][1] for _, s in pts]
        label = method if guide == "none" else f"{method} + DyToK ({guide}" + (f", guide pool {pool}" if pool != 1 else "") + ")"
        ax.plot(xs, ys, styles.get(guide, "-"), marker="o", color=colours.get(method), label=label)
        ax.fill_between(xs, lo, hi, color=colours.get(method), alpha=0.08)
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
