"""Validation accuracy against the number of training images, from cached features.

For each size n (capped at the train split's size) and each seed, a stratified subsample
of n training rows is drawn (every class kept when n allows), the head is fitted on it
exactly as ``fit-head`` does (hyper-parameters chosen inside that sample: cross-validation for
C and k, an internal slice for the dense head's epochs), and its validation accuracy is
recorded; the validation split only scores.  Seeds draw the subsamples only (the head's own
seed is fit-head's default), so the whole train split is fitted once, not once per seed.  Writes
``<out>.csv`` (one row per size and seed: n_train, seed, val_accuracy, val_log_loss,
train_accuracy, fit_seconds; ``dvc plots show <out>.csv --template .dvc/plots/learning_curve.json``
draws it), ``<out>.json`` (mean / std / min / max per size) and ``<out>.png`` (the figure).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.core.util import write_json

log = logging.getLogger(__name__)

COLUMNS = ["n_train", "seed", "val_accuracy", "val_log_loss", "train_accuracy", "fit_seconds"]


@dataclass
class CurveConfig:
    """Everything ``learning_curve`` needs."""

    features: list[str | Path]
    head: str = "logistic"
    sizes: str = "50,100,500,1000,all"
    seeds: int = 3
    out: Path | None = None  # a .csv path; default <cache>/learning_curves/<features>-<head>.csv
    cache_dir: Path = Path("cache")
    force: bool = False  # replace an --out CSV / JSON that tlpipe learning-curve did not write


def parse_sizes(spec: str, n_train: int) -> list[int]:
    """``"50,100,all"`` -> sorted unique sizes, each capped at ``n_train``."""
    sizes = set()
    for part in str(spec).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            sizes.add(n_train)
            continue
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"--sizes: '{part}' is not a number or 'all' (e.g. 50,100,500,all)") from None
        if n < 2:
            raise UsageError(f"--sizes: {n} is too small (at least 2 training images)")
        sizes.add(min(n, n_train))
    if not sizes:
        raise UsageError("--sizes is empty (e.g. 50,100,500,all)")
    return sorted(sizes)


def subsample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a stratified sample of ``n`` rows (all rows when n >= len(y)).

    Each class gets its proportional share (largest remainders), and at least one row
    while n allows it, so the head always sees every class that it can.
    """
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    share = counts / counts.sum() * n
    take = np.floor(share).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > n:  # the minimum of one overshot: trim the largest
        take[np.argmax(take)] -= 1
    rest = n - take.sum()
    order = np.argsort(-(share - np.floor(share)))
    for i in order[:rest]:
        take[i] += 1
    take = np.minimum(take, counts)
    idx = [rng.choice(np.flatnonzero(y == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(idx))


def learning_curve(cfg: CurveConfig) -> Path:
    """Run the curve; write CSV + JSON summary + PNG figure; return the CSV path."""
    from pipeline.stage2.fit_head import load_feature_sets
    from pipeline.heads.models import get_head

    head_cls = get_head(cfg.head)
    if cfg.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    fs = load_feature_sets(list(cfg.features), cfg.cache_dir)
    train, val = fs.splits["train"], fs.splits["val"]
    sizes = parse_sizes(cfg.sizes, len(train.y))
    out = _output_path(cfg, f"{fs.name}-{head_cls.name}")
    rows: list[dict[str, Any]] = []
    for n in sizes:
        # the whole train split is the same sample for every seed (the head's own seed is fixed): fit once
        for seed in range(1 if n >= len(train.y) else cfg.seeds):
            row = _fit_one(head_cls, train, val, len(fs.class_names), n, seed)
            if row is not None:
                rows.append(row)
    summary = []
    for n in sizes:
        acc = np.array([r["val_accuracy"] for r in rows if r["n_train"] == n])
        if len(acc):
            summary.append({"n_train": n, "runs": int(len(acc)), "mean": float(acc.mean()),
                            "std": float(acc.std()), "min": float(acc.min()), "max": float(acc.max()),
                            "whole_train": bool(n >= len(train.y))})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    write_json(out.with_suffix(".json"), {
        "features": [str(p) for p in fs.paths], "base": fs.base, "head": head_cls.name,
        "classes": fs.class_names, "train_size": int(len(train.y)), "val_size": int(len(val.y)),
        "seeds": cfg.seeds, "sizes": summary, "note": NOTE})
    from pipeline.reporting.plots import learning_curve_figure

    learning_curve_figure(summary, rows, out.with_suffix(".png"),
                          f"{head_cls.name} head on {fs.base}: val accuracy against training images")
    return out


NOTE = ("hyper-parameters (C, k, best epoch) are chosen inside each training sample, as in fit-head; "
        "the validation split is never used for tuning. Seeds draw the stratified subsamples; the head's own "
        "seed (CV folds, dense initialisation) is fit-head's default, 0, so the whole train split is one "
        "sample whatever the seed and is fitted once.")


def _output_path(cfg: CurveConfig, name: str) -> Path:
    """The CSV path (``--out`` a .csv file or a folder; default ``<cache>/learning_curves/NAME.csv``),
    checked: never replaces a CSV, JSON or PNG that learning-curve did not write, unless --force."""
    from pipeline.core.safety import guard_user_file

    out = Path(cfg.out) if cfg.out else Path(cfg.cache_dir) / "learning_curves" / f"{name}.csv"
    if out.suffix != ".csv":
        if out.suffix and not out.is_dir():
            raise UsageError(f"--out {out}: give a .csv path (the JSON summary goes beside it) or a folder")
        out = out / f"{name}.csv"

    def ours(path: Path) -> bool:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n") == ",".join(COLUMNS)

    guard_user_file(out, "a learning curve", ours, cfg.force)
    summary = out.with_suffix(".json")
    guard_user_file(summary, "a learning-curve summary",
                    lambda p: {"features", "base", "head", "train_size"} <= set(json.loads(p.read_text())), cfg.force)
    guard_user_file(out.with_suffix(".png"), "a learning-curve figure", lambda p: summary.is_file(), cfg.force)
    return out


def _fit_one(head_cls, train, val, k: int, n: int, seed: int) -> dict[str, Any] | None:
    """Fit the head on a stratified sample of ``n`` training rows (drawn by ``seed``); score on val."""
    from sklearn.metrics import log_loss

    from pipeline.heads.models import HeadParams

    idx = subsample(train.y, n, seed)
    Xs, ys = train.X[idx], train.y[idx]
    if len(np.unique(ys)) < 2:
        log.warning("n=%d seed=%d: a single class in the sample; skipped", n, seed)
        return None
    head = head_cls(k, HeadParams())  # the head's own seed fixed: only the sample varies with the seed
    t0 = time.perf_counter()
    head.fit((Xs, ys))  # tuned inside the sample; val only scores below
    seconds = time.perf_counter() - t0
    pv = head.predict_proba(val.X)
    pt = head.predict_proba(Xs)
    row = {"n_train": int(n), "seed": seed, "val_accuracy": float((pv.argmax(1) == val.y).mean()),
           "val_log_loss": float(log_loss(val.y, np.clip(pv, 1e-15, 1), labels=np.arange(k))),
           "train_accuracy": float((pt.argmax(1) == ys).mean()), "fit_seconds": round(seconds, 3)}
    log.info("n=%d seed=%d val accuracy %.4f", n, seed, row["val_accuracy"])
    return row


def format_summary(csv_path: Path) -> str:
    """The JSON summary as a table."""
    import json

    s = json.loads(Path(csv_path).with_suffix(".json").read_text())
    lines = [f"{s['head']} head on {s['base']} features (train {s['train_size']}, val {s['val_size']}, "
             f"{s['seeds']} seeds)", f"{'n_train':>8s} {'runs':>4s} {'mean':>7s} {'std':>7s} {'min':>7s} {'max':>7s}"]
    for r in s["sizes"]:
        whole = "  (all of train: one fit, the same sample for every seed)" if r.get("whole_train") else ""
        lines.append(f"{r['n_train']:8d} {r['runs']:4d} {r['mean']:7.4f} {r['std']:7.4f} {r['min']:7.4f} "
                     f"{r['max']:7.4f}{whole}")
    png = Path(csv_path).with_suffix(".png")
    lines.append(f"-> {csv_path}, {Path(csv_path).with_suffix('.json')}" + (f" and {png}" if png.is_file() else ""))
    return "\n".join(lines)
