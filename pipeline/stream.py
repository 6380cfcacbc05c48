"""Heads on features larger than memory: ``tlpipe fit-head --stream`` (automatic above ``--max-memory``).

The features stay in the HDF5 file (plain or virtual datasets) and are read one chunk of
contiguous rows at a time (``Rows.read``, the only place that reads features):

- standardisation statistics: per-feature mean and variance, ``StandardScaler.partial_fit`` over
  the chunks (the logistic head's scaler; the dense head's ``Normalization`` state);
- logistic: ``SGDClassifier(loss="log_loss").partial_fit`` over the chunks, ``SGD_EPOCHS`` epochs,
  chunk order and rows within a chunk shuffled with the seed.  The regularisation ``alpha`` is
  chosen on a held-out stratified 10 % slice of train (the candidates train in the same passes;
  best log loss on the slice), then refitted on all of train.  Saved as the in-memory head is,
  a scikit-learn ``Pipeline(StandardScaler, classifier)`` in ``head.joblib`` (export and predict
  read it as the logistic head);
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

from pipeline.errors import FeaturesFileError, UsageError
from pipeline.heads import DenseHead, Head, HeadParams, LogisticHead, tune_split

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 * 2 ** 20  # features per chunk when --chunk-rows is not given
IN_MEMORY_FACTOR = 3  # an in-memory fit holds the features about 3 times (loaded, standardised, CV folds)
MEMORY_FRACTION = 0.5  # default --max-memory: this share of the machine's RAM
SGD_EPOCHS = 5
ALPHA_GRID = (1e-5, 1e-4, 1e-3, 1e-2)
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
            raise FeaturesFileError(f"{path} is not a readable HDF5 file ({exc})") from None
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

    from pipeline.features import FeatureSet, check_attrs, check_labels, check_split

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
                check_split(path, name, h5[name], attrs)
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
    """Logistic regression by SGD over the HDF5 chunks; alpha chosen on a held-out slice of train."""

    description = ("logistic regression by SGD streamed over HDF5 chunks, alpha chosen on a held-out "
                   "stratified 10% slice of train")
    grid_name = "alpha"

    def _sgd(self, alpha: float):
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier(loss="log_loss", alpha=alpha, random_state=self.params.seed,
                             class_weight=None, average=True)

    def _epochs(self, rows: Rows, y: np.ndarray, scaler, models: list, mask: np.ndarray | None) -> None:
        """``SGD_EPOCHS`` passes of ``partial_fit`` over the chunks (rows in ``mask``), seeded shuffles."""
        classes = np.unique(y)
        weights = self._class_weights(y if mask is None else y[mask])
        for epoch in range(SGD_EPOCHS):
            rng = np.random.default_rng([self.params.seed, epoch])
            for start, stop, X in rows.chunks(rng.permutation(rows.n_chunks)):
                keep = np.arange(stop - start) if mask is None else np.flatnonzero(mask[start:stop])
                keep = rng.permutation(keep)
                if not len(keep):
                    continue
                Xs = scaler.transform(X[keep]).astype(np.float64)
                yy = y[start:stop][keep]
                sw = None if weights is None else weights[yy]
                for model in models:
                    model.partial_fit(Xs, yy, classes=classes, sample_weight=sw)

    def _class_weights(self, y: np.ndarray) -> np.ndarray | None:
        if self.params.class_weight != "balanced":
            return None
        counts = np.bincount(y, minlength=self.n_classes).astype(np.float64)
        w = np.zeros(self.n_classes)
        present = counts > 0
        w[present] = len(y) / (present.sum() * counts[present])
        return w

    def fit(self, train, val=None):
        """``train``: ``(Rows, labels)``.  ``val`` is ignored."""
        from sklearn.pipeline import Pipeline

        rows, y = train
        grid = tuple(sorted(self.params.extra.get("alpha_grid", ALPHA_GRID)))
        scaler = rows.scaler()  # labels unused: fitted on all of train, as the in-memory head's
        fit_idx, tune_idx = tune_split(y, self.params.tune_fraction, self.params.seed, "logistic head")
        tune = np.zeros(len(y), dtype=bool)
        tune[tune_idx] = True
        models = [self._sgd(a) for a in grid]
        self._epochs(rows, y, scaler, models, ~tune)
        # one scoring pass: each candidate on its fit rows and on the held-out slice
        sums = np.zeros((len(grid), 2, 2))  # [candidate, fit|tune, loss|right]
        for start, stop, X in rows.chunks():
            Xs = scaler.transform(X).astype(np.float64)
            yy, t = y[start:stop], tune[start:stop]
            for i, model in enumerate(models):
                p = _proba(model, Xs, self.n_classes)
                for j, part in enumerate((~t, t)):
                    if part.any():
                        sums[i, j] += _loss_and_right(p[part], yy[part])
        n = np.array([len(fit_idx), len(tune_idx)], dtype=np.float64)
        rows_out = [{"param": "alpha", "value": a, "cv_accuracy": float(sums[i, 1, 1] / n[1]),
                     "cv_log_loss": float(sums[i, 1, 0] / n[1]), "train_accuracy": float(sums[i, 0, 1] / n[0]),
                     "train_loss": float(sums[i, 0, 0] / n[0])} for i, a in enumerate(grid)]
        best = int(np.argmin([r["cv_log_loss"] for r in rows_out]))
        alpha = grid[best]
        final = self._sgd(alpha)
        self._epochs(rows, y, scaler, [final], None)  # refit on all of train with the chosen alpha
        self.model = Pipeline([("standardscaler", scaler), ("sgdclassifier", final)])
        self.chosen = {"alpha": alpha}
        self.tuning = {"method": f"a held-out {self.params.tune_fraction:.0%} stratified slice of train "
                                 f"(streamed SGD, {SGD_EPOCHS} epochs)",
                       "param": "alpha", "chosen": alpha, "cv_accuracy": rows_out[best]["cv_accuracy"],
                       "cv_log_loss": rows_out[best]["cv_log_loss"], "tune_rows": int(len(tune_idx)),
                       "folds": 0, "val_used_for_tuning": False}
        log.info("logistic (streamed): alpha=%s chosen on %d held-out train rows (accuracy %.4f, log loss %.4f)",
                 alpha, len(tune_idx), rows_out[best]["cv_accuracy"], rows_out[best]["cv_log_loss"])
        return rows_out

    def predict_proba(self, X):
        """By chunks, and within a chunk by 1,024 rows (the scaler and SGD work in float64)."""
        parts = [_proba(self.model, chunk[s:s + 1024], self.n_classes)
                 for chunk in chunks_of(X) for s in range(0, len(chunk), 1024)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes))


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
        return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)


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
