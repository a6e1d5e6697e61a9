"""`vidtok bench` with `batch_sizes`: questions per second of `vidtok.generate` on batches, every
configuration side by side in one run, and the saving of several questions on one video.

Each (configuration, batch size) answers B distinct videos (the bench clip, its frames rotated by
the item's index) and B questions of different lengths in one call, end to end from decoded frames:
vision encoder, guide, compression, prefill and `decode_tokens` generated tokens (`min_new_tokens`
holds every item to that count). Reported: questions/s, visual tokens (in) per second, peak memory,
and per question the LLM-side seconds (guide passes + generate, each item's share of the batch). With
`questions_per_video` q > 1, each guided configuration also answers q questions on one video, where
the guide's pass over the video is shared (vidtok.Plan.guide_shared), beside q questions on q videos.
"""

from __future__ import annotations

import statistics
import time


QUESTIONS = ("what shape is red ?", "which object is the blue one ?", "what colour is the shape ?", "is the green object a shape ?",
             "what shape is the object ?", "which colour is it ?", "what is the red one ?", "is the shape blue ?")
LLM_SIDE = ("guide_vision", "guide", "generate")


def _videos(pixels, count: int) -> list:
    """`count` distinct videos of the bench clip's shape: its frames rotated by the item's index."""
    from ..models import QwenVideo

    def rolled(shift):
        if isinstance(pixels, QwenVideo):
            return QwenVideo(pixels.pixels.roll(shift, 0), pixels.seconds_per_frame, pixels.times)
        return pixels.roll(shift, 0)

    return [pixels if b == 0 else rolled(b) for b in range(count)]


def _timed(model, tokenizer, videos, questions, method, tokens, device) -> dict:
    from ..pipeline import device_sync, generate
    from .bench import PeakMemory

    sync = device_sync(device) or (lambda: None)
    with PeakMemory(device) as memory:
        sync()
        start = time.perf_counter()
        results = generate(model, tokenizer, videos, list(questions), method, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        sync()
        wall = time.perf_counter() - start
    side = statistics.mean(sum(r.plan.seconds.get(s, 0.0) for s in LLM_SIDE) for r in results)
    guide = statistics.mean(r.plan.seconds.get("guide", 0.0) for r in results)
    return {"seconds": wall, "llm_side_per_question": side, "guide_per_question": guide, "peak": memory.peak,
            "visual_tokens_in": sum(r.plan.visual_tokens_in for r in results), "shared": results[0].plan.guide_shared}


def run_throughput(config, setup: dict, rows: list[dict], pixels, log) -> dict:
    """Every row at every batch size (round-robin over repeats), then the one-video rows."""
    from .bench import _method

    model, tokenizer, guide_model, device = (setup[k] for k in ("model", "tokenizer", "guide_model", "device"))
    methods = [_method(row, guide_model) for row in rows]
    sizes = config.batch_sizes
    shares = config.questions_per_video if isinstance(config.questions_per_video, list) else [config.questions_per_video]
    videos = _videos(pixels, max(*sizes, *shares))
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(videos))]
    for method in methods:
        for _ in range(config.warmup):
            _timed(model, tokenizer, videos[:1], questions[:1], method, config.decode_tokens, device)
    cases = [(i, b, "distinct") for b in sizes for i in range(len(rows))]
    for q in (q for q in shares if q > 1):  # q questions on one video beside q on q videos, guided rows and full (the reference)
        cases += [(i, q, kind) for i, row in enumerate(rows) if row["guide"] not in ("none", "inline") or row["method"] == "full"
                  for kind in ("one_video", "distinct")]
    measured: dict = {}
    for repeat in range(config.repeats):
        for i, b, kind in dict.fromkeys(cases):
            chosen = [videos[0]] * b if kind == "one_video" else videos[:b]
            measured.setdefault((i, b, kind), []).append(_timed(model, tokenizer, chosen, questions[:b], methods[i], config.decode_tokens, device))
        log(f"throughput: repeat {repeat + 1}/{config.repeats} done")
    out = []
    for (i, b, kind), runs in measured.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        out.append({
            "method": rows[i]["method"], "guide": rows[i]["guide"], "retention": rows[i]["retention"], "description": str(methods[i]),
            "batch_size": b, "videos": "one video, a question each" if kind == "one_video" else "a video each",
            "questions_per_s": b / seconds, "visual_tokens_per_s": runs[0]["visual_tokens_in"] / seconds, "seconds": seconds,
            "seconds_range": [min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)],
            "llm_side_seconds_per_question": statistics.median(r["llm_side_per_question"] for r in runs),
            "guide_seconds_per_question": statistics.median(r["guide_per_question"] for r in runs),
            "guide_shared": runs[0]["shared"],
            "peak_rss_mb": statistics.median(r["peak"] for r in runs) / 2**20 if device.type == "cpu" else None,
            "peak_cuda_mb": statistics.median(r["peak"] for r in runs) / 2**20 if device.type == "cuda" else None,
        })
    for row in out:  # ratios measured in this run: to batch 1 of the same configuration, and to full at the same batch and videos
        alone = next((r for r in out if r["description"] == row["description"] and r["batch_size"] == 1 and r["videos"] == "a video each"), None)
        row["speedup_over_batch_1"] = None if alone is None else row["questions_per_s"] / alone["questions_per_s"]
        full = next(r for r in out if r["method"] == "full" and r["batch_size"] == row["batch_size"] and r["videos"] == row["videos"])
        row["llm_side_speedup_per_question"] = full["llm_side_seconds_per_question"] / row["llm_side_seconds_per_question"]
    return {"throughput": out}


def _label(row: dict) -> str:
    if row["method"] == "full":
        return "full"
    return f"{row['method']} {100 * row['retention']:g}%" + ("" if row["guide"] == "none" else f" + DyToK ({row['guide']})")


def plot_throughput(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    distinct = [r for r in rows if r["videos"] == "a video each"]
    for i, description in enumerate(dict.fromkeys(r["description"] for r in distinct)):
        points = sorted((r["batch_size"], r["questions_per_s"]) for r in distinct if r["description"] == description)
        label = _label(next(r for r in distinct if r["description"] == description))
        left.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", label=label)
    left.set_xlabel("batch size (questions per generate call)")
    left.set_ylabel("questions / s")
    left.set_title("throughput, a video per question")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    one = [r for r in rows if r["videos"] != "a video each"]
    if one:
        q = max(r["batch_size"] for r in one)
        one = [r for r in one if r["batch_size"] == q]
        labels = list(dict.fromkeys(r["description"] for r in one))
        for j, kind in enumerate(("a video each", "one video, a question each")):
            values = [next(r["llm_side_seconds_per_question"] for r in rows if r["description"] == d and r["videos"] == kind
                           and r["batch_size"] == q) for d in labels]
            right.barh([k + 0.4 * j for k in range(len(labels))], values, height=0.4, label=kind)
        names = [_label(next(r for r in one if r["description"] == d)) for d in labels]
        right.set_yticks([k + 0.2 for k in range(len(labels))], names, fontsize=8)
        right.set_xlabel("LLM-side seconds per question (guide + generate)")
        right.set_title(f"{q} questions: on {q} videos, or on one (guide prefix shared)", fontsize=10)
        right.legend(fontsize=7)
    else:
        right.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_table(rows: list[dict]) -> str:
    head = f"{'configuration':<58}{'batch':>6}  {'videos':<27}{'q/s':>8}{'x batch 1':>10}{'LLM-side s/q':>13}{'x full':>8}"
    lines = [head]
    for r in rows:
        over = "-" if r["speedup_over_batch_1"] is None else f"{r['speedup_over_batch_1']:.2f}"
        lines.append(f"{r['description'][:57]:<58}{r['batch_size']:>6}  {r['videos']:<27}{r['questions_per_s']:>8.3f}{over:>10}"
                     f"{r['llm_side_seconds_per_question']:>13.3f}{r['llm_side_speedup_per_question']:>8.2f}")
    return "\n".join(lines)
