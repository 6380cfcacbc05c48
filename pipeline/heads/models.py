"""The table of heads fitted on cached features: one interface, one row each.

Every head implements ``fit(train, val=None) -> rows``, ``predict_proba(X)``, ``save(folder)``
and ``load(folder)``.  Nothing is ever chosen on ``val`` (or test): the grid heads (logistic,
svm, rbf-svm: C; knn: k) choose by cross-validation over stratified folds of train, scored by
log loss, as scikit-learn's ``GridSearchCV`` chooses (computed faster by ``pipeline.heads.fastcv``),
then refit on all of train; the dense head early-stops on a seeded,
stratified 10 % slice of train and restores its best epoch.  ``val``, when given to the dense
head, is only scored after each epoch for the training curve.  ``fit`` returns one row per grid
value (``GRID_COLUMNS``) or per epoch (``HISTORY_COLUMNS``) and sets ``head.tuning``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.heads.metrics import accuracy_and_log_loss, normalise_proba

log = logging.getLogger(__name__)

GRID_COLUMNS = ["param", "value", "cv_accuracy", "cv_log_loss", "train_accuracy", "train_loss"]
HISTORY_COLUMNS = ["epoch", "train_accuracy", "train_loss", "tune_accuracy", "tune_loss",
                   "val_accuracy", "val_loss", "seconds"]

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class HeadParams:
    """Knobs shared by the heads (each head reads the ones it uses)."""

    seed: int = 0
    # logistic / svm: inverse regularisation strengths tried by cross-validation on train
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    # rbf-svm: C values tried (a kernel SVM wants larger C than a linear one)
    rbf_c_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    # knn: neighbour counts tried
    k_grid: tuple[int, ...] = (1, 5, 11, 21)
    # grid heads: stratified folds of train (fewer when the smallest class has fewer rows)
    cv_folds: int = 5
    # rbf-svm: outer folds (each fit already runs a 3-fold calibration inside)
    rbf_cv_folds: int = 3
    # dense
    hidden: int = 256
    dropout: float = 0.5
    learning_rate: float = 1e-3
    batch_size: int = 256
    epochs: int = 50
    patience: int = 5
    tune_fraction: float = 0.1  # dense: share of train held out for early stopping
    class_weight: str | None = None  # None or "balanced"
    extra: dict[str, Any] = field(default_factory=dict)


class Head:
    """Base class: a fitted classifier on feature vectors."""

    name = ""
    description = ""

    progress = False  # grid heads: a progress bar over the CV fits (fit_head turns it on)

    def __init__(self, n_classes: int, params: HeadParams):
        self.n_classes = n_classes
        self.params = params
        self.chosen: dict[str, Any] = {}
        self.tuning: dict[str, Any] = {}

    def fit(self, train: Split, val: Split | None = None, groups: np.ndarray | None = None) -> list[dict]:
        """Fit on ``train``; ``val`` is never used to choose anything; ``groups`` (one label per train
        row, optional) keeps the rows of a group together when train is split for tuning."""
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, folder: Path) -> Path:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path) -> "Head":
        raise NotImplementedError


def cv_folds(y: np.ndarray, wanted: int, min_per_class: int = 1) -> int:
    """Stratified folds possible on labels ``y``: ``wanted``, or fewer when the smallest class has
    fewer rows (each CV training part keeps at least ``min_per_class`` rows of every class);
    0 when no stratified CV is possible."""
    smallest = int(np.bincount(y)[np.unique(y)].min())
    for n in range(min(int(wanted), smallest), 1, -1):
        if smallest - math.ceil(smallest / n) >= min_per_class:
            return n
    return 0


def tune_split(y: np.ndarray, fraction: float, seed: int, who: str = "dense head") -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, tune rows) of train: a seeded, stratified ``fraction`` slice held out for early
    stopping or for choosing a parameter (plain seeded slice when a class is too small to stratify)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_tune = max(1, math.ceil(fraction * len(y)))
    if len(y) - n_tune < 1:
        raise UsageError(f"{who}: {len(y)} training rows are too few to hold out a tuning slice")
    try:
        fit_idx, tune_idx = train_test_split(idx, test_size=max(n_tune, len(np.unique(y))), stratify=y,
                                             random_state=seed)
    except ValueError:  # a class with a single row: no stratified slice
        fit_idx, tune_idx = train_test_split(idx, test_size=n_tune, random_state=seed)
    return np.sort(fit_idx), np.sort(tune_idx)


class _SklearnHead(Head):
    """Heads that are a scikit-learn pipeline whose final step's parameter is chosen by
    cross-validation on train (stratified, shuffled folds; best mean log loss, as
    ``GridSearchCV`` chooses), then refit on all of train.  The folds run through
    ``pipeline.heads.fastcv`` (warm-started paths, reduced problems, parallel folds)."""

    file = "head.joblib"
    grid_name = "C"
    param_name = "C"  # parameter of the pipeline's final estimator that the grid sets
    default = 1.0  # used when train is too small for cross-validation
    train_scores = True  # in-fold train scores (knn: skipped, exact on its own rows)
    min_per_class = 1  # rows of each class a CV training part needs (calibrated SVMs: 3 folds inside)
    cv_cache: Any = None  # what one CV keeps between its grid and its extension (k-NN: the neighbours)

    def make(self, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def grid(self, n_train: int, folds: int) -> tuple:
        return tuple(sorted(self.params.c_grid))

    def folds_wanted(self) -> int:
        return self.params.cv_folds

    def fold_task(self, X: np.ndarray, y: np.ndarray, grid: tuple):
        """``task(i, (train rows, test rows), tick)`` scoring every grid value on one fold
        (default: a fresh fit of the final estimator per value, as ``GridSearchCV``)."""
        from pipeline.heads.fastcv import plain_task

        return plain_task(X, y, grid, lambda v: self.make(v).steps[-1][1], self.train_scores)

    def refit(self, X: np.ndarray, y: np.ndarray, value):
        """The final estimator at the chosen value, fitted on all of (preprocessed) train."""
        return self.make(value).steps[-1][1].fit(X, y)

    def fit(self, train, val=None, groups=None):
        """Choose the grid value by cross-validation on train only; refit on all of train.
        ``val`` is ignored; ``groups`` (one label per train row) keeps each group in one fold."""
        import sklearn
        from sklearn.pipeline import Pipeline

        X, y = train
        folds = cv_folds(y, self.folds_wanted(), self.min_per_class)
        if groups is not None and folds:
            folds = min(folds, len(np.unique(groups)))
        grid = self.grid(len(y), folds)
        template = self.make(grid[0])
        if folds < 2 or len(grid) < 2:
            return self.fit_fixed(X, y, grid, folds)
        # The preprocessing (standardisation, L2 normalisation) uses no labels, so it is fitted once
        # on all of train; only the final estimator is cross-validated.
        prep = Pipeline(template.steps[:-1]).fit(X) if len(template.steps) > 1 else None
        Xp = prep.transform(X) if prep is not None else X
        if not np.isfinite(Xp).all():
            raise UsageError(f"{self.name}: the training features hold NaN or infinite values; extract them again")
        with sklearn.config_context(assume_finite=True):  # checked once above, not in each fit
            grid, rows, best, extended = self.cross_validate(Xp, y, grid, folds, groups)
            value = grid[best]
            final = self.refit(Xp, y, value)
        self.model = Pipeline((prep.steps if prep is not None else []) + [(template.steps[-1][0], final)])
        self.chosen = {self.grid_name: value}
        edge = self.grid_edge(grid, best, extended)
        self.tuning = {"method": f"{folds}-fold stratified{' group' if groups is not None else ''} CV on train",
                       "param": self.grid_name, "chosen": value,
                       "cv_accuracy": rows[best]["cv_accuracy"], "cv_log_loss": rows[best]["cv_log_loss"],
                       "folds": folds, "grid": list(grid), "grid_extended_to": extended,
                       "at_grid_edge": edge is not None, "val_used_for_tuning": False}
        log.info("%s: %s=%s chosen by %d-fold CV on train (CV accuracy %.4f, log loss %.4f)", self.name,
                 self.grid_name, value, folds, rows[best]["cv_accuracy"], rows[best]["cv_log_loss"])
        if edge:
            log.warning("%s: %s", self.name, edge)
        return rows

    def cross_validate(self, Xp, y, grid, folds, groups) -> tuple[tuple, list[dict], int, Any]:
        """(grid, one ``GRID_COLUMNS`` row per grid value (means over the folds), the best row's
        index, the value the grid was extended to or None).  The best value has the lowest mean log
        loss (the first on ties, as ``GridSearchCV``).  When it is the first or last of its grid,
        the grid is extended once by one value beyond it (``beyond``: a decade of C, a step of k),
        on the same folds; that value is chosen only if its CV log loss is lower."""
        from pipeline.heads.fastcv import fold_splits

        splits = fold_splits(y, folds, self.params.seed, groups)
        try:
            table = self.fold_table(Xp, y, grid, splits).mean(axis=0)  # [grid value, 4]
            best = int(np.argmin(table[:, 1]))
            extra = self.beyond(grid, best, min(len(tr) for tr, _ in splits))
            if extra is not None:
                more = self.fold_table(Xp, y, (extra,), splits).mean(axis=0)
                log.info("%s: %s=%s is at the edge of its grid; also tried %s=%s (CV log loss %.4f against %.4f)",
                         self.name, self.grid_name, grid[best], self.grid_name, extra, more[0, 1], table[best, 1])
                first = extra < grid[0]
                grid = (extra,) + tuple(grid) if first else tuple(grid) + (extra,)
                table = np.concatenate([more, table] if first else [table, more])
                old = best + int(first)
                best = old if table[old, 1] <= table[0 if first else -1, 1] else (0 if first else len(grid) - 1)
        finally:
            self.cv_cache = None  # k-NN: the neighbours found for the folds
        return grid, self.grid_rows(grid, table), best, extra

    def beyond(self, grid: tuple, best: int, room: int):
        """The value one step beyond the edge of ``grid`` that ``best`` sits on, or None (not at an
        edge): a decade of C further (``room``, the rows of the smallest CV training part, is for k)."""
        if 0 < best < len(grid) - 1:
            return None
        return float(grid[0]) / 10.0 if best == 0 else float(grid[-1]) * 10.0

    def fold_table(self, Xp, y, grid, splits) -> np.ndarray:
        """Scores ``[fold, grid value, (test acc, test loss, train acc, train loss)]``: ``fold_task``
        on every fold, folds in parallel threads, with a progress bar over the fits."""
        from pipeline.heads.fastcv import Progress, run_folds

        bar = Progress(self.name, len(splits) * len(grid), self.progress)
        return run_folds(self.fold_task(Xp, y, grid), splits, bar)

    def grid_rows(self, grid: tuple, table: np.ndarray) -> list[dict]:
        """``GRID_COLUMNS`` rows from the mean scores ``[grid value, (cv acc, cv loss, train acc, train loss)]``."""
        return [{"param": self.grid_name, "value": value, "cv_accuracy": float(t[0]), "cv_log_loss": float(t[1]),
                 "train_accuracy": float(t[2]) if self.train_scores else None,
                 "train_loss": float(t[3]) if self.train_scores else None} for value, t in zip(grid, table)]

    def grid_edge(self, grid: tuple, best: int, extended=None) -> str | None:
        """What to say when the chosen value is the first or last of its grid (a better one may lie
        beyond it; ``extended``: the value the grid was already extended to), or None."""
        if 0 < best < len(grid) - 1:
            return None
        side = "smallest" if best == 0 else "largest"
        more = {"C": ("stronger" if best == 0 else "weaker") + " regularisation", "k": ("fewer" if best == 0 else "more")
                + " neighbours"}.get(self.grid_name, "a value beyond it")
        once = f" (extended once, to {self.grid_name}={extended})" if extended is not None else ""
        return (f"{self.grid_name}={grid[best]} is the {side} value of its grid {list(grid)}{once}: {more} might "
                f"fit better; widen the grid to check (tuning records at_grid_edge: true)")

    def fit_fixed(self, X, y, grid, folds) -> list[dict]:
        """No cross-validation possible: the single grid value, or ``default``, fitted on all of train."""
        value = grid[0] if len(grid) == 1 else self.default
        why = "a single grid value" if len(grid) == 1 else "too few rows per class (or groups) for CV"
        self.model = self.make(value).fit(X, y)
        self.chosen = {self.grid_name: value}
        self.tuning = {"method": f"none ({why}): {self.grid_name}={value} fixed", "param": self.grid_name,
                       "chosen": value, "cv_accuracy": None, "cv_log_loss": None, "folds": 0,
                       "val_used_for_tuning": False}
        log.warning("%s: %s; %s=%s used without cross-validation", self.name, why, self.grid_name, value)
        return []

    def predict_proba(self, X):
        proba = self.model.predict_proba(X)
        if proba.shape[1] != self.n_classes:  # a class absent from train: give it zero probability
            full = np.zeros((len(X), self.n_classes), dtype=proba.dtype)
            full[:, self.model.classes_] = proba
            proba = full
        return proba

    def save(self, folder):
        import joblib

        path = Path(folder) / self.file
        joblib.dump({"head": self.name, "n_classes": self.n_classes, "chosen": self.chosen,
                     "tuning": self.tuning, "model": self.model}, path)
        return path

    @classmethod
    def load(cls, folder):
        import joblib

        data = joblib.load(Path(folder) / cls.file)
        head = cls(data["n_classes"], HeadParams())
        head.model, head.chosen, head.tuning = data["model"], data["chosen"], data.get("tuning", {})
        return head


class LogisticHead(_SklearnHead):
    """Standardised features + (multinomial) logistic regression, C chosen by stratified CV on train."""

    name = "logistic"
    description = "scikit-learn logistic regression, C chosen by cross-validation on train"

    def make(self, value):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        cw = self.params.class_weight
        return make_pipeline(StandardScaler(), LogisticRegression(C=value, max_iter=500, class_weight=cw,
                                                                  random_state=self.params.seed))

    def fold_task(self, X, y, grid):
        """Each fold walks the C grid with one warm-started ``LogisticRegression`` (on the exact
        reduced problem when features outnumber rows); the final refit is the plain cold fit."""
        from pipeline.heads.fastcv import gram, logistic_task

        return logistic_task(X, y, gram(X), grid, lambda v: self.make(v).steps[-1][1], self.train_scores)


class SvmHead(_SklearnHead):
    """Linear SVM on standardised features with sigmoid-calibrated probabilities.

    ``LinearSVC``'s objective (squared hinge, L2, regularised intercept) solved by L-BFGS
    (``pipeline.heads.fastcv.SquaredHingeSVC``: same optimum, warm-startable), calibrated as
    before by ``CalibratedClassifierCV(method="sigmoid", cv=3)`` (3 SVMs, their sigmoid
    probabilities averaged)."""

    name = "svm"
    description = "linear SVM with calibrated probabilities, C chosen by cross-validation on train"
    param_name = "estimator__C"
    min_per_class = 3

    def make(self, value):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from pipeline.heads.fastcv import SquaredHingeSVC

        svc = SquaredHingeSVC(C=value, class_weight=self.params.class_weight, random_state=self.params.seed)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=3))

    def fold_table(self, Xp, y, grid, splits):
        """Each inner calibration SVM of each fold walks the C grid warm-started, all in parallel;
        sigmoid per C as before (``pipeline.heads.fastcv.svm_table``)."""
        from pipeline.heads.fastcv import SVM_INNER, Progress, svm_table

        bar = Progress(self.name, len(splits) * SVM_INNER * len(grid), self.progress)
        return svm_table(Xp, y, grid, splits, self.params.class_weight, self.train_scores, bar)


class RbfSvmHead(_SklearnHead):
    """RBF-kernel SVM on standardised features with a sigmoid calibration.

    The SVM is fitted once on all training rows (``gamma="scale"``); the sigmoid that
    turns its decision values into probabilities is fitted on 3-fold cross-validated
    decision values (``CalibratedClassifierCV(..., ensemble=False)``), so predictions come
    from one SVM.  Multi-class is one-vs-one as in libsvm.  Kernel SVMs grow at least
    quadratically with the training rows: 28 s for 2,000 real rows, 14 min for 5,000 hard
    synthetic ones (4 C values, 2 cores); beyond a few thousand rows use logistic or svm.
    """

    name = "rbf-svm"
    description = "RBF-kernel SVM with calibrated probabilities, C chosen by cross-validation on train"
    param_name = "estimator__C"
    min_per_class = 3

    def grid(self, n_train, folds):
        return tuple(sorted(self.params.rbf_c_grid))

    def folds_wanted(self):
        return self.params.rbf_cv_folds

    def fit(self, train, val=None, groups=None):
        if len(train[1]) > 10_000:
            log.warning("rbf-svm on %d training rows may take hours (kernel SVMs grow at least quadratically); "
                        "logistic or svm fit in seconds", len(train[1]))
        return super().fit(train, val, groups)

    def beyond(self, grid, best, room):
        """No extension: a kernel SVM at a larger C can take many times longer (the edge is said)."""
        return None

    def make(self, value):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        svc = SVC(C=value, kernel="rbf", gamma="scale", class_weight=self.params.class_weight,
                  random_state=self.params.seed, cache_size=500)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=3, ensemble=False))


class KnnHead(_SklearnHead):
    """Cosine k-nearest neighbours (L2-normalised features), k chosen by stratified CV on train.

    The grid.csv train columns stay empty: distance-weighted k-NN is exact on its own rows."""

    name = "knn"
    description = "cosine k-NN, k chosen by cross-validation on train"
    grid_name = "k"
    param_name = "n_neighbors"

    default = 1
    train_scores = False
    # (train X as fitted, kmax, CV splits, each fold's neighbours in the other folds): train_proba reuses them
    loo_cache: tuple | None = None

    def fit(self, train, val=None, groups=None):
        """As the other grid heads; the CV's neighbours are kept (not saved) for ``train_proba``."""
        self.loo_cache = None
        rows = super().fit(train, val, groups)
        if self.loo_cache is not None:
            self.loo_cache = (train[0], *self.loo_cache[1:])
        return rows

    def grid(self, n_train, folds):
        # every k must fit in the smallest CV training part (all of train without CV)
        room = n_train - math.ceil(n_train / folds) if folds else n_train
        return tuple(sorted({int(k) for k in self.params.k_grid if k <= room})) or (1,)

    def make(self, value):
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import Normalizer

        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=int(value), weights="distance",
                                                                algorithm="brute", metric="euclidean"))

    def beyond(self, grid, best, room):
        """One step of the grid (the last gap) beyond its edge, within 1 and ``room``; None when not at
        an edge or when there is no room."""
        if 0 < best < len(grid) - 1:
            return None
        k = grid[0] - (grid[1] - grid[0]) if best == 0 else grid[-1] + (grid[-1] - grid[-2])
        k = min(max(int(k), 1), room)
        return None if k in grid else k

    def fold_table(self, Xp, y, grid, splits):
        """Neighbours once (for the largest k and one step beyond it, so that extending the grid costs
        nothing), each pair of folds multiplied once; every k scored from them."""
        from pipeline.heads.fastcv import Progress, knn_blocks, knn_neighbours, knn_table

        if self.cv_cache is None or self.cv_cache[0] < max(grid):
            room = min(len(tr) for tr, _ in splits)
            kmax = max(max(grid), self.beyond(grid, len(grid) - 1, room) or 0) if len(grid) > 1 else max(grid)
            bar = Progress(self.name, knn_blocks(splits), self.progress)
            try:
                self.cv_cache = (kmax, knn_neighbours(Xp, splits, kmax, lambda what: bar.tick(None, what)))
            finally:
                bar.close()
            self.loo_cache = (None, *self.cv_cache[:1], splits, self.cv_cache[1])  # for train_proba
        return knn_table(y, grid, splits, self.cv_cache[1])

    def train_proba(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Leave-one-out probabilities of the rows the head was fitted on (``X``, ``y``, in order): each
        row's k neighbours among the other rows, voted as ``predict_proba`` votes. In-sample, every
        row is its own nearest neighbour at distance 0 (train accuracy 1, log loss 0).  When ``X`` is
        the array the CV ran on, its neighbours in the other folds are reused (only the rows within
        each fold are multiplied); otherwise every pair of rows, in float32 blocks as in the CV."""
        from pipeline.heads.fastcv import knn_leave_one_out, knn_vote

        norm, knn = self.model.steps[0][1], self.model.steps[-1][1]
        n = len(X)
        if n < 2:
            return self.predict_proba(X)
        k = int(knn.n_neighbors)
        kept = self.loo_cache
        reuse = kept is not None and kept[0] is X and kept[1] >= k
        dist, ind = knn_leave_one_out(norm.transform(np.asarray(X)), k, *(kept[2:] if reuse else ()))
        codes = np.searchsorted(knn.classes_, np.asarray(y)[ind])
        votes = knn_vote(dist, codes, dist.shape[1], len(knn.classes_))
        proba = np.zeros((n, self.n_classes))
        proba[:, knn.classes_.astype(int)] = votes
        return proba


class DenseHead(Head):
    """A small Keras network: normalise → dropout → dense(relu) → dropout → sigmoid/softmax."""

    name = "dense"
    description = "small Keras network, early stopping on a 10% slice of train, best epoch restored"
    file = "head.keras"
    tensorboard: Path | None = None  # TensorBoard logs here (fit-head --tensorboard)

    def build(self, dim: int, train_X: np.ndarray | None = None,
              stats: tuple[np.ndarray, np.ndarray] | None = None):
        """The compiled network, its normalisation adapted to ``train_X``, or set from ``stats`` (the
        per-feature mean and population variance of the training rows, as a streamed fit computes them)."""
        import keras

        keras.utils.set_random_seed(self.params.seed)
        # Global rescale first: untrained bases can give features ~1e-16, below Normalization's epsilon.
        if train_X is not None:
            scale = float(np.std(train_X))
        elif stats is not None:  # np.std over every element, from the per-feature moments
            mean, var = (np.asarray(a, dtype=np.float64) for a in stats)
            scale = float(np.sqrt(max(0.0, float(np.mean(var + mean ** 2)) - float(np.mean(mean)) ** 2)))
        else:
            scale = 1.0
        scale = 1.0 / scale if np.isfinite(scale) and scale > 0 else 1.0
        norm = keras.layers.Normalization(name="normalize")
        if train_X is not None:
            norm.adapt(np.asarray(train_X, dtype=np.float32) * np.float32(scale))
        elif stats is not None:  # the state adapt() would leave: mean and variance of the rescaled rows
            norm.build((None, dim))
            norm.set_weights([(mean * scale).astype("float32"), (var * scale ** 2).astype("float32"),
                              np.asarray(0, dtype=norm.get_weights()[2].dtype)])
            norm.finalize_state()
        binary = self.n_classes == 2
        inputs = keras.Input(shape=(dim,), name="features")
        x = keras.layers.Rescaling(scale, name="rescale")(inputs)
        x = norm(x)
        x = keras.layers.Dropout(min(0.2, self.params.dropout))(x)
        x = keras.layers.Dense(self.params.hidden, activation="relu")(x)
        x = keras.layers.Dropout(self.params.dropout)(x)
        outputs = keras.layers.Dense(1 if binary else self.n_classes,
                                     activation="sigmoid" if binary else "softmax", name="probabilities")(x)
        model = keras.Model(inputs, outputs, name="dense_head")
        model.compile(optimizer=keras.optimizers.Adam(self.params.learning_rate),
                      loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=False,
                      steps_per_execution=16)  # fewer Python round trips per epoch: 2-3x faster on CPU
        return model

    def tune_split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fit rows, tune rows) of train: a seeded, stratified ``tune_fraction`` slice for early
        stopping (plain seeded slice when a class is too small to stratify)."""
        return tune_split(y, self.params.tune_fraction, self.params.seed)

    def fit(self, train, val=None, groups=None):
        """Early stopping on a slice of train (best epoch restored); ``val`` is only scored per epoch.
        ``groups`` is not used (the tuning slice is a plain stratified slice)."""
        fit_idx, tune_idx = self.tune_split(train[1])
        X, y = train[0][fit_idx], train[1][fit_idx]
        Xt, yt = train[0][tune_idx], train[1][tune_idx]
        self.model = self.build(X.shape[1], X)
        return self.train_model((X, y.astype("float32")), (Xt, yt.astype("float32")), y, len(tune_idx), val)

    def train_model(self, data, tune_data, y_fit: np.ndarray, n_tune: int, val: Split | None) -> list[dict]:
        """Train the built ``self.model`` on ``data`` (``(X, y)`` arrays, or a Keras ``PyDataset`` that
        shuffles itself) with early stopping on ``tune_data``; one row per epoch; sets the tuning record."""
        import keras

        weights = None
        if self.params.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            present = np.unique(y_fit)
            w = compute_class_weight("balanced", classes=present, y=y_fit)
            weights = {int(c): float(v) for c, v in zip(present, w)}
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.params.patience,
                                             restore_best_weights=True)
        timer = _EpochTimer()
        monitor = _Monitor(self, val)  # after the timer: the monitor's predict is not counted as training
        board = [keras.callbacks.TensorBoard(log_dir=str(self.tensorboard))] if self.tensorboard else []
        arrays = isinstance(data, tuple)
        hist = self.model.fit(*(data if arrays else (data,)), validation_data=tune_data,
                              epochs=self.params.epochs, class_weight=weights, callbacks=[stop, timer, monitor, *board],
                              verbose=0, shuffle=arrays, **({"batch_size": self.params.batch_size} if arrays else {}))
        h = hist.history
        rows = []
        for epoch in range(len(h["loss"])):
            v = monitor.scores[epoch] if epoch < len(monitor.scores) else (None, None)
            rows.append({"epoch": epoch + 1,
                         "train_accuracy": float(h["accuracy"][epoch]), "train_loss": float(h["loss"][epoch]),
                         "tune_accuracy": float(h["val_accuracy"][epoch]), "tune_loss": float(h["val_loss"][epoch]),
                         "val_accuracy": v[0], "val_loss": v[1],
                         "seconds": round(timer.seconds[epoch], 4) if epoch < len(timer.seconds) else 0.0})
        best = int(np.argmin(h["val_loss"])) + 1
        self.chosen = {"best_epoch": best, "epochs_run": len(rows)}
        self.tuning = {"method": f"early stopping on a {self.params.tune_fraction:.0%} stratified slice of train",
                       "param": "epochs", "chosen": best, "epochs_run": len(rows),
                       "tune_rows": int(n_tune), "cv_accuracy": rows[best - 1]["tune_accuracy"],
                       "cv_log_loss": rows[best - 1]["tune_loss"], "val_used_for_tuning": False}
        log.info("dense: best epoch %d of %d on the train slice (loss %.4f)", best, len(rows), min(h["val_loss"]))
        return rows

    def predict_proba(self, X):
        p = np.asarray(self.model.predict(X, batch_size=1024, verbose=0), dtype=np.float64)
        if self.n_classes == 2:
            p = np.concatenate([1 - p, p], axis=1)
        return normalise_proba(p)  # exact in float64

    def save(self, folder):
        path = Path(folder) / self.file
        self.model.save(path)
        return path

    @classmethod
    def load(cls, folder):
        import keras

        model = keras.saving.load_model(Path(folder) / cls.file, compile=False)  # inference only
        units = model.output_shape[-1]
        head = cls(2 if units == 1 else units, HeadParams())
        head.model = model
        return head


class _EpochTimer:
    """Keras callback recording seconds per epoch (plain class: works on every backend)."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._t)

        return Timer()


class _Monitor:
    """Keras callback scoring the val split after each epoch (for the curve only; chooses nothing)."""

    def __new__(cls, head: "DenseHead", val: Split | None):
        import keras

        class Monitor(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.scores: list[tuple[float | None, float | None]] = []

            def on_epoch_end(self, epoch, logs=None):
                if val is None or not len(val[1]):
                    self.scores.append((None, None))
                    return
                self.scores.append(accuracy_and_log_loss(head.predict_proba(val[0]), val[1]))

        return Monitor()


HEADS: dict[str, type[Head]] = {h.name: h for h in (LogisticHead, DenseHead, SvmHead, RbfSvmHead, KnnHead)}


def get_head(name: str) -> type[Head]:
    """Look a head up by name; unknown names list the valid ones."""
    key = name.strip().lower()
    if key not in HEADS:
        import difflib

        close = difflib.get_close_matches(key, list(HEADS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown head '{name}'; {hint}valid heads: {', '.join(HEADS)}")
    return HEADS[key]


def load_head(folder: str | Path) -> Head:
    """Load a fitted head from its folder (``<folder>/model/head.json`` + ``head.joblib`` | ``head.keras``)."""
    import json

    folder = Path(folder)
    if (folder / "model" / "head.json").is_file():
        folder = folder / "model"
    meta = folder / "head.json"
    if not meta.is_file():
        raise UsageError(f"{folder} is not a fitted head folder (no head.json); run 'tlpipe fit-head' first")
    info = json.loads(meta.read_text())
    return get_head(info["head"]).load(folder)
