"""Where does the keyframe prior live? Per guide layer, on a labelled split:

- mass: mean last-token attention weight of the ground-truth needle frame (uniform share = 1/F);
- hit rate: how often the needle frame gets the largest weight;
- outlier share: weight of the first and last frames (the paper's temporal attention outliers).

`calibrate` picks the contiguous layer range whose averaged frame weights put the most mass on
the needle frame, and stores it beside the model's config (vidtok.json), where `vidtok run`
and `vidtok eval` find it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..importance import frame_weights


@torch.no_grad()
def layer_frame_weights(model, tokenizer, records) -> list[torch.Tensor]:
    """[layers, F] frame weights per record, every attention layer of the model as guide (in order)."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    every = adapter.attention_layers
    out = []
    for record in records:
        pixels = adapter.pixels(record["video"], record.get("frames"))
        _check_needle(record, pixels.shape[0])
        encoded = adapter.encode_video(pixels)
        features, newline = encoded.features, encoded.newline
        ids = adapter.prompt_ids(tokenizer, record["question"], [features.shape[1]] * features.shape[0], pixels)
        tokens = adapter.token_attention(ids, torch.cat([features.flatten(0, 1), newline]), every, encoded)
        out.append(torch.stack([frame_weights(tokens[i : i + 1], features.shape[0]) for i in range(len(every))]))
    return out


def _check_needle(record, frames: int | None) -> None:
    """A needle_frame the scores can index (`frames`: the video's count, None while unknown):
    checked per record, naming it; an IndexError deep in the scoring names neither it nor the fix."""
    target = record.get("needle_frame")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0 or (frames is not None and target >= frames):
        name = f"record id {record['id']}" if "id" in record else "a record"
        where = f"outside its {frames} frames" if frames is not None else "not a frame index"
        raise ValueError(f"{name} ({record['video']}): needle_frame {target!r} is {where}; fix the record or drop it from the split")


def prior_report(weights: list[torch.Tensor], records, layer_ids=None) -> dict:
    layers = weights[0].shape[0]
    layer_ids = list(range(layers)) if layer_ids is None else layer_ids
    report = {"layers": [], "samples": len(records)}
    for layer in range(layers):
        mass = hit = outlier = uniform = 0.0
        for w, record in zip(weights, records):
            row, target = w[layer], record["needle_frame"]
            mass += float(row[target])
            hit += float(int(row.argmax()) == target)
            outlier += float(row[0] + row[-1])
            uniform += 1.0 / row.numel()
        n = len(records)
        report["layers"].append(
            {"layer": layer_ids[layer], "needle_mass": mass / n, "uniform_share": uniform / n, "argmax_hit_rate": hit / n, "first_last_share": outlier / n}
        )
    return report


def best_range(weights: list[torch.Tensor], records, layer_ids=None) -> tuple[list[int], dict]:
    """The run of consecutive (attention) layers whose averaged prior puts the most mass on the needle."""
    layers = weights[0].shape[0]
    layer_ids = list(range(layers)) if layer_ids is None else layer_ids
    scores = {}
    for a in range(layers):
        for b in range(a, layers):
            total = 0.0
            for w, record in zip(weights, records):
                avg = w[a : b + 1].mean(0)
                total += float(avg[record["needle_frame"]] / avg.sum())
            scores[f"{layer_ids[a]}-{layer_ids[b]}"] = total / len(records)
    best = max(scores, key=lambda k: (round(scores[k], 6), -int(k.split("-")[0])))
    a, b = (layer_ids.index(int(x)) for x in best.split("-"))
    return layer_ids[a : b + 1], scores


def calibrate(model, tokenizer, records, folder: str | Path | None = None, assistant=None) -> dict:
    from ..calibration import CALIBRATION_FILE

    if not records:  # an empty split lacks questions, not labels: say which
        raise ValueError("calibration got no records (an empty split); calibrate on a labelled split, e.g. one written by `vidtok synth OUT_DIR`")
    if any("needle_frame" not in r for r in records):
        raise ValueError("calibration needs a labelled split: every record with a needle_frame")
    for record in records:  # before any compute where the record says its frame count
        frames = record.get("frames")
        _check_needle(record, frames if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else None)
    weights = layer_frame_weights(model, tokenizer, records)
    from ..models import adapter_for

    adapter = adapter_for(model)
    per_unit = adapter.frames_per_unit  # weights are per unit: a temporal group holds frames 2g, 2g + 1 (Qwen-VL)
    records = [{**r, "needle_frame": r["needle_frame"] // per_unit} for r in records]
    ids = adapter.attention_layers
    layers, scores = best_range(weights, records, ids)
    result = {"guide_layers": layers, "range_scores": scores, "prior": prior_report(weights, records, ids)}
    if assistant is not None:  # a diagnostic beside the calibration, not part of what is stored
        result_agreement = agreement(model, assistant, tokenizer, records, layers, weights)
    if folder is not None:
        Path(folder, CALIBRATION_FILE).write_text(json.dumps(result, indent=1))
    if assistant is not None:
        result["agreement"] = result_agreement
    return result


def agreement(model, assistant, tokenizer, records, main_layers, weights=None) -> dict:
    """Does the assistant see what the main model sees? Per record, both guides' unit weights (the
    main model at `main_layers`, the assistant at its calibrated layers, else its last third) on
    the same video and question, compared by `guide_agreement`; means over the records.
    `weights`: the main model's per-layer weights when already computed (layer_frame_weights)."""
    from ..calibration import calibrated_layers
    from ..importance import guide_agreement
    from ..models import adapter_for

    main, helper = adapter_for(model), adapter_for(assistant)
    if main.layout() != helper.layout():
        raise ValueError("the assistant does not match the main model's family, tokenizer and frame layout; pass an assistant of the same family")
    assistant_layers = helper.guide_layers(calibrated_layers(assistant))
    main_weights = weights if weights is not None else layer_frame_weights(model, tokenizer, records)
    helper_weights = layer_frame_weights(assistant, tokenizer, records)
    pick = lambda w, ids, chosen: w[[ids.index(layer) for layer in chosen]].mean(0)  # noqa: E731
    rows = [guide_agreement(pick(h, helper.attention_layers, assistant_layers), pick(m, main.attention_layers, main_layers))
            for m, h in zip(main_weights, helper_weights)]
    spearman = [r["spearman"] for r in rows if r["spearman"] is not None]
    return {
        "samples": len(rows),
        "main_layers": list(main_layers),
        "assistant_layers": assistant_layers,
        "spearman": sum(spearman) / len(spearman) if spearman else None,
        "top": rows[0]["top"],
        "top_overlap": sum(r["top_overlap"] for r in rows) / len(rows),
        "same_argmax": sum(r["same_argmax"] for r in rows) / len(rows),
    }


def plot_prior(report: dict, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    xs = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["needle_mass"] for r in rows], "o-", label="attention mass on the needle frame")
    ax.plot(xs, [r["argmax_hit_rate"] for r in rows], "s--", label="needle frame is the argmax")
    ax.plot(xs, [r["first_last_share"] for r in rows], "^:", label="first + last frame share")
    ax.plot(xs, [r["uniform_share"] for r in rows], color="gray", linestyle="-.", label="uniform share (1/F)")
    ax.set_xticks(xs)
    ax.set_xlabel("guide layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}: last-token attention per layer ({report['samples']} questions)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=Path(path).suffix[1:].lower() or "png")  # exactly `path`, PNG without a suffix
    plt.close(fig)
