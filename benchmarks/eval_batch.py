"""`vidtok eval` questions per second at several batch sizes, side by side in one process.

    vidtok synth data/test16 --count 200 --seed 1
    python benchmarks/eval_batch.py --split data/test16 --out benchmarks/results/eval-batch --repeats 3 --llm-floor

Runs the evaluation's default configurations (37: full, then visionzip, uniform and random x
guides none, self and assistant x 4 retentions) with the shipped toy pair, the models loaded
once beforehand, each batch size into a fresh result folder; writes eval_batch.json with the
seconds (the median of `--repeats` runs, the batch sizes alternated), answers per second and
the ratio to batch size 1, and where the seconds went: each stage's seconds summed over every
prediction's plan (a batched stage charges each item its share), the rest ("harness": mp4
decoding, scoring, writing, glue) by difference. eval_batch.png draws them.
`--llm-floor` adds what the LLM stage alone gives: model.generate on random prompts of the
evaluation's lengths, batch 1 against the last batch size listed, timed side by side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from vidtok.harness.evaluate import EvalConfig, configurations, evaluate
from vidtok.testbed.toy import load_default


def stage_seconds(root: Path) -> dict[str, float]:
    """Seconds per pipeline stage, summed over every prediction line under `root` (a reused
    stage's `<stage>_reused` is what it once cost, not time spent here: left out)."""
    totals: dict[str, float] = {}
    for path in root.rglob("predictions.jsonl"):
        for line in path.read_text().splitlines():
            for stage, seconds in json.loads(line).get("seconds", {}).items():
                if not stage.endswith("_reused"):
                    totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def llm_floor(model, tokenizer, lengths: list[int], size: int, repeats: int = 3) -> dict:
    """Seconds of model.generate (2 new tokens, greedy) per prompt of each length, batch 1 vs
    `size`, alternated so that drift on this machine hits both alike; per distinct length and
    summed over `lengths` (one per configuration: the evaluation's mix)."""
    import torch

    embed = model.get_input_embeddings()
    distinct = sorted(set(lengths))
    spent = {(n, b): 0.0 for n in distinct for b in (1, size)}

    def once(length, batch):
        x = embed(torch.randint(3, 20, (batch, length)))
        mask = torch.ones(batch, length, dtype=torch.long)
        start = time.perf_counter()
        model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        return (time.perf_counter() - start) / batch

    with torch.inference_mode():
        for length in distinct:  # warm the shapes
            once(length, 1), once(length, size)
        for _ in range(repeats):
            for length in distinct:
                for batch in (1, size):
                    spent[length, batch] += once(length, batch) / repeats
    mix = {b: sum(spent[n, b] for n in lengths) for b in (1, size)}
    return {"prompt_lengths": lengths, "batch_size": size,
            "per_length": [{"length": n, "seconds_per_prompt": {"1": spent[n, 1], str(size): spent[n, size]},
                            "speedup": spent[n, 1] / spent[n, size]} for n in distinct],
            "seconds_per_prompt_mix": {str(b): s for b, s in mix.items()}, "speedup": mix[1] / mix[size]}


NAMES = {"generate": "LLM: prefill + decoding", "harness": "harness: mp4 decoding, scoring, files", "compress": "compression + inputs",
         "vision": "vision tower", "guide": "guide passes", "guide_vision": "assistant's vision", "decode": "frame preprocessing"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({s for r in rows for s in r["stage_seconds"]}, key=lambda s: -rows[0]["stage_seconds"].get(s, 0.0))
    fig, ax = plt.subplots(figsize=(8, 2.4 + 0.45 * len(rows)))
    labels = [f"batch {r['batch_size']} ({r['speedup_over_batch_1']:.2f}x)" for r in rows]
    left = [0.0] * len(rows)
    for stage in stages:
        widths = [r["stage_seconds"].get(stage, 0.0) for r in rows]
        ax.barh(labels, widths, left=left, label=NAMES.get(stage, stage))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds for the whole evaluation (median run)")
    ax.set_title("vidtok eval on the toy testbed: where the seconds go, by batch size", fontsize=10)
    fig.legend(fontsize=8, ncol=3, loc="lower center")
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every batch size, alternated; the median is reported")
    parser.add_argument("--llm-floor", action="store_true", help="also time the LLM stage alone at the evaluation's prompt lengths")
    args = parser.parse_args()
    model, tokenizer, assistant, _ = load_default()
    importlib.import_module("matplotlib.pyplot")  # imported once here, not inside the first batch size's timing

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if sizes[0] != 1:
        parser.error("--batch-sizes must start with 1: every ratio is to batch size 1")
    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    kept = []
    for repeat in range(args.repeats):  # the sizes alternate: this VM's speed drifts by a fifth over minutes
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                config = EvalConfig(split=args.split, out=str(Path(tmp) / "eval"), batch_size=size)
                start = time.perf_counter()
                summaries = evaluate(config, model, tokenizer, assistant, progress=False, log=lambda *_: None)
                seconds = time.perf_counter() - start
                stages = stage_seconds(Path(tmp) / "eval")
            stages["harness"] = seconds - sum(stages.values())
            answers = len(configurations(config)) * summaries[0]["samples"]
            kept = [round(s["mean_kept_tokens"]) for s in summaries]  # one per configuration: DyToK's budget is fixed per video
            runs[size].append({"seconds": seconds, "answers": answers, "stages": stages, "accuracy": [s["accuracy"] for s in summaries]})
            print(f"batch {size} (run {repeat + 1}): {answers} answers in {seconds:.1f} s ({answers / seconds:.1f}/s); "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])), flush=True)
    rows = []
    for size in sizes:
        done = sorted(runs[size], key=lambda r: r["seconds"])
        middle = done[(len(done) - 1) // 2]  # the median run (the faster middle one of an even count)
        rows.append({"batch_size": size, "seconds": middle["seconds"], "seconds_runs": [r["seconds"] for r in runs[size]],
                     "answers": middle["answers"], "answers_per_s": middle["answers"] / middle["seconds"],
                     "stage_seconds": middle["stages"], "accuracy": middle["accuracy"]})
        assert all(r["accuracy"] == middle["accuracy"] for r in done), "a repeat changed a result"
    for row in rows:
        row["speedup_over_batch_1"] = row["answers_per_s"] / rows[0]["answers_per_s"]
        row["stage_speedup_over_batch_1"] = {k: rows[0]["stage_seconds"][k] / v for k, v in row["stage_seconds"].items()
                                             if v > 0 and k in rows[0]["stage_seconds"]}
        assert row["accuracy"] == rows[0]["accuracy"], "a batch size changed a result"
    result = {"split": args.split, "machine": platform.platform(), "rows": rows}
    if args.llm_floor:
        from vidtok.models import adapter_for
        from vidtok.testbed.synth import read_split

        adapter = adapter_for(model)
        # the prompt around the kept tokens: template, question and the trailing newline token
        text = adapter.input_ids(tokenizer, read_split(args.split)[0]["question"], adapter.trailing_tokens).shape[1]
        result["llm_floor"] = llm_floor(model, tokenizer, [n + text for n in kept], rows[-1]["batch_size"], max(3, args.repeats))
        print(f"LLM stage alone, batch {rows[-1]['batch_size']} vs 1: {result['llm_floor']['speedup']:.2f}x", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_batch.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "eval_batch.png")
    shutil.rmtree(out / "eval", ignore_errors=True)


if __name__ == "__main__":
    main()
