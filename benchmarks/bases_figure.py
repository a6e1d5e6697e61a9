"""Summary of benchmarks/bases.sh: every configuration's accuracy (95% Wilson) per split x family,
as one JSON, one Markdown table and one figure, and the issue's two goals checked on the numbers.

    python benchmarks/bases_figure.py benchmarks/results/bases
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BASES = ("visionzip", "diverse", "segmerge")
NAMES = {"visionzip": "VisionZip", "diverse": "DiverseSelect", "segmerge": "SegmentMerge"}


def label(row: dict) -> str:
    base = NAMES.get(row["method"], row["method"])
    if row["guide"] == "none":
        return base + (" + uniqueness" if row.get("allocation") == "uniqueness" else "")
    return f"{base} + DyToK ({row['guide']}" + (", mix" if (row.get("allocation") or "").startswith("mix") else "") + ")"


def load(root: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
        split, _, family = folder.name.partition("-")
        for s in json.loads((folder / "summary.json").read_text()):
            if s["accuracy"] is None:
                continue
            row = {"split": split, "family": family, "method": s["method"], "guide": s["guide"], "allocation": s.get("allocation"),
                   "retention": s["retention"], "samples": s["samples"], "failed": s["failed"], "accuracy": s["accuracy"],
                   "accuracy_ci95": s["accuracy_ci95"], "by_kind": s.get("by_kind")}
            row["label"] = "full" if s["method"] == "full" else label(row)
            rows.append(row)
    return rows


def accuracy(row: dict, kind: str | None):
    if kind is None:
        return row["accuracy"], row["accuracy_ci95"]
    k = (row["by_kind"] or {}).get(kind)
    return (k["accuracy"], k["accuracy_ci95"]) if k else (None, None)


def goals(rows: list[dict], retention: float = 0.0625) -> dict:
    """(1) hard and majority splits: the best DyToK-guided new base vs DyToK + VisionZip (same guide);
    (2) needle questions: every query-agnostic configuration vs the best DyToK configuration."""
    at = [r for r in rows if r["retention"] == retention and r["method"] != "full"]
    out = {"retention": retention, "ahead_of_dytok_visionzip": [], "agnostic_behind_dytok_on_needles": []}
    for split, kind in (("hard32", None), ("v2test", "majority")):
        for family in sorted({r["family"] for r in at if r["split"] == split}):
            here = [r for r in at if (r["split"], r["family"]) == (split, family) and r["guide"] != "none"]
            for guide in ("self", "assistant"):
                reference = [r for r in here if r["guide"] == guide and r["method"] == "visionzip" and r["allocation"] is None]
                new = [r for r in here if r["guide"] == guide and r["method"] != "visionzip"]
                if not reference or not new:
                    continue
                best = max(new, key=lambda r: accuracy(r, kind)[0])
                out["ahead_of_dytok_visionzip"].append({
                    "split": split, "family": family, "kind": kind or "all", "guide": guide,
                    "dytok_visionzip": accuracy(reference[0], kind)[0], "best_new": best["label"], "best_new_accuracy": accuracy(best, kind)[0],
                    "ahead": accuracy(best, kind)[0] > accuracy(reference[0], kind)[0]})
    for split, kind in (("test16", None), ("scene16", None), ("hard32", None), ("v2test", "needle")):
        for family in sorted({r["family"] for r in at if r["split"] == split}):
            here = [r for r in at if (r["split"], r["family"]) == (split, family)]
            guided = [r for r in here if r["guide"] != "none"]
            if not guided:
                continue
            best = max(guided, key=lambda r: accuracy(r, kind)[0])
            agnostic = [r for r in here if r["guide"] == "none"]
            worst_gap = min(accuracy(best, kind)[0] - accuracy(r, kind)[0] for r in agnostic)
            out["agnostic_behind_dytok_on_needles"].append({
                "split": split, "family": family, "kind": kind or "all", "best_dytok": best["label"], "best_dytok_accuracy": accuracy(best, kind)[0],
                "best_agnostic_accuracy": max(accuracy(r, kind)[0] for r in agnostic), "all_behind": worst_gap > 0})
    return out


def table(rows: list[dict]) -> str:
    lines = []
    for split, family in sorted({(r["split"], r["family"]) for r in rows}):
        here = [r for r in rows if (r["split"], r["family"]) == (split, family)]
        retentions = sorted({r["retention"] for r in here if r["method"] != "full"})
        kinds = sorted({k for r in here for k in (r["by_kind"] or {})}) if split == "v2test" else [None]
        for kind in kinds:
            full = next(r for r in here if r["method"] == "full")
            n = here[0]["samples"] if kind is None else (full["by_kind"] or {})[kind]["samples"]
            title = f"{split}, {family}" + (f", {kind} questions" if kind else "") + f" ({n} questions; full: {100 * accuracy(full, kind)[0]:.1f}%)"
            lines += [f"### {title}", "", "| configuration | " + " | ".join(f"{100 * r:g}%" for r in retentions) + " |",
                      "|---|" + "---|" * len(retentions)]
            labels = list(dict.fromkeys(r["label"] for r in here if r["method"] != "full"))
            for name in labels:
                cells = []
                for retention in retentions:
                    row = next((r for r in here if r["label"] == name and r["retention"] == retention), None)
                    value, ci = accuracy(row, kind) if row else (None, None)
                    cells.append("-" if value is None else f"{100 * value:.1f} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for split, family in sorted({(r["split"], r["family"]) for r in rows}):
        for kind in (["needle", "majority"] if split == "v2test" else [None]):
            panels.append((split, family, kind))
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.6 * cols, 5.2 * -(-len(panels) // cols)), squeeze=False)
    retentions = sorted({r["retention"] for r in rows if r["method"] != "full"})
    for ax, (split, family, kind) in zip(axes.flat, panels):
        here = [r for r in rows if (r["split"], r["family"]) == (split, family)]
        labels = list(dict.fromkeys(r["label"] for r in here if r["method"] != "full"))
        full = next(r for r in here if r["method"] == "full")
        ax.axvline(100 * accuracy(full, kind)[0], color="black", linestyle=":", label="full")
        for i, retention in enumerate(retentions):
            for y, name in enumerate(labels):
                row = next((r for r in here if r["label"] == name and r["retention"] == retention), None)
                value, ci = accuracy(row, kind) if row else (None, None)
                if value is None:
                    continue
                yy = y + (i - 1) * 0.22
                ax.errorbar(100 * value, yy, xerr=[[100 * (value - ci[0])], [100 * (ci[1] - value)]], fmt="o", color=f"C{i}", ms=3.5,
                            elinewidth=0.8, label=f"{100 * retention:g}% kept" if y == 0 else None)
        ax.set_yticks(range(len(labels)), labels, fontsize=6.5)
        ax.invert_yaxis()
        ax.set_xlim(0, 102)
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(f"{split}, {family}" + (f": {kind}" if kind else "") + f" ({full['samples'] if kind is None else full['by_kind'][kind]['samples']} q.)",
                     fontsize=9)
        ax.set_xlabel("accuracy (%), 95% Wilson", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=len(names), bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(root: str) -> None:
    root = Path(root)
    rows = load(root)
    checked = goals(rows)
    (root / "bases.json").write_text(json.dumps({"rows": rows, "goals": checked}, indent=1) + "\n")
    (root / "bases.md").write_text(table(rows) + "\n")
    figure(rows, root / "bases.png")
    for row in checked["ahead_of_dytok_visionzip"]:
        print(f"{row['split']:>8} {row['family']:<14} {row['kind']:<9} {row['guide']:<9} DyToK+VisionZip {100 * row['dytok_visionzip']:5.1f}  "
              f"best new {row['best_new']} {100 * row['best_new_accuracy']:5.1f}  ahead: {row['ahead']}")
    for row in checked["agnostic_behind_dytok_on_needles"]:
        print(f"{row['split']:>8} {row['family']:<14} {row['kind']:<9} best DyToK {100 * row['best_dytok_accuracy']:5.1f}  "
              f"best query-agnostic {100 * row['best_agnostic_accuracy']:5.1f}  all behind: {row['all_behind']}")
    print(f"wrote {root / 'bases.json'}, {root / 'bases.md'}, {root / 'bases.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bases")
