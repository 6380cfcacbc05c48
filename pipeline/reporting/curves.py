"""Rows of the CSVs that DVC plots draw: ROC curves (any number of classes) and one curves file per
head folder that holds what the head has (epochs for dense, the C or k grid for the others).

``roc_rows(y, proba, classes)``: the binary ROC curve (positive class: the second), or one-vs-rest
curves per class plus their micro- and macro-average for more than two classes (``ROC_COLUMNS``;
``.dvc/plots/roc.json`` draws one line per ``class``).
``curve_rows(history, grid)``: long rows (``CURVE_COLUMNS``: panel, x, series, value) that
``.dvc/plots/head_curves.json`` facets by ``panel``: a head without epochs gets its CV grid panels
and no empty training-curve panel.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

ROC_COLUMNS = ["split", "class", "fpr", "tpr", "threshold"]
CURVE_COLUMNS = ["panel", "x", "series", "value"]
MICRO, MACRO = "micro-average", "macro-average"


def _curve(split: str, name: str, fpr, tpr, thr=None) -> list[dict[str, Any]]:
    thr = [None] * len(fpr) if thr is None else [float(min(t, 1.0)) for t in thr]
    return [{"split": split, "class": name, "fpr": float(a), "tpr": float(b), "threshold": "" if t is None else t}
            for a, b, t in zip(fpr, tpr, thr)]


def roc_rows(y: np.ndarray, proba: np.ndarray, classes: list[str], split: str = "val") -> list[dict[str, Any]]:
    """ROC rows of ``proba`` against labels ``y``; none when fewer than two classes are present."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y)
    k = len(classes)
    if len(np.unique(y)) < 2 or proba.shape[0] == 0:
        return []
    if k == 2:
        fpr, tpr, thr = roc_curve(y, proba[:, 1])
        return _curve(split, str(classes[1]), fpr, tpr, thr)
    rows: list[dict[str, Any]] = []
    curves = []
    for i, name in enumerate(classes):
        positive = (y == i).astype(int)
        if 0 < positive.sum() < len(y):  # a class absent from the split has no curve
            fpr, tpr, thr = roc_curve(positive, proba[:, i])
            curves.append((fpr, tpr))
            rows += _curve(split, str(name), fpr, tpr, thr)
    onehot = np.eye(k, dtype=int)[y]
    fpr, tpr, _ = roc_curve(onehot.ravel(), proba.ravel())
    rows += _curve(split, MICRO, fpr, tpr)
    if curves:
        grid = np.unique(np.concatenate([c[0] for c in curves]))
        mean = np.mean([np.interp(grid, f, t) for f, t in curves], axis=0)
        rows += _curve(split, MACRO, grid, mean)
    return rows


def curve_rows(history: Iterable[dict[str, Any]], grid: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long rows for the head-curves plot: per epoch (accuracy and loss of train / tune / val), or
    against the grid parameter (cross-validated and train accuracy and log loss; C on a log10 axis)."""
    rows: list[dict[str, Any]] = []
    for r in history:
        for metric in ("accuracy", "loss"):
            for split in ("train", "tune", "val"):
                v = _number(r.get(f"{split}_{metric}"))
                if v is not None:
                    rows.append({"panel": f"{metric} per epoch", "x": int(r["epoch"]), "series": split, "value": v})
    for r in grid:
        param = str(r.get("param") or "value")
        x = _number(r.get("value"))
        if x is None:
            continue
        log_x = param.lower() == "c" and x > 0
        where = f"against log10 {param}" if log_x else f"against {param}"
        for metric, cols in (("accuracy", ("cv_accuracy", "train_accuracy")), ("log loss", ("cv_log_loss", "train_loss"))):
            for col, series in zip(cols, ("cross-validated on train", "train (fit on all of train)")):
                v = _number(r.get(col))
                if v is not None:
                    rows.append({"panel": f"{metric} {where}", "x": round(math.log10(x), 6) if log_x else x,
                                 "series": series, "value": v})
    return rows


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
