"""`vidtok viz`: one picture of a call: frames, frame importance, budgets, kept tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def render(images, plan, question: str, answer: str, path: str | Path, grid: tuple[int, int] | None = None, format: str | None = None) -> None:
    """images [U, H, W, 3] in [0, 1] (a frame per unit: adapter.display), a unit's token grid (rows,
    cols) and a Plan -> a figure at exactly `path` (`format`: "png", "pdf", ...; None: from the
    suffix, PNG without one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    frames = plan.frames
    side = int(round(plan.tokens_per_frame**0.5))
    grid_rows, grid_cols = grid or (side, side)
    images = np.asarray(images, dtype=np.float32).clip(0, 1)
    cols = min(frames, 16)
    rows = int(np.ceil(frames / cols))
    fig = plt.figure(figsize=(1.1 * cols + 1, 1.3 * rows + 3.2))
    spec = fig.add_gridspec(rows + 2, cols, height_ratios=[1.1] * rows + [1.3, 0.4])
    height, width = images.shape[1], images.shape[2]
    cell_h, cell_w = height / grid_rows, width / grid_cols
    for f in range(frames):
        ax = fig.add_subplot(spec[f // cols, f % cols])
        ax.imshow(images[f], alpha=0.45)
        kept = set(plan.kept[f])
        for t in range(plan.tokens_per_frame):
            r, c = divmod(t, grid_cols)
            if t in kept:
                ax.imshow(images[f, int(r * cell_h) : int((r + 1) * cell_h), int(c * cell_w) : int((c + 1) * cell_w)],
                          extent=(c * cell_w - 0.5, (c + 1) * cell_w - 0.5, (r + 1) * cell_h - 0.5, r * cell_h - 0.5))
                ax.add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, fill=False, edgecolor="lime", linewidth=0.8))
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{f}: {plan.budgets[f]}", fontsize=7)
    bars = fig.add_subplot(spec[rows, :])
    xs = np.arange(frames)
    if plan.frame_weights is not None:
        bars.bar(xs - 0.2, plan.frame_weights, width=0.4, color="tab:blue", label=f"{plan.unit.replace('_', ' ')} importance")
    bars.set_ylabel("importance", fontsize=8)
    twin = bars.twinx()
    twin.bar(xs + 0.2, plan.budgets, width=0.4, color="tab:green", label="tokens kept")
    twin.set_ylabel("tokens kept", fontsize=8)
    twin.set_ylim(0, plan.tokens_per_frame)
    bars.set_xticks(xs)
    bars.set_xlim(-0.6, frames - 0.4)
    bars.set_xlabel(plan.unit.replace("_", " "))
    handles = bars.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bars.legend(handles=handles, fontsize=7, loc="upper left")
    text = fig.add_subplot(spec[rows + 1, :])
    text.axis("off")
    guide = f" + DyToK ({plan.guide} guide, layers {plan.guide_layers})" if plan.guide else ""
    text.text(0, 0.5, f"Q: {question}   A: {answer}   |   {plan.method}{guide}, retention {plan.retention:g}: "
              f"{plan.visual_tokens_kept}/{plan.visual_tokens_in} tokens (green boxes = kept)", fontsize=9, va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format=format or (Path(path).suffix[1:].lower() or "png"))
    plt.close(fig)
