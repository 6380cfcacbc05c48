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

COLUMNS = ["features", "base", "head", "data", "n_train", "val_accuracy", "test_accuracy", "val_log_loss",
           "val_roc_auc", "chance_val", "fit_seconds", "extract_images_per_second", "status"]


def _head_status(head_dir: Path) -> tuple[str, str]:
    """("ok" | "stale" | "features missing", data source) by comparing the fingerprints recorded
    at fit time with the features files as they are now."""
    from pipeline.features import read_attrs

    meta_path = head_dir / "model" / "head.json"
    if not meta_path.is_file():
        return "unknown", ""
    meta = json.loads(meta_path.read_text())
    status, data = "ok", ""
    for path, fingerprint in zip(meta.get("features", []), meta.get("fingerprints", [])):
        try:
            attrs = read_attrs(path)
        except Exception:  # noqa: BLE001 - a missing or unreadable file
            return "features missing", data
        data = data or str(attrs.get("data_source", ""))
        if attrs.get("limit"):
            data += f" (limit {attrs['limit']})"
        if attrs.get("fingerprint") != fingerprint:
            status = "stale"
    return status, data


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
        ev_path = path.parent / "evaluation.json"  # provenance and per-split details live there
        ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
        m = {**ev, **ev.get("splits", {}), **m}
        m["val"] = {**ev.get("splits", {}).get("val", {}), **m.get("val", {})}
        m["test"] = {**ev.get("splits", {}).get("test", {}), **m.get("test", {})}
        name = path.parent.name
        status, data = _head_status(path.parent)
        if status != "ok":
            log.warning("%s: %s (fitted on features that have changed or gone since); fit it again", name, status)
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
            "data": data,
            "status": status,
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
            "fit s | extract img/s | train n | status |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    body = "".join(
        f"| {r['features']} | {r['base']} | {r['head']} | {_fmt(r['val_accuracy'], True)} | "
        f"{_fmt(r['test_accuracy'], True)} | {_fmt(r['val_log_loss'])} | {_fmt(r['val_roc_auc'])} | "
        f"{_fmt(r['chance_val'], True)} | {_fmt(r['fit_seconds'])} | {_fmt(r['extract_images_per_second'])} | "
        f"{_fmt(r['n_train'])} | {r['status']} |\n"
        for r in rows)
    sources = sorted({r["data"] for r in rows if r["data"]})
    note = ("Data: " + "; ".join(f"`{d}`" for d in sources) + ".\n\n") if sources else ""
    if len(sources) > 1:
        note += "**Warning:** these heads were fitted on different data; their accuracies are not comparable.\n\n"
    stale = [f"{r['features']}-{r['head']}" for r in rows if r["status"] != "ok"]
    if stale:
        note += f"**Stale:** {', '.join(stale)} (features changed since the fit; run fit-head again).\n\n"
    return "# tlpipe report\n\nBases × heads, best validation accuracy first.\n\n" + note + head + body


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
