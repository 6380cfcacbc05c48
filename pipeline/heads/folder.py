"""The head folder: the one writer (and the reader of ``model/head.json``) used by fit-head, fine-tune
and baseline.

Schema (see ``pipeline.stage2.fit_head``)::

    model/head.json   what was fitted, on what (the model files beside it are the caller's)
    metrics.json      val/test accuracy and log loss, fit seconds
    evaluation.json   everything else
    history.csv       one row per epoch (header only for grid heads)
    grid.csv          one row per grid value (header only for heads trained in epochs)
    predictions.csv   val/test predictions
    roc.csv           the val ROC curves: the binary curve, or one-vs-rest per class plus micro/macro
    curves.csv        long rows for DVC plots: per epoch (dense) or against C / k (the others)
    figures/          PNGs drawn from the files above

The files are written into a temporary folder (``temp_folder``) that the caller puts in place with
``publish`` once complete: files the user added to the previous folder (``notes.txt``,
``figures/mine.png``) are carried into the new one, never deleted.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.core.safety import replace_dir
from pipeline.core.util import write_json
from pipeline.heads.metrics import split_scores
from pipeline.heads.models import GRID_COLUMNS, HISTORY_COLUMNS
from pipeline.reporting import curves
from pipeline.reporting.plots import write_head_figures

log = logging.getLogger(__name__)

# what tlpipe writes in a head folder (any version), besides model/ and .checkpoint/
OWN_FILES = frozenset({"metrics.json", "evaluation.json", "history.csv", "grid.csv", "curves.csv", "depths.csv",
                       "predictions.csv", "roc.csv", "model.keras", "figures/curves.png", "figures/grid.png",
                       "figures/confusion.png", "figures/depths.png"})

PREDICTION_COLUMNS = ["split", "id", "actual", "predicted", "probability"]
ROC_COLUMNS = curves.ROC_COLUMNS

# per scored split other than train: (split, ids, labels, predicted classes, their probabilities)
PredictionPart = tuple[str, Any, np.ndarray, np.ndarray, np.ndarray]


def read_head_info(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the folder holding the head's model files, its head.json); ``UsageError`` if it is not a head."""
    folder = Path(folder)
    model_dir = folder / "model" if (folder / "model" / "head.json").is_file() else folder
    meta = model_dir / "head.json"
    if not meta.is_file():
        raise UsageError(f"{folder} is not a fitted head folder (no head.json); run 'tlpipe fit-head' first")
    return model_dir, json.loads(meta.read_text())


def temp_folder(out: Path) -> Path:
    """An empty ``.<name>.tmp`` beside ``out`` to write the new folder into."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> None:
    """``rows`` under a header of ``columns`` (keys outside ``columns`` are left out)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def score_splits(names: Iterable[str], proba_of: Callable[[str], np.ndarray], labels: dict[str, np.ndarray],
                 ids: dict[str, Any], classes: list[str]
                 ) -> tuple[dict[str, Any], list[PredictionPart], list[dict[str, float]]]:
    """Per split: evaluation.json's scores; for val/test what predictions.csv needs (not the
    probabilities: they can be large); the val ROC rows."""
    splits: dict[str, Any] = {}
    parts: list[PredictionPart] = []
    roc: list[dict[str, float]] = []
    for name in names:
        p, y = proba_of(name), labels[name]
        splits[name] = split_scores(p, y, classes)
        if name != "train":
            parts.append((name, ids[name], y, p.argmax(1), p.max(1)))
        if name == "val":
            roc = curves.roc_rows(y, p, classes)  # one-vs-rest per class beyond two
    return splits, parts, roc


def prediction_rows(parts: Iterable[PredictionPart], classes: list[str]) -> Iterator[dict[str, Any]]:
    """predictions.csv rows, made as they are written."""
    for name, ids, ys, preds, probs in parts:
        for i, a, p, pr in zip(ids, ys, preds, probs):
            yield {"split": name, "id": i, "actual": classes[a], "predicted": classes[p],
                   "probability": round(float(pr), 6)}


def metrics_record(splits: dict[str, Any], fit_seconds: float) -> dict[str, Any]:
    """metrics.json: only the compared figures."""
    out: dict[str, Any] = {s: {"accuracy": splits[s]["accuracy"], "log_loss": splits[s]["log_loss"]}
                           for s in ("val", "test") if s in splits}
    out["fit_seconds"] = round(fit_seconds, 3)
    return out


def write_head_folder(tmp: Path, *, head_json: dict[str, Any], metrics: dict[str, Any],
                      evaluation: dict[str, Any], history: Iterable[dict[str, Any]] = (),
                      grid: Iterable[dict[str, Any]] = (), predictions: Iterable[dict[str, Any]] = (),
                      roc: Iterable[dict[str, Any]] = ()) -> None:
    """Every file of the schema in ``tmp`` (the model files are the caller's); history.csv and grid.csv
    always exist (DVC outputs): the one that does not apply is header-only."""
    (tmp / "model").mkdir(parents=True, exist_ok=True)
    write_json(tmp / "model" / "head.json", head_json)
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "evaluation.json", evaluation)
    history, grid = list(history), list(grid)
    write_csv(tmp / "history.csv", history, HISTORY_COLUMNS)
    write_csv(tmp / "grid.csv", grid, GRID_COLUMNS)
    write_csv(tmp / "curves.csv", curves.curve_rows(history, grid), curves.CURVE_COLUMNS)  # DVC: epochs or C/k grid
    write_csv(tmp / "predictions.csv", predictions, PREDICTION_COLUMNS)
    write_csv(tmp / "roc.csv", roc, ROC_COLUMNS)
    write_head_figures(tmp)  # figures/: curves or C/k grid, confusion matrices (PNG)


def user_files(old: Path) -> list[Path]:
    """The files (relative paths) in the head folder ``old`` that tlpipe did not write: anything outside
    ``model/``, ``.checkpoint/`` (fine-tune's, baseline's) and ``OWN_FILES``."""
    found = []
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        ours = rel.parts[0] == "model" or rel.parts[0].startswith(".checkpoint")
        if ours or (path.is_dir() and not path.is_symlink()):
            continue
        if rel.as_posix() not in OWN_FILES:
            found.append(rel)
    return found


def publish(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out``, carrying over the files the user added to the
    previous ``out`` (linked or copied first: a failure leaves the previous folder whole), with one log line."""
    kept = []
    for rel in user_files(out) if out.is_dir() else []:
        target = tmp / rel
        if target.exists() or target.is_symlink():  # a name tlpipe writes now (an older tlpipe's file)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(out / rel, target, follow_symlinks=False)  # a second name: instant, even for a big file
        except OSError:
            shutil.copy2(out / rel, target, follow_symlinks=False)
        kept.append(rel.as_posix())
    if kept:
        names = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        log.info("kept %d file(s) you added to %s: %s", len(kept), out, names)
    replace_dir(tmp, out)
