"""Stage two: fit a head on cached features and evaluate it on every split.

Hyper-parameters are chosen inside train only (see ``pipeline.heads.models``); val and test are
scored, never used for tuning.  Writes ``cache/heads/<features>-<head>/``:
  model/                     the fitted head: head.joblib | head.keras, and head.json (what, on what)
  metrics.json               only the compared figures: val/test accuracy and log loss, fit seconds
  evaluation.json            everything else: provenance (features, weights, data, limit), tuning
                             (what chose which value, on which rows), per-split metrics with confusion
                             matrices and per-class scores, chance and untrained-head baselines
  history.csv                dense: one row per epoch (train, tune slice, val); header only otherwise
  grid.csv                   grid heads: one row per C or k (CV and in-fold train scores); header
                             only for dense
  predictions.csv            val/test predictions (for DVC confusion-matrix plots)
  roc.csv                    ROC curves of the validation split: the binary curve, or one-vs-rest per
                             class plus micro/macro averages (pipeline.reporting.curves)
  curves.csv                 long rows for DVC plots: per epoch (dense) or against C / k (the others)
  depths.csv                 CV accuracy on train of each stored depth alone and of the chosen set
                             (auto head on several depths; header only otherwise)
  figures/                   PNGs: training curves or the C/k grid, confusion matrices, depths

Files with several pooled depths or stored views: see ``pipeline.stage2.depths``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core.errors import FeaturesFileError, UsageError
from pipeline.core.safety import guard_head_folder
from pipeline.core.util import require_tensorboard
from pipeline.heads import folder
from pipeline.heads.metrics import chance, evaluate
from pipeline.heads.auto import compact_depths, get_any_head
from pipeline.heads.models import Head, HeadParams
from pipeline.reporting.depth_plot import write_depth_plot
from pipeline.heads.stream import Rows, chunks_of, decide, open_streamed, stream_head, stream_params
from pipeline.stage2 import depths
from pipeline.store.features import (FeatureSet, check_attrs, fuse, load_features, read_attrs, resolve_features_path,
                                     warn_if_stale)

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Everything ``fit_head`` needs."""

    features: list[str | Path]  # one file, or several to fuse (rows matched by id)
    head: str = "logistic"
    out: Path | None = None  # default: <cache_dir>/heads/<features>-<head>
    cache_dir: Path = Path("cache")
    params: HeadParams = field(default_factory=HeadParams)
    force: bool = False  # replace a head folder fitted from other features or parameters
    allow_mixed_precision: bool = False  # fuse features computed in different precisions (f32 + bf16)
    stream: bool | None = None  # read the features from disk in chunks (None: when above max_memory)
    max_memory: int | None = None  # bytes an in-memory fit may use (None: pipeline.heads.stream.MEMORY_FRACTION of RAM)
    chunk_rows: int = 0  # streamed: rows per chunk (0: about pipeline.heads.stream.CHUNK_BYTES of features)
    tensorboard: Path | None = None  # dense: TensorBoard logs here (other heads do not train in epochs)
    progress: bool = True  # grid heads: a progress bar (fit i/n, fold, ETA) over the CV fits on stderr
    layers: str = "all"  # stored depths the head may use: all (auto: CV chooses among them) | NAME,NAME

    def output_dir(self, fs: FeatureSet) -> Path:
        if self.out:
            return Path(self.out)
        return Path(self.cache_dir) / "heads" / f"{fs.name}-{self.head}"


def load_feature_sets(names: list[str | Path], cache_dir: str | Path, allow_mixed_precision: bool = False) -> FeatureSet:
    """Resolve, validate and (when several) fuse feature files."""
    if not names:
        raise UsageError("give at least one --features FILE")
    sets = [load_features(resolve_features_path(n, cache_dir)) for n in names]
    return fuse(sets, allow_mixed_precision=allow_mixed_precision)


def untrained_baseline(X_train: np.ndarray, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> dict:
    """The tutorials' "initial accuracy": a randomly initialised linear head, before training.
    ``X_train`` and ``X``: arrays, or ``pipeline.heads.stream.Rows`` (statistics and scores by chunks)."""
    rng = np.random.default_rng(seed)
    if isinstance(X_train, Rows):
        mu, var = X_train.moments()
        sd = np.sqrt(var) + 1e-6
    else:
        mu, sd = X_train.mean(0), X_train.std(0) + 1e-6
    limit = np.sqrt(6.0 / (X.shape[1] + n_classes))  # Glorot uniform, as Keras initialises Dense
    W = rng.uniform(-limit, limit, size=(X.shape[1], n_classes))
    parts = []
    for chunk in chunks_of(X):
        for s in range(0, len(chunk), 1024):  # float64 temporaries of 1,024 rows, not of a whole chunk
            logits = ((chunk[s:s + 1024] - mu) / sd) @ W
            logits -= logits.max(1, keepdims=True)
            proba = np.exp(logits)
            parts.append(proba / proba.sum(1, keepdims=True))
    return evaluate(np.concatenate(parts) if parts else np.zeros((0, n_classes)), y, n_classes)


def _check(cfg: FitConfig) -> tuple[type[Head], FitConfig]:
    """The head class and ``cfg`` with its canonical (lower-case) name; bad settings -> ``UsageError``."""
    head_cls = get_any_head(cfg.head)
    cfg = replace(cfg, head=head_cls.name)  # canonical (lower-case) name for folders and reports
    if cfg.tensorboard and head_cls.name != "dense":
        log.warning("--tensorboard ignored: the %s head does not train in epochs (only dense does)", head_cls.name)
    elif cfg.tensorboard:
        require_tensorboard()
    if not cfg.features:
        raise UsageError("give at least one --features FILE")
    return head_cls, cfg


def _open(cfg: FitConfig, head_cls: type[Head]) -> tuple[FeatureSet, type[Head], FitConfig, dict[str, Any]]:
    """The features, in memory or streamed from disk (decided from their shapes; nothing read first)."""
    paths = [resolve_features_path(n, cfg.cache_dir) for n in cfg.features]
    for path in paths:
        check_attrs(path)  # a file of the wrong kind (.keras, an image, not tlpipe's): one line, exit 2
    streamed, memory = decide(paths, cfg.stream, cfg.max_memory, head_cls.name)
    if streamed:  # features stay on disk, read in chunks (pipeline.heads.stream)
        head_cls = stream_head(head_cls.name)
        fs = open_streamed(paths, cfg.chunk_rows)
        memory["chunk_rows"] = fs.splits["train"].X.chunk_rows
        cfg = replace(cfg, params=stream_params(cfg.params, memory["chunk_rows"]))
    else:
        fs = load_feature_sets(list(cfg.features), cfg.cache_dir, cfg.allow_mixed_precision)
    warn_if_stale(fs.paths)
    if len(np.unique(fs.splits["train"].y)) < 2:
        raise FeaturesFileError(f"the train split of {fs.name} has a single class; need at least two")
    return fs, head_cls, cfg, memory


def _evaluation(cfg: FitConfig, fs: FeatureSet, head: Head, splits: dict, fit_seconds: float,
                memory: dict, depth: dict[str, Any] | None = None) -> dict[str, Any]:
    """evaluation.json: provenance, tuning, per-split scores, chance and the untrained head."""
    train, k = fs.splits["train"], len(fs.class_names)
    attrs = [read_attrs(p) for p in fs.paths]
    return {
        "base": fs.base,
        "head": head.name,
        "features": _absolute(fs),
        "weights": [str(a.get("weights", "")) for a in attrs],
        "data_source": str(fs.attrs.get("data_source", "")),
        "limit": int(fs.attrs.get("limit") or 0),
        "classes": fs.class_names,
        "feature_size": int(train.X.shape[1]),
        "fit_seconds": round(fit_seconds, 3),
        "extract_images_per_second": fs.attrs.get("images_per_second"),
        "tuning": {**head.tuning, "val_used_for_tuning": False},
        "memory": memory,  # streamed from disk or in memory, and why
        **({"depths": depth} if depth else {}),  # several depths or views: which were used and how chosen
        "splits": splits,
        "chance": chance({name: s.y for name, s in fs.splits.items()}, k),
        "untrained": {name: untrained_baseline(train.X, s.X, s.y, k, cfg.params.seed)
                      for name, s in fs.splits.items() if name != "train"},
    }


def _write(tmp: Path, cfg: FitConfig, fs: FeatureSet, head: Head, rows: list, scored: tuple,
           evaluation: dict) -> dict[str, Any]:
    """The head folder in ``tmp``; return metrics.json's content."""
    splits, parts, roc = scored
    metrics = folder.metrics_record(splits, evaluation["fit_seconds"])
    (tmp / "model").mkdir()
    head.save(tmp / "model")
    head_json = {"head": head.name, "description": head.description, "classes": fs.class_names, "base": fs.base,
                 "features": _absolute(fs), "feature_size": int(fs.splits["train"].X.shape[1]),
                 "fingerprints": _fingerprints(fs), "params": asdict(cfg.params),
                 "chosen": head.chosen, "tuning": evaluation["tuning"], "tlpipe_version": __version__,
                 **({"layers": cfg.layers} if _layers_asked(cfg) else {})}
    dense = head.name == "dense"
    folder.write_head_folder(tmp, head_json=head_json, metrics=metrics, evaluation=evaluation,
                             history=rows if dense else [], grid=[] if dense else rows,
                             predictions=folder.prediction_rows(parts, fs.class_names), roc=roc)
    write_depth_plot(tmp, getattr(head, "depth_rows", []))  # depths.csv (header only: no depth choice) + PNG
    return metrics


def _layers_asked(cfg: FitConfig) -> bool:
    return str(cfg.layers or "all").strip().lower() not in ("all", "")


def fit_head(cfg: FitConfig) -> Path:
    """Fit ``cfg.head`` on the cached features; write the head folder and return it."""
    head_cls, cfg = _check(cfg)
    fs, head_cls, cfg, memory = _open(cfg, head_cls)
    depth_info, views = depths.prepare_depths(fs, head_cls, cfg.layers, bool(memory.get("streamed")))
    out = cfg.output_dir(fs)
    guard_head_folder(out, {"head": head_cls.name, "features": _absolute(fs), "fingerprints": _fingerprints(fs),
                            "params": asdict(cfg.params), **({"layers": cfg.layers} if _layers_asked(cfg) else {})},
                      cfg.force)
    tmp = folder.temp_folder(out)
    try:  # a failure or Ctrl-C leaves no half-made folder beside the output
        head = head_cls(len(fs.class_names), cfg.params)
        head.progress = cfg.progress
        if cfg.tensorboard and head.name == "dense":
            head.tensorboard = Path(cfg.tensorboard)
        t0 = time.perf_counter()
        rows = depths.fit(head, fs, views, cfg.layers)  # val: scored per epoch by dense, chooses nothing
        fit_seconds = time.perf_counter() - t0
        loo = hasattr(head, "train_proba") and not views  # knn: train scored leave-one-out

        def proba_of(name: str) -> np.ndarray:
            if loo and name == "train":
                return head.train_proba(fs.splits["train"].X, fs.splits["train"].y)
            return depths.predict(head, fs, views, name)

        scored = folder.score_splits(fs.splits, proba_of, {n: s.y for n, s in fs.splits.items()},
                                     {n: s.ids for n, s in fs.splits.items()}, fs.class_names)
        evaluation = _evaluation(cfg, fs, head, scored[0], fit_seconds, memory, depths.record(depth_info, head, views))
        evaluation["train_scoring"] = ("leave-one-out: each training row's neighbours are the other rows" if loo
                                       else "in-sample: the fitted head on its own training rows")
        metrics = _write(tmp, cfg, fs, head, rows, scored, evaluation)
        folder.publish(tmp, out)  # the previous folder goes only once the new one is complete (keeping your files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split in fs.splits.values():
        if hasattr(split.X, "close"):  # streamed: the open HDF5 handles
            split.X.close()
    log.info("%s head on %s: val accuracy %.4f, fit %.2f s -> %s", head.name, fs.name,
             metrics["val"]["accuracy"], fit_seconds, out)
    return out


def _absolute(fs: FeatureSet) -> list[str]:
    """The features files as absolute paths (what head folders record: readable from any folder)."""
    return [os.path.abspath(p) for p in fs.paths]


def _fingerprints(fs: FeatureSet) -> list[str]:
    return [str(read_attrs(p).get("fingerprint", "")) for p in fs.paths]


def _depth_lines(d: dict[str, Any]) -> list[str]:
    """The depths a head used and why; the views it trained and predicted with."""
    out = []
    if d.get("depths"):
        out.append(f"  depths {compact_depths(d['depths'], d.get('stored') or [])} ({d.get('how', '')})")
    if d.get("stored_input_sizes"):
        out.append(f"  input sizes {', '.join(map(str, d.get('input_sizes') or []))} px chosen among "
                   f"{', '.join(map(str, d['stored_input_sizes']))} (with the depths, by the same CV on train)")
    if "test_time_mirror" in d:
        out.append(f"  views: trained on {d.get('train_views', 0)} per photo; "
                   f"test-time mirror {'on' if d['test_time_mirror'] else 'off'}")
    return out


def summary(out: Path) -> str:
    """A few lines for the terminal: fit, what tuned what, and each split's scores."""
    out = Path(out)
    m = json.loads((out / "metrics.json").read_text())
    ev = json.loads((out / "evaluation.json").read_text())
    lines = [f"{ev['head']} head on {ev['base']} ({ev['feature_size']} features), fit in {m['fit_seconds']:.2f} s"]
    t = ev.get("tuning") or {}
    if t.get("chosen") is not None:
        cv = (f" (accuracy {t['cv_accuracy']:.4f}, log loss {t['cv_log_loss']:.4f})"
              if t.get("cv_accuracy") is not None and t.get("cv_log_loss") is not None else "")
        what = f"best epoch {t['chosen']} of {t.get('epochs_run', '?')}" if t.get("param") == "epochs" \
            else f"{t['param']}={t['chosen']}"
        how = t["method"].replace("early stopping on", "chosen by early stopping on") if t.get("param") == "epochs" \
            else f"chosen by {t['method']}"
        lines.append(f"  {what} {how}{cv}; val and test not used for tuning")
    lines.extend(_depth_lines(ev.get("depths") or {}))
    for split in ("train", "val", "test"):
        s = ev["splits"].get(split)
        if s:
            auc = f"  roc_auc {s['roc_auc']:.4f}" if "roc_auc" in s else ""
            lines.append(f"  {split:5s} n={s['n']:<6d} accuracy {s['accuracy']:.4f}  log_loss {s['log_loss']:.4f}{auc}")
    lines.append(f"  chance (val) {ev['chance'].get('val', float('nan')):.4f}   "
                 f"untrained head (val) {ev['untrained'].get('val', {}).get('accuracy', float('nan')):.4f}")
    lines.append(f"  -> {out}")
    return "\n".join(lines)
