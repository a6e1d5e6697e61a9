"""`vidtok eval` questions per second at several batch sizes, side by side in one process.

    vidtok synth data/test16 --count 200 --seed 1
    python benchmarks/eval_batch.py --split data/test16 --out benchmarks/results/eval-batch

Runs the evaluation's default configurations (37: full, then visionzip, uniform and random x
guides none, self and assistant x 4 retentions) with the shipped toy pair, the models loaded
once beforehand, each batch size into a fresh result folder; writes eval_batch.json with the
seconds, answers per second and the ratio to batch size 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from vidtok.harness.evaluate import EvalConfig, configurations, evaluate
from vidtok.testbed.toy import load_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()
    model, tokenizer, assistant, _ = load_default()
    rows = []
    for size in [int(x) for x in args.batch_sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            config = EvalConfig(split=args.split, out=str(Path(tmp) / "eval"), batch_size=size)
            start = time.perf_counter()
            summaries = evaluate(config, model, tokenizer, assistant, progress=False, log=lambda *_: None)
            seconds = time.perf_counter() - start
        answers = len(configurations(config)) * summaries[0]["samples"]
        rows.append({"batch_size": size, "seconds": seconds, "answers": answers, "answers_per_s": answers / seconds,
                     "accuracy": [s["accuracy"] for s in summaries]})
        print(f"batch {size}: {answers} answers in {seconds:.1f} s ({answers / seconds:.1f}/s)", flush=True)
    for row in rows:
        row["speedup_over_batch_1"] = row["answers_per_s"] / rows[0]["answers_per_s"]
        assert row["accuracy"] == rows[0]["accuracy"], "a batch size changed a result"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_batch.json").write_text(json.dumps({"split": args.split, "machine": platform.platform(), "rows": rows}, indent=1))
    shutil.rmtree(out / "eval", ignore_errors=True)


if __name__ == "__main__":
    main()
