"""Report stage: one comparison of every fitted head (markdown + JSON + CSV + PNG).

Each row says which weights the base had (``imagenet``, a file, or ``none``: random, flagged),
which data it saw (a numbered legend lists each data source once) and what tuned the head
(``evaluation.json`` ``tuning.method``). Heads that the DVC pipeline made (``cache/dvc/heads``)
are listed apart from heads fitted by hand (``cache/heads``). Head folders of the
older layout (everything in ``metrics.json``) are still read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import UsageError
from pipeline.core.safety import guard_user_file
from pipeline.core.util import atomic_write_text, write_json
from pipeline.reporting.plots import is_tlpipe_png, write_comparison_figure
from pipeline.store.features import head_status

log = logging.getLogger(__name__)

COLUMNS = ["features", "base", "head", "weights", "data", "data_index", "n_train", "val_accuracy",
           "test_accuracy", "val_log_loss", "val_roc_auc", "chance_val", "tuned_on", "fit_seconds",
           "extract_images_per_second", "pipeline", "status"]
OLD_TUNING = "val (older fit: C, k or epochs chosen on val, so val accuracy is optimistic)"


def _head_status(head_dir: Path) -> tuple[str, str, list[str], str]:
    """(status as ``features.head_status`` says, data source, weights per features file, the features'
    precisions other than f32: ``"bf16"``, or ``""``)."""
    status, _, found = head_status(head_dir)
    data = _data_label(found[0].get("data_source", ""), found[0].get("limit")) if found else ""
    low = sorted({str(a.get("precision")) for a in found} & {"bf16", "fp16"})
    return status, data, [str(a.get("weights", "")) for a in found], "/".join(low)


def _data_label(source: Any, limit: Any) -> str:
    text = str(source or "")
    if text and limit:
        text += f" (limit {limit})"
    return text


def weights_label(weights: Any) -> str:
    """``imagenet``, ``none`` or ``file:NAME`` per features file (``scratch``: a baseline), joined
    (duplicates once)."""
    if isinstance(weights, str):
        weights = [weights]
    out: list[str] = []
    for w in weights or []:
        w = str(w)
        if w and w not in ("imagenet", "none", "scratch") and not w.startswith("file:"):
            w = "file:" + Path(w).name
        if w and w not in out:
            out.append(w)
    return ", ".join(out)


def heads_folders(cache_dir: str | Path) -> list[tuple[Path, bool]]:
    """``(folder, made by the DVC pipeline?)`` for a cache: ``<cache>/heads`` (hand-run commands)
    and ``<cache>/dvc/heads`` (the pipeline's, see dvc.yaml), ``<cache>/finetuned`` (``tlpipe
    fine-tune``) and ``<cache>/baseline`` (``tlpipe baseline``), and their ``<cache>/dvc/``
    twins; a cache folder named ``dvc`` is the pipeline's own (the report stage runs with
    ``--cache-dir cache/dvc``)."""
    cache = Path(cache_dir)
    own = cache.resolve().name == "dvc"
    kinds = ("heads", "finetuned", "baseline")  # fine-tune: head e.g. dense+ft; baseline: scratch-cnn
    return [(cache / k, own) for k in kinds] + [(cache / "dvc" / k, True) for k in kinds]


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def head_row(head_dir: Path) -> dict[str, Any]:
    """One row from a head folder, new layout (metrics.json + evaluation.json) or old."""
    m = json.loads((head_dir / "metrics.json").read_text())
    e: dict[str, Any] = {}
    if (head_dir / "evaluation.json").is_file():
        try:
            e = json.loads((head_dir / "evaluation.json").read_text())
        except ValueError:
            log.warning("%s/evaluation.json is not JSON; reading metrics.json only", head_dir)
    new = "splits" in e
    name = head_dir.name
    status, attrs_data, attrs_weights, low_precision = _head_status(head_dir)
    if status == "unknown":  # an older layout: listed, not an error
        log.info("%s: listed with status 'unknown' (no model/head.json, an older head folder: whether its "
                 "features changed since cannot be checked)", name)
    elif status != "ok":
        log.warning("%s: %s (fitted on features that have changed or gone since); fit it again", name, status)
    head = e.get("head") or m.get("head") or name.rsplit("-", 1)[-1]
    if new:
        tuning = e.get("tuning") or {}
        tuned_on = str(tuning.get("method") or "")
        if tuning.get("param") and tuning.get("chosen") is not None:
            tuned_on += f" ({tuning['param']}={tuning['chosen']})"
        if tuning.get("val_used_for_tuning"):
            tuned_on += "; VAL USED FOR TUNING"
        data = _data_label(e.get("data_source"), e.get("limit")) or attrs_data
        weights = weights_label(e.get("weights")) or weights_label(attrs_weights)
        splits = e.get("splits") or {}
    else:
        tuned_on, data, weights, splits = OLD_TUNING, attrs_data, weights_label(attrs_weights), m
    if low_precision:  # bf16 features: told apart from the f32 head on the same data
        weights = f"{weights} ({low_precision} features)"
    return {
        "features": _features_name(name, head),
        "base": e.get("base") or m.get("base"),
        "head": head,
        "weights": weights,
        "data": data,
        "n_train": _get(splits, "train", "n"),
        "val_accuracy": _get(m, "val", "accuracy"),
        "test_accuracy": _get(m, "test", "accuracy"),
        "val_log_loss": _get(m, "val", "log_loss"),
        "val_roc_auc": _get(splits, "val", "roc_auc"),
        "chance_val": _get(e if new else m, "chance", "val"),
        "tuned_on": tuned_on,
        "fit_seconds": m.get("fit_seconds", e.get("fit_seconds")),
        "extract_images_per_second": e.get("extract_images_per_second", m.get("extract_images_per_second")),
        "status": status,
    }


def _features_name(folder: str, head: str) -> str:
    """``vgg16`` from ``vgg16-dense`` (head ``dense``, or ``dense+ft`` for a fine-tuned folder)."""
    for suffix in (head, head.split("+")[0]):
        if folder.endswith("-" + suffix):
            return folder[: -len(suffix) - 1]
    return folder


def collect(folders: Path | list[tuple[Path, bool]]) -> list[dict[str, Any]]:
    """One row per ``<folder>/*/metrics.json``, best validation accuracy first; ``folders`` is one
    heads folder or ``(folder, made by the pipeline?)`` pairs (``pipeline`` in each row). A folder of
    the pipeline's without ``model/head.json`` is an earlier experiment's leftover: skipped."""
    if isinstance(folders, (str, Path)):
        folders = [(Path(folders), False)]
    rows = []
    for heads_dir, made_by_pipeline in folders:
        for path in sorted(Path(heads_dir).glob("*/metrics.json")):
            if made_by_pipeline and not (path.parent / "model" / "head.json").is_file():
                log.info("%s: skipped (no model/: left by an earlier DVC experiment whose stage is gone)",
                         path.parent)
                continue
            try:
                row = head_row(path.parent)
            except (ValueError, OSError) as exc:
                log.warning("%s: unreadable (%s); left out of the report", path, exc)
                continue
            row["pipeline"] = made_by_pipeline
            rows.append(row)
    rows.sort(key=lambda r: (-(r["val_accuracy"] or 0), r["features"], r["head"]))
    sources: list[str] = []
    for r in rows:
        if r["data"] and r["data"] not in sources:
            sources.append(r["data"])
        r["data_index"] = sources.index(r["data"]) + 1 if r["data"] else None
    return rows


def label_models(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``model`` (features-head) so that no two rows share one: heads of the DVC
    pipeline get " (dvc)" when hand-run heads are listed too; any name still shared gets " (2)", ..."""
    mixed = any(r.get("pipeline") for r in rows) and not all(r.get("pipeline") for r in rows)
    seen: dict[str, int] = {}
    for r in rows:
        name = f"{r['features']}-{r['head']}" + (" (dvc)" if mixed and r.get("pipeline") else "")
        seen[name] = seen.get(name, 0) + 1
        r["model"] = name if seen[name] == 1 else f"{name} ({seen[name]})"


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.2f} %" if pct else f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def _is_random(row: dict[str, Any]) -> bool:
    return "none" in str(row.get("weights") or "").split(", ")


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| features | base | head | weights | data | val acc | test acc | val log loss | val ROC AUC | "
            "chance | tuned on | fit s | extract img/s | train n | status |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|\n")
    body = ""
    for r in rows:
        weights = r["weights"] or "?"
        if _is_random(r):
            weights = f"**{weights} (RANDOM)**"
        body += (f"| {r['features']} | {r['base']} | {r['head']} | {weights} | "
                 f"{'[' + str(r['data_index']) + ']' if r['data_index'] else '?'} | "
                 f"{_fmt(r['val_accuracy'], True)} | {_fmt(r['test_accuracy'], True)} | "
                 f"{_fmt(r['val_log_loss'])} | {_fmt(r['val_roc_auc'])} | {_fmt(r['chance_val'], True)} | "
                 f"{r['tuned_on'] or '?'} | {_fmt(r['fit_seconds'])} | {_fmt(r['extract_images_per_second'])} | "
                 f"{_fmt(r['n_train'])} | {r['status']} |\n")
    return head + body


def to_markdown(rows: list[dict[str, Any]], pipeline_known: bool = False) -> str:
    """The comparison as markdown: data legend, warnings, then the pipeline's heads and the others."""
    out = ["# tlpipe report\n",
           "Heads, best validation accuracy first. *tuned on* says what chose C, k or the epochs; "
           "val and test accuracies are honest only where it is not val.\n"]
    sources = sorted({(r["data_index"], r["data"]) for r in rows if r["data_index"]})
    if sources:
        out.append("Data:\n\n" + "".join(f"{i}. `{d}`\n" for i, d in sources))
    if len(sources) > 1:
        out.append("**Warning:** these heads were fitted on different data; compare accuracies only "
                   "between rows with the same data number.\n")
    random = [f"{r['features']}-{r['head']}" for r in rows if _is_random(r)]
    if random:
        out.append(f"**Random weights:** {', '.join(random)} ran on a base with random weights "
                   "(`--weights none`); their accuracies say nothing about the base with real weights.\n")
    if any(r.get("weights") == "scratch" for r in rows):
        out.append("**Baseline:** rows with weights *scratch* are `tlpipe baseline`'s small convnet trained from "
                   "random weights on the images (no base): what transfer learning is measured against.\n")
    stale = [f"{r['features']}-{r['head']}" for r in rows if r["status"] in ("stale", "features missing")]
    if stale:
        out.append(f"**Stale:** {', '.join(stale)} (features changed since the fit; run fit-head again).\n")
    if pipeline_known:
        made = [r for r in rows if r["pipeline"]]
        other = [r for r in rows if not r["pipeline"]]
        out.append("## Made by the DVC pipeline (dvc repro: cache/dvc/heads)\n")
        out.append(_table(made) if made else "None yet: run `dvc repro`.\n")
        if other:
            out.append("## Other heads (tlpipe fit-head by hand: cache/heads)\n")
            out.append(_table(other))
    else:
        out.append(_table(rows))
    return "\n".join(out)


@dataclass
class ReportConfig:
    """Where heads live and where the report goes."""

    cache_dir: Path = Path("cache")
    out_dir: Path | None = None  # the folder of report.md, report.json and plots/ (default: the cache)
    out_md: Path | None = None  # default <out_dir>/report.md
    out_json: Path | None = None  # default <out_dir>/report.json
    out_csv: Path | None = None  # default <out_dir>/plots/comparison.csv (the PNG goes beside it)
    force: bool = False  # replace outputs of these names that tlpipe report did not write

    def outputs(self) -> tuple[Path, Path, Path, Path]:
        """(report.md, report.json, comparison.csv, comparison.png) paths."""
        where = Path(self.out_dir or self.cache_dir)
        csv_path = Path(self.out_csv or where / "plots" / "comparison.csv")
        return (Path(self.out_md or where / "report.md"), Path(self.out_json or where / "report.json"),
                csv_path, csv_path.with_suffix(".png"))


def _is_report_json(path: Path) -> bool:
    return {"data_sources", "rows"} <= set(json.loads(path.read_text()))


def _is_comparison_csv(path: Path) -> bool:
    return path.read_text().startswith(",".join(["model"] + COLUMNS[:4]))


def guard_outputs(cfg: ReportConfig) -> None:
    """Refuse (one line, exit 2) before writing anything when any output path holds a file that tlpipe
    report did not write (the user's), unless ``cfg.force``."""
    md, js, csv_path, png = cfg.outputs()
    checks = ((md, "a report", lambda p: p.read_text().startswith("# tlpipe report\n")),
              (js, "a report", _is_report_json),
              (csv_path, "a report's comparison table", _is_comparison_csv),
              (png, "a report's comparison figure", is_tlpipe_png))
    for path, what, ours in checks:
        guard_user_file(path, what, ours, cfg.force, option="")


def report(cfg: ReportConfig) -> Path:
    """Write the comparison of every head under ``<cache>/heads`` (and the others ``heads_folders``
    lists); return the markdown path. Files of these names that tlpipe did not write are never replaced
    (unless ``cfg.force``)."""
    cache = Path(cfg.cache_dir)
    folders = heads_folders(cache)
    rows = collect(folders)
    if not rows:
        raise UsageError(f"no fitted heads under {cache / 'heads'} or {cache / 'dvc' / 'heads'}: "
                          "run 'tlpipe fit-head' or 'dvc repro' first")
    guard_outputs(cfg)
    md, js, out_csv, png = cfg.outputs()
    both = any(r["pipeline"] for r in rows) and not all(r["pipeline"] for r in rows)
    label_models(rows)  # the names in comparison.csv / .png: a DVC head and a hand-run one told apart
    atomic_write_text(md, to_markdown(rows, pipeline_known=both))
    sources = sorted({(r["data_index"], r["data"]) for r in rows if r["data_index"]})
    write_json(js, {"data_sources": {str(i): d for i, d in sources}, "rows": rows})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["model"] + COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    atomic_write_text(out_csv, text.getvalue())
    try:
        write_comparison_figure(rows, png)
    except ImportError as exc:  # matplotlib missing: the tables are still written
        log.warning("no comparison.png (%s)", exc)
    log.info("report of %d heads -> %s", len(rows), md)
    return md
