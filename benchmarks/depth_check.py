"""Check depth scaling (vidtok.harness.depth) where the full depth can also be run.

    python benchmarks/depth_check.py benchmarks/configs/llava-ov-0.5b-depth.json --out benchmarks/results/depth-check

Runs the config as written (every layer), then the same geometry cut to `--text-layers` LLM
layers (main), `--guide-layers` (assistant) and `--vision-layers` (vision tower) with `scale_to`
set to the config's depths, in this one process, and writes per row the scaled and the measured
seconds of each stage, time to first token and the LLM side, their ratio, and both runs'
speedups over full. The scaled run goes first, so a slow spell late in the run hits the
reference, not the estimate it is checked against.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from vidtok.harness.bench import STAGES, BenchConfig, run_bench


def cut(config: BenchConfig, text: int, guide: int, vision: int) -> BenchConfig:
    data = {f: copy.deepcopy(getattr(config, f)) for f in ("name", "main", "guide", "frames", "runs", "repeats", "warmup", "decode_tokens",
                                                           "device", "dtype", "seed")}
    data["name"] += "-scaled"
    main = data["main"]
    main["scale_to"] = {"text": {"num_hidden_layers": main["text"]["num_hidden_layers"]},
                        "vision": {"num_hidden_layers": main["vision"]["num_hidden_layers"]}}
    main["text"]["num_hidden_layers"], main["vision"]["num_hidden_layers"] = text, vision
    if data["guide"] is not None:
        data["guide"]["scale_to"] = {"text": {"num_hidden_layers": data["guide"]["text"]["num_hidden_layers"]}}
        data["guide"]["text"]["num_hidden_layers"] = guide
    return BenchConfig(**data, source=f"{config._source} (cut)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--guide-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    args = parser.parse_args(argv)
    config = BenchConfig.load(args.config)
    out = Path(args.out)
    scaled = run_bench(cut(config, args.text_layers, args.guide_layers, args.vision_layers), out / "scaled")
    full = run_bench(config, out / "full-depth")
    rows = []
    print(f"{'row':<34}{'TTFT s scaled / run':>22}{'ratio':>7}{'LLM-side s':>22}{'ratio':>7}{'LLM-side x':>16}")
    for s, f in zip(scaled["rows"], full["rows"]):
        name = f["description"]
        row = {
            "row": name,
            "stage_seconds": {stage: {"scaled": s["stage_seconds"][stage], "full_depth": f["stage_seconds"][stage]} for stage in STAGES},
            "ttft_seconds": {"scaled": s["ttft_seconds"], "full_depth": f["ttft_seconds"], "ratio": s["ttft_seconds"] / f["ttft_seconds"]},
            "llm_side_seconds": {"scaled": s["llm_side_seconds"], "full_depth": f["llm_side_seconds"],
                                 "ratio": s["llm_side_seconds"] / f["llm_side_seconds"]},
            "llm_side_speedup": {"scaled": s["llm_side_speedup"], "full_depth": f["llm_side_speedup"]},
            "ttft_speedup": {"scaled": s["ttft_speedup"], "full_depth": f["ttft_speedup"]},
            "flops_equal": s["prefill_flops"] == f["prefill_flops"],
        }
        rows.append(row)
        t, l = row["ttft_seconds"], row["llm_side_seconds"]
        print(f"{name[:33]:<34}{t['scaled']:>11.2f} / {t['full_depth']:<8.2f}{t['ratio']:>7.2f}{l['scaled']:>11.2f} / {l['full_depth']:<8.2f}"
              f"{l['ratio']:>7.2f}{row['llm_side_speedup']['scaled']:>8.2f} / {row['llm_side_speedup']['full_depth']:.2f}")
    (out / "depth_check.json").write_text(json.dumps({"config": args.config, "cut": vars(args), "rows": rows}, indent=1))
    print(f"results in {out}/depth_check.json")


if __name__ == "__main__":
    main()
