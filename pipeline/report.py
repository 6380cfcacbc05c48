"""Report stage: one comparison table of every fitted head (markdown + JSON + CSV for plots)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import TlpipeError
from pipeline.util import atomic_write_text, write_json

log = logging.getLogger(__name__)

COLUMNS = ["features", "base", "head", "val_accuracy", "test_accuracy", "val_log_loss", "val_roc_auc",
           "chance_val", "fit_seconds", "extract_images_per_second", "n_train"]


@dataclass
class ReportConfig:
    """Where heads live and where the report goes."""

    cache_dir: Path = Path("cache")
    out_md: Path | None = None  # default <cache>/report.md
    out_json: Path | None = None  # default <cache>/report.json
    out_csv: Path | None = None  # default <cache>/plots/comparison.csv


def collect(heads_dir: Path) -> list[dict[str, Any]]:
    """One row per ``<heads_dir>/*/metrics.json``, best validation accuracy first."""
    rows = []
    for path in sorted(Path(heads_dir).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        name = path.parent.name
        rows.append({
            "features": name[: -len(m["head"]) - 1] if name.endswith("-" + m["head"]) else name,
            "base": m.get("base"),
            "head": m.get("head"),
            "val_accuracy": m.get("val", {}).get("accuracy"),
            "test_accuracy": m.get("test", {}).get("accuracy"),
            "val_log_loss": m.get("val", {}).get("log_loss"),
            "val_roc_auc": m.get("val", {}).get("roc_auc"),
            "chance_val": m.get("chance", {}).get("val"),
            "fit_seconds": m.get("fit_seconds"),
            "extract_images_per_second": m.get("extract_images_per_second"),
            "n_train": m.get("train", {}).get("n"),
        })
    rows.sort(key=lambda r: (-(r["val_accuracy"] or 0), r["features"], r["head"]))
    return rows


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.2f} %" if pct else f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table."""
    head = ("| features | base | head | val acc | test acc | val log loss | val ROC AUC | chance | "
            "fit s | extract img/s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['features']} | {r['base']} | {r['head']} | {_fmt(r['val_accuracy'], True)} | "
        f"{_fmt(r['test_accuracy'], True)} | {_fmt(r['val_log_loss'])} | {_fmt(r['val_roc_auc'])} | "
        f"{_fmt(r['chance_val'], True)} | {_fmt(r['fit_seconds'])} | {_fmt(r['extract_images_per_second'])} |\n"
        for r in rows)
    return "# tlpipe report\n\nBases × heads, best validation accuracy first.\n\n" + head + body


def report(cfg: ReportConfig) -> Path:
    """Write the comparison of every head under ``<cache>/heads``; return the markdown path."""
    cache = Path(cfg.cache_dir)
    rows = collect(cache / "heads")
    if not rows:
        raise TlpipeError(f"no fitted heads under {cache / 'heads'}: run 'tlpipe fit-head' first")
    md = Path(cfg.out_md or cache / "report.md")
    atomic_write_text(md, to_markdown(rows))
    write_json(Path(cfg.out_json or cache / "report.json"), {"rows": rows})
    out_csv = Path(cfg.out_csv or cache / "plots" / "comparison.csv")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model"] + COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"model": f"{r['features']}-{r['head']}", **r})
    log.info("report of %d heads -> %s", len(rows), md)
    return md
