"""The depth-choice figure of a head on several depths: CV accuracy of each depth alone and of each
candidate set (``depths.csv`` for DVC, ``figures/depths.png``); depths of files at several input sizes
(``NAME@SIZE``) are rows of their own, a shade per size."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

DEPTH_COLUMNS = ["step", "depth", "set", "cv_accuracy", "kind"]


def write_depth_plot(head_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``depths.csv`` (header only without rows: a DVC output of every head) and, with rows,
    ``figures/depths.png`` into ``head_dir``; return the CSV path."""
    head_dir = Path(head_dir)
    path = head_dir / "depths.csv"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=DEPTH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    if rows:
        _figure(rows, head_dir / "figures" / "depths.png")
    return path


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    alone = [r for r in rows if r["kind"] == "alone"]
    steps = [r for r in rows if r["kind"] != "alone"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * (len(alone) + len(steps))), 3.6))
    labels = [str(r["depth"]) for r in alone] + [f"+{r['depth']}" for r in steps]
    values = [float(r["cv_accuracy"]) for r in alone + steps]
    sizes = list(dict.fromkeys(_size(r["depth"]) for r in alone))  # several input sizes: a shade of blue each
    shades = ["#8fb3d9", "#3f6fa8", "#b9d3ec", "#1f3f66"]
    colours = [shades[sizes.index(_size(r["depth"])) % len(shades)] for r in alone] + ["#d9822b"] * len(steps)
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=70, fontsize=7)
    low = min(values) if values else 0.0
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("CV accuracy on train")
    ax.set_title("each depth alone (blue" + (", a shade per input size" if len(sizes) > 1 else "")
                 + "), candidate sets (orange)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _size(depth: Any) -> str:
    """``"320"`` for a depth named ``NAME@320`` (files fused at several input sizes), else ``""``."""
    name, at, size = str(depth).rpartition("@")
    return size if at else ""
