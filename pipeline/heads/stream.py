"""Heads on features larger than memory: ``tlpipe fit-head --stream`` (automatic above ``--max-memory``).

The features stay in the HDF5 file (plain or virtual datasets) and are read one chunk of
contiguous rows at a time (``Rows.read``, the only place that reads features):

- standardisation statistics: per-feature mean and variance, ``StandardScaler.partial_fit`` over
  the chunks (the logistic head's scaler; the dense head's ``Normalization`` state);
- logistic: the in-memory head's model and objective (scikit-learn's ``LogisticRegression``,
  lbfgs: multinomial, L2 with ``C``) minimised by ``scipy.optimize.minimize(method="L-BFGS-B")``,
  each function + gradient evaluation one pass over the chunks (float64 sums).  ``C`` comes from
  the in-memory head's grid, chosen by log loss on a held-out stratified 10 % slice of train, then
  refitted on all of train.  Saved as the in-memory head is, a scikit-learn
  ``Pipeline(StandardScaler, LogisticRegression)`` in ``head.joblib`` (export, predict and
  fine-tune read it as the logistic head);
- dense: ``DenseHead``'s network (same build) fed by a ``keras.utils.PyDataset`` over the chunks,
  early stopping on the same kind of 10 % slice of train;
- scoring and predicting every split.

What stays in memory: one chunk of features, and per row a few bytes (labels, the tuning mask,
and for val/test the ids and probabilities) against ``4 x feature_size`` bytes per row in memory.
Val and test are scored, never used to choose anything.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.errors import FeaturesFileError, UsageError
from pipeline.heads.metrics import normalise_proba
from pipeline.heads.models import DenseHead, Head, HeadParams, LogisticHead, tune_split
from pipeline.store.features import FeatureSet, check_attrs, check_labels, check_split, not_hdf5_message

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 * 2 ** 20  # features per chunk when --chunk-rows is not given
IN_MEMORY_FACTOR = 3  # an in-memory fit holds the features about 3 times (loaded, standardised, CV folds)
MEMORY_FRACTION = 0.5  # default --max-memory: this share of the machine's RAM
LBFGS_MAXITER = 300  # streamed logistic: most L-BFGS iterations per fit (each 1+ passes over train)
LBFGS_TOL = 1e-4  # LogisticRegression's default tol (L-BFGS gtol)
BLOCK_ROWS = 1024  # rows per float64 temporary inside a chunk
STREAM_HEADS = ("logistic", "dense")

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str | int) -> int:
    """``4GB``, ``512MB``, ``1.5GiB`` or a number of bytes -> bytes; one-line UsageError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--max-memory '{text}' is not a size: give a positive number with a unit, "
                         "e.g. 4GB, 512MB, 1.5GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def total_memory() -> int:
    """Physical memory of this machine in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_max_memory() -> int:
    return int(MEMORY_FRACTION * total_memory())


def in_memory_bytes(paths: list[Path]) -> int:
    """What an in-memory fit would need, from the datasets' shapes (nothing is read):
    ``IN_MEMORY_FACTOR`` x the float32 features of every split."""
    import h5py

    total = 0
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                for name in ("train", "val", "test"):
                    if name in h5 and "features" in h5[name]:
                        shape = h5[name]["features"].shape
                        total += int(np.prod(shape)) * 4 if len(shape) == 2 else 0
        except OSError as exc:
            raise FeaturesFileError(not_hdf5_message(Path(path), exc)) from None
    return IN_MEMORY_FACTOR * total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def decide(paths: list[Path], stream: bool | None, max_memory: int | None, head: str) -> tuple[bool, dict]:
    """Stream or not: ``stream`` when given, else whether the in-memory estimate exceeds ``max_memory``
    (default ``MEMORY_FRACTION`` of RAM).  Returns the choice and what it was based on."""
    limit = int(max_memory) if max_memory else default_max_memory()
    need = in_memory_bytes(paths)
    if stream is None:
        streamed = need > limit
        why = (f"in-memory estimate {human(need)} > --max-memory {human(limit)}" if streamed
               else f"in-memory estimate {human(need)} <= --max-memory {human(limit)}")
    else:
        streamed = bool(stream)
        why = "--stream" if stream else "--no-stream"
    record = {"streamed": streamed, "why": why, "in_memory_estimate_bytes": need, "max_memory_bytes": limit}
    if streamed and head not in STREAM_HEADS:
        what = "--stream was given" if stream else f"the features need about {human(need)} in memory, above " \
                                                   f"--max-memory {human(limit)}"
        raise UsageError(f"{what}, and only the {' and '.join(STREAM_HEADS)} heads stream from disk, not {head}; "
                         "use --head logistic or dense, or raise --max-memory")
    if streamed and stream is None:
        log.info("streaming the features from disk: %s", why)
    return streamed, record


class Rows:
    """The features of one split of one HDF5 file, read in chunks of contiguous rows."""

    def __init__(self, path: Path, split: str, chunk_rows: int = 0):
        import h5py

        self.path, self.split = Path(path), split
        self._h5 = h5py.File(self.path, "r")
        self._ds = self._h5[split]["features"]
        self.n, self.dim = (int(v) for v in self._ds.shape)
        self.chunk_rows = int(chunk_rows) or max(64, CHUNK_BYTES // (4 * self.dim))
        self._moments: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    def __len__(self) -> int:
        return self.n

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.n / self.chunk_rows))

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min(self.n, (i + 1) * self.chunk_rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32, checked finite (the one place features are read)."""
        X = self._ds[start:stop]
        if not np.isfinite(X).all():
            raise FeaturesFileError(f"{self.path}: {self.split}/features contains NaN or infinity "
                                    f"(rows {start}-{stop - 1})")
        return X

    def chunks(self, order: Any = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, X)`` per chunk, in ``order`` (chunk numbers) or in file order."""
        for i in (range(self.n_chunks) if order is None else order):
            start, stop = self.bounds(int(i))
            if stop > start:
                yield start, stop, self.read(start, stop)

    def scaler(self, mask: np.ndarray | None = None):
        """A ``StandardScaler`` fitted in one pass over the rows (``mask``: only these rows)."""
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        for start, stop, X in self.chunks():
            X = X if mask is None else X[mask[start:stop]]
            for s in range(0, len(X), 1024):  # float64 temporaries of 1,024 rows, not of a whole chunk
                scaler.partial_fit(X[s:s + 1024])
        if mask is None:
            self._moments = (scaler.mean_, scaler.var_)
        return scaler

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and population variance of every row (computed once)."""
        if self._moments is None:
            self.scaler()
        return self._moments

    def close(self) -> None:
        self._h5.close()


class StreamSplit:
    """One split for a streamed fit: features on disk (``X``: a ``Rows``), labels (and, except for
    train, ids) in memory."""

    def __init__(self, rows: Rows, y: np.ndarray, ids: np.ndarray | None):
        self.X, self.y, self.ids = rows, y, ids


def open_streamed(paths: list[Path], chunk_rows: int = 0):
    """A ``FeatureSet`` whose splits are ``StreamSplit``: checked by shapes and types, labels read,
    features left on disk (checked finite chunk by chunk as they are read)."""
    import h5py

    if len(paths) != 1:
        raise UsageError("streamed fits read one features file; fused features (several --features) are "
                         "fitted in memory: pass --no-stream or a larger --max-memory")
    path = Path(paths[0])
    try:
        attrs = check_attrs(path)
        splits: dict[str, StreamSplit] = {}
        with h5py.File(path, "r") as h5:
            for name in ("train", "val", "test"):
                if name not in h5:
                    continue
                if check_split(path, name, h5[name], attrs) == 0:
                    continue  # an empty split is absent, not scored (as load_features)
                y = h5[name]["labels"][...].astype(np.int64)
                check_labels(path, name, y, len(attrs["class_names"]))
                ids = None if name == "train" else h5[name]["ids"].asstr()[...]
                splits[name] = StreamSplit(Rows(path, name, chunk_rows), y, ids)
    except (FeaturesFileError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - malformed attributes or datasets of any kind
        raise FeaturesFileError(f"{path} is not a valid tlpipe features file ({type(exc).__name__}: {exc}); "
                                "extract again") from None
    for name in ("train", "val"):
        if name not in splits or len(splits[name].y) == 0:
            raise FeaturesFileError(f"{path} has no '{name}' rows (splits present: {', '.join(splits) or 'none'})")
    return FeatureSet([path], attrs, splits)


def chunks_of(X: Any) -> Iterator[np.ndarray]:
    """The rows of an array (one piece) or of a ``Rows`` (its chunks)."""
    if isinstance(X, Rows):
        for _, _, part in X.chunks():
            yield part
    else:
        yield X


def _proba(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` with a column per class (zero for classes absent from train)."""
    p = model.predict_proba(X)
    if p.shape[1] != n_classes:
        full = np.zeros((len(X), n_classes), dtype=p.dtype)
        full[:, model.classes_] = p
        p = full
    return p


def _loss_and_right(p: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Summed log loss (probabilities clipped as scikit-learn's log_loss does) and correct predictions."""
    eps = np.finfo(p.dtype).eps
    q = np.clip(p / np.clip(p.sum(1, keepdims=True), eps, None), eps, 1 - eps)
    return float(-np.log(q[np.arange(len(y)), y]).sum()), int((p.argmax(1) == y).sum())


class StreamLogisticHead(LogisticHead):
    """The in-memory logistic head's model and objective, solved over the HDF5 chunks.

    scikit-learn's ``LogisticRegression(solver="lbfgs")`` minimises, on standardised rows,
    ``sum_i w_i loss_i / sum_i w_i + ||coef||^2 / (2 C sum_i w_i)`` (``loss``: multinomial
    cross-entropy, or binomial with one coefficient vector for two classes; the intercept is not
    penalised; ``w_i``: 1, or the balanced class weights).  Here ``scipy.optimize.minimize``
    (L-BFGS-B, scikit-learn's options) minimises the same function, each function + gradient
    evaluation being one pass over the chunks, accumulated in float64 by blocks of ``BLOCK_ROWS``.
    C comes from the in-memory head's grid, chosen by log loss on a held-out stratified slice of
    train (never val), each C warm-started from the previous one; the chosen solution then
    warm-starts the refit on all of train.  Saved as the in-memory head: a scikit-learn
    ``Pipeline(StandardScaler, LogisticRegression)`` with ``coef_``, ``intercept_`` and ``classes_``.
    """

    description = ("multinomial logistic regression (scikit-learn's objective, L-BFGS, one pass over the "
                   "HDF5 chunks per evaluation), C chosen on a held-out stratified 10% slice of train")

    def _problem(self, rows: Rows, y: np.ndarray, mask: np.ndarray | None, scaler, C: float) -> "_Objective":
        return _Objective(rows, y, mask, scaler.mean_, scaler.scale_, C, self.params.class_weight)

    def _lr(self, C: float, classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray, n_iter: int, dim: int):
        """A fitted ``LogisticRegression`` holding a streamed solution (what the in-memory head saves)."""
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=C, max_iter=LBFGS_MAXITER, tol=LBFGS_TOL, class_weight=self.params.class_weight,
                                random_state=self.params.seed)
        lr.classes_ = np.asarray(classes)
        lr.coef_, lr.intercept_ = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
        lr.n_features_in_ = int(dim)
        lr.n_iter_ = np.array([int(n_iter)], dtype=np.int32)
        return lr

    def fit(self, train, val=None):
        """``train``: ``(Rows, labels)``.  ``val`` is ignored."""
        from sklearn.pipeline import Pipeline

        rows, y = train
        if len(np.unique(y)) < 2:
            raise UsageError("logistic head: train holds a single class; at least two are needed")
        grid = tuple(sorted(self.params.c_grid))
        scaler = rows.scaler()  # labels unused: fitted on all of train, as the in-memory head's
        fits: list[dict] = []
        out_rows: list[dict] = []
        fit_idx, tune_idx = tune_split(y, self.params.tune_fraction, self.params.seed, "logistic head")
        tune = np.zeros(len(y), dtype=bool)
        tune[tune_idx] = True
        tunable = len(grid) > 1 and len(np.unique(y[~tune])) >= 2
        if tunable:
            solutions, w = [], None
            for C in grid:  # weakest penalty last: each C starts from the previous solution
                prob = self._problem(rows, y, ~tune, scaler, C)
                w, info = prob.solve(w)
                fits.append({"C": C, "rows": int((~tune).sum()), **info})
                solutions.append((prob, w))
            scores = _score_candidates(rows, y, tune, scaler, [p.unpack(w) for p, w in solutions], self.n_classes)
            n = np.array([len(fit_idx), len(tune_idx)], dtype=np.float64)
            out_rows = [{"param": "C", "value": C, "cv_accuracy": float(scores[i, 1, 1] / n[1]),
                         "cv_log_loss": float(scores[i, 1, 0] / n[1]), "train_accuracy": float(scores[i, 0, 1] / n[0]),
                         "train_loss": float(scores[i, 0, 0] / n[0])} for i, C in enumerate(grid)]
            best = int(np.argmin([r["cv_log_loss"] for r in out_rows]))
            C = grid[best]
            start_prob, start = solutions[best]
        else:
            best, C, start_prob, start = None, grid[0] if len(grid) == 1 else self.default, None, None
            log.warning("logistic (streamed): %s; C=%s used without tuning",
                        "a single grid value" if len(grid) == 1 else "the fit slice holds a single class", C)
        prob = self._problem(rows, y, None, scaler, C)
        w0 = start if start_prob is not None and np.array_equal(start_prob.classes, prob.classes) else None
        w, info = prob.solve(w0)  # refit on all of train, warm-started from the slice solution
        fits.append({"C": C, "rows": int(len(y)), **info})
        classes, coef, intercept = prob.unpack(w)
        self.model = Pipeline([("standardscaler", scaler),
                               ("logisticregression", self._lr(C, classes, coef, intercept, info["iterations"],
                                                               rows.dim))])
        self.chosen = {"C": C}
        passes = 1 + sum(f["evaluations"] for f in fits) + (1 if tunable else 0)
        self.tuning = {"method": (f"a held-out {self.params.tune_fraction:.0%} stratified slice of train "
                                  "(streamed L-BFGS, scikit-learn's objective)" if tunable
                                  else f"none: C={C} fixed"),
                       "param": "C", "chosen": C,
                       "cv_accuracy": out_rows[best]["cv_accuracy"] if tunable else None,
                       "cv_log_loss": out_rows[best]["cv_log_loss"] if tunable else None,
                       "tune_rows": int(len(tune_idx)) if tunable else 0, "folds": 0,
                       "optimizer": {"method": "L-BFGS-B", "maxiter": LBFGS_MAXITER, "tol": LBFGS_TOL,
                                     "maxls": 50, "passes_over_train": passes, "fits": fits},
                       "val_used_for_tuning": False}
        if not info["converged"]:
            log.warning("logistic (streamed): L-BFGS stopped after %d iterations (maxiter %d) before tol %g",
                        info["iterations"], LBFGS_MAXITER, LBFGS_TOL)
        log.info("logistic (streamed): C=%s chosen on %d held-out train rows; refit %d iterations, %d passes in all",
                 C, len(tune_idx), info["iterations"], passes)
        return out_rows

    def predict_proba(self, X):
        """By chunks, and within a chunk by ``BLOCK_ROWS`` rows (float64 temporaries stay small)."""
        parts = [_proba(self.model, chunk[s:s + BLOCK_ROWS], self.n_classes)
                 for chunk in chunks_of(X) for s in range(0, len(chunk), BLOCK_ROWS)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes))


def _blocks(rows: Rows, y: np.ndarray, mask: np.ndarray | None, mean: np.ndarray, scale: np.ndarray):
    """``(Xs, y, index)`` standardised float64 blocks of at most ``BLOCK_ROWS`` rows (those in ``mask``),
    in file order; ``index``: the rows' positions in the split."""
    for start, stop, X in rows.chunks():
        keep = np.arange(start, stop) if mask is None else start + np.flatnonzero(mask[start:stop])
        for s in range(0, len(keep), BLOCK_ROWS):
            idx = keep[s:s + BLOCK_ROWS]
            yield (X[idx - start].astype(np.float64) - mean) / scale, y[idx], idx


def _probabilities(Xs: np.ndarray, classes: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                   n_classes: int) -> np.ndarray:
    """scikit-learn's ``LogisticRegression.predict_proba`` (binary: sigmoid; else softmax), one column
    per class of the features file (zero for classes the model has not seen)."""
    z = Xs @ coef.T + intercept
    if len(classes) == 2:
        p1 = 0.5 * (1.0 + np.tanh(0.5 * z[:, 0]))  # sigmoid without overflow
        p = np.stack([1.0 - p1, p1], axis=1)
    else:
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
    full = np.zeros((len(Xs), n_classes))
    full[:, classes] = p
    return full


def _score_candidates(rows: Rows, y: np.ndarray, tune: np.ndarray, scaler, models: list, n_classes: int) -> np.ndarray:
    """One pass: summed log loss and correct predictions of each ``(classes, coef, intercept)`` on the
    fit rows and on the held-out rows: ``[candidate, fit|tune, loss|right]``."""
    sums = np.zeros((len(models), 2, 2))
    for Xs, yy, idx in _blocks(rows, y, None, scaler.mean_, scaler.scale_):
        t = tune[idx]
        for i, (classes, coef, intercept) in enumerate(models):
            p = _probabilities(Xs, classes, coef, intercept, n_classes)
            for j, part in enumerate((~t, t)):
                if part.any():
                    sums[i, j] += _loss_and_right(p[part], yy[part])
    return sums


class _Objective:
    """scikit-learn's lbfgs logistic objective on the standardised rows of ``rows`` in ``mask``;
    ``value_and_grad`` is one streaming pass.  Parameters are packed as scikit-learn packs them:
    ``[coef, intercept]`` (binary) or ``(classes, dim + 1)`` raveled in Fortran order."""

    def __init__(self, rows: Rows, y: np.ndarray, mask: np.ndarray | None, mean: np.ndarray, scale: np.ndarray,
                 C: float, class_weight: str | None):
        self.rows, self.mask, self.mean, self.scale = rows, mask, mean, scale
        seen = y if mask is None else y[mask]
        self.classes = np.unique(seen)
        self.code = np.full(int(y.max()) + 1, -1, dtype=np.int64)
        self.code[self.classes] = np.arange(len(self.classes))
        self.y = y
        self.binary = len(self.classes) == 2
        self.k = 1 if self.binary else len(self.classes)
        self.dim = rows.dim
        counts = np.bincount(self.code[seen], minlength=len(self.classes)).astype(np.float64)
        if class_weight == "balanced":  # compute_class_weight("balanced"): n / (classes * count)
            self.class_w = len(seen) / (len(self.classes) * counts)
        else:
            self.class_w = np.ones(len(self.classes))
        self.sw_sum = float((self.class_w * counts).sum())
        self.l2 = 1.0 / (C * self.sw_sum)
        self.evaluations = 0

    def unpack(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(classes, coef, intercept)`` as ``LogisticRegression`` stores them."""
        if self.binary:
            return self.classes, w[:-1][None, :].copy(), w[-1:].copy()
        W = w.reshape(self.k, self.dim + 1, order="F")
        return self.classes, W[:, :-1].copy(), W[:, -1].copy()

    def value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        if self.binary:
            coef, b = w[:-1], w[-1]
        else:
            W = w.reshape(self.k, self.dim + 1, order="F")
            coef, b = W[:, :-1], W[:, -1]
        loss = 0.0
        g_coef = np.zeros((self.k, self.dim))
        g_b = np.zeros(self.k)
        for Xs, yy, _ in _blocks(self.rows, self.y, self.mask, self.mean, self.scale):
            c = self.code[yy]
            sw = self.class_w[c]
            if self.binary:
                z = Xs @ coef + b
                t = (c == 1).astype(np.float64)
                loss += float(sw @ (np.logaddexp(0.0, z) - t * z))  # HalfBinomialLoss
                G = (sw * (0.5 * (1.0 + np.tanh(0.5 * z)) - t))[:, None]
            else:
                Z = Xs @ coef.T + b
                m = Z.max(1, keepdims=True)
                E = np.exp(Z - m)
                s = E.sum(1, keepdims=True)
                lse = (m + np.log(s))[:, 0]
                loss += float(sw @ (lse - Z[np.arange(len(c)), c]))  # HalfMultinomialLoss
                G = E / s
                G[np.arange(len(c)), c] -= 1.0
                G *= sw[:, None]
            g_coef += G.T @ Xs
            g_b += G.sum(0)
        coef2 = coef[None, :] if self.binary else coef
        value = loss / self.sw_sum + 0.5 * self.l2 * float((coef2 ** 2).sum())
        g_coef = g_coef / self.sw_sum + self.l2 * coef2
        g_b = g_b / self.sw_sum
        if self.binary:
            return value, np.concatenate([g_coef[0], g_b])
        return value, np.concatenate([g_coef, g_b[:, None]], axis=1).ravel(order="F")

    def solve(self, w0: np.ndarray | None) -> tuple[np.ndarray, dict]:
        """``scipy.optimize.minimize(L-BFGS-B)`` with scikit-learn's options; ``w0``: warm start."""
        from scipy.optimize import minimize

        size = (self.dim + 1) * self.k
        w0 = np.zeros(size) if w0 is None or np.shape(w0) != (size,) else np.asarray(w0, dtype=np.float64)
        before = self.evaluations
        res = minimize(self.value_and_grad, w0, method="L-BFGS-B", jac=True,
                       options={"maxiter": LBFGS_MAXITER, "maxls": 50, "gtol": LBFGS_TOL,
                                "ftol": 64 * np.finfo(float).eps})
        return res.x, {"iterations": int(res.nit), "evaluations": int(self.evaluations - before),
                       "converged": bool(res.success), "objective": float(res.fun)}


def chunk_batches(rows: Rows, y: np.ndarray, mask: np.ndarray, batch_size: int, seed: int, shuffle: bool):
    """A ``keras.utils.PyDataset`` of ``(X, y)`` batches of the rows in ``mask``, read chunk by chunk.

    Batches never straddle chunks; with ``shuffle`` the chunk order and the rows within each chunk
    change every epoch (seeded).  Keras reads the batches in order, so each chunk is read once per
    epoch and only the current one is held."""
    import keras

    counts = np.array([int(mask[slice(*rows.bounds(i))].sum()) for i in range(rows.n_chunks)])
    per_chunk = -(-counts // batch_size)

    class ChunkBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self._current: tuple[int, np.ndarray, np.ndarray] | None = None
            self._arrange()

        def _arrange(self) -> None:
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(rows.n_chunks) if shuffle else np.arange(rows.n_chunks)
            self.starts = np.concatenate([[0], np.cumsum(per_chunk[self.order])])
            self._current = None

        def __len__(self) -> int:
            return int(per_chunk.sum())

        def _chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            if self._current is None or self._current[0] != i:
                self._current = None  # drop the previous chunk before reading the next
                start, stop = rows.bounds(i)
                keep = np.flatnonzero(mask[start:stop])
                if shuffle:
                    keep = np.random.default_rng([seed, self.epoch, i]).permutation(keep)
                X = rows.read(start, stop)[keep]
                self._current = (i, X, y[start:stop][keep].astype("float32"))
            return self._current[1], self._current[2]

        def __getitem__(self, idx: int):
            j = int(np.searchsorted(self.starts, idx, side="right")) - 1
            X, yy = self._chunk(int(self.order[j]))
            b = (idx - int(self.starts[j])) * batch_size
            return X[b:b + batch_size], yy[b:b + batch_size]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._arrange()

    return ChunkBatches()


class StreamDenseHead(DenseHead):
    """``DenseHead``'s network trained from a ``PyDataset`` over the HDF5 chunks."""

    description = "small Keras network fed from HDF5 chunks, early stopping on a 10% slice of train, best epoch restored"

    def fit(self, train, val=None):
        """``train``: ``(Rows, labels)``; ``val``: ``(Rows, labels)``, only scored per epoch."""
        rows, y = train
        fit_idx, tune_idx = self.tune_split(y)
        tune = np.zeros(len(y), dtype=bool)
        tune[tune_idx] = True
        scaler = rows.scaler(~tune)  # the normalisation's state, from the fit rows as in memory
        self.model = self.build(rows.dim, stats=(scaler.mean_, scaler.var_))
        bs, seed = self.params.batch_size, self.params.seed
        data = chunk_batches(rows, y, ~tune, bs, seed, shuffle=True)
        tune_data = chunk_batches(rows, y, tune, max(bs, 1024), seed, shuffle=False)
        return self.train_model(data, tune_data, y[fit_idx], len(tune_idx), val)

    def predict_proba(self, X):
        """By chunks, and within a chunk by ``predict_on_batch`` (one ``model.predict`` per chunk would
        build a data pipeline each time; TensorFlow's memory then grows with the number of chunks)."""
        parts = []
        for part in chunks_of(X):
            for s in range(0, len(part), 1024):
                parts.append(np.asarray(self.model.predict_on_batch(part[s:s + 1024]), dtype=np.float64))
        p = np.concatenate(parts) if parts else np.zeros((0, 1 if self.n_classes == 2 else self.n_classes))
        if self.n_classes == 2:
            p = np.concatenate([1 - p, p], axis=1)
        return normalise_proba(p)


def stream_head(name: str) -> type[Head]:
    """The streamed variant of a head (same name, same saved form)."""
    if name == "logistic":
        return StreamLogisticHead
    if name == "dense":
        return StreamDenseHead
    raise UsageError(f"only the {' and '.join(STREAM_HEADS)} heads stream from disk, not {name}")


def stream_params(params: HeadParams, chunk_rows: int) -> HeadParams:
    """``params`` recording that the fit streamed (part of the head folder's settings)."""
    from dataclasses import replace

    return replace(params, extra={**params.extra, "stream": True, "chunk_rows": int(chunk_rows)})
