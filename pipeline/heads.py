"""The table of heads fitted on cached features: one interface, one row each.

Every head implements ``fit(train, val) -> history rows``, ``predict_proba(X)``,
``save(folder)`` and ``load(folder)``.  Hyper-parameters (C, k) are chosen on the
validation split; the dense head uses early stopping on validation loss and
restores its best epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class HeadParams:
    """Knobs shared by the heads (each head reads the ones it uses)."""

    seed: int = 0
    # logistic / svm: inverse regularisation strengths tried, best on validation
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    # rbf-svm: C values tried (a kernel SVM wants larger C than a linear one)
    rbf_c_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    # knn: neighbour counts tried
    k_grid: tuple[int, ...] = (1, 5, 11, 21)
    # dense
    hidden: int = 256
    dropout: float = 0.5
    learning_rate: float = 1e-3
    batch_size: int = 256
    epochs: int = 50
    patience: int = 5
    class_weight: str | None = None  # None or "balanced"
    extra: dict[str, Any] = field(default_factory=dict)


def _val_score(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, -log loss): higher is better; log loss breaks accuracy ties."""
    from sklearn.metrics import log_loss

    acc = float((proba.argmax(1) == y).mean())
    ll = float(log_loss(y, proba, labels=np.arange(proba.shape[1])))
    return acc, -ll


def _history_row(step: int, param: float, model_proba: Callable, train, val) -> dict[str, float]:
    from sklearn.metrics import log_loss

    row: dict[str, float] = {"step": step, "param": param}
    for name, (X, y) in (("train", train), ("val", val)):
        p = model_proba(X)
        row[f"{name}_accuracy"] = float((p.argmax(1) == y).mean())
        row[f"{name}_loss"] = float(log_loss(y, p, labels=np.arange(p.shape[1])))
    return row


class Head:
    """Base class: a fitted classifier on feature vectors."""

    name = ""
    description = ""

    def __init__(self, n_classes: int, params: HeadParams):
        self.n_classes = n_classes
        self.params = params
        self.chosen: dict[str, Any] = {}

    def fit(self, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> list[dict]:
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, folder: Path) -> Path:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path) -> "Head":
        raise NotImplementedError


class _SklearnHead(Head):
    """Heads that are a scikit-learn pipeline chosen over a grid on the validation split."""

    file = "head.joblib"
    grid_name = "C"
    param_name = "C"  # parameter of the pipeline's final estimator that the grid sets

    def make(self, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def grid(self) -> tuple:
        return self.params.c_grid

    def fit(self, train, val):
        """Fit the preprocessing once, then the final estimator for each grid value (ascending,
        warm-started where the estimator supports it); keep the best on validation."""
        import copy

        from sklearn.pipeline import Pipeline

        grid = sorted(self.grid())
        template = self.make(grid[0])
        prep = Pipeline(template.steps[:-1]).fit(train[0], train[1]) if len(template.steps) > 1 else None
        Xt = prep.transform(train[0]) if prep is not None else train[0]
        Xv = prep.transform(val[0]) if prep is not None else val[0]
        estimator = template.steps[-1][1]
        if "warm_start" in estimator.get_params():
            estimator.set_params(warm_start=True)
        # history's train columns are scored on a fixed sample (k-NN on every train row is quadratic)
        rng = np.random.default_rng(self.params.seed)
        sample = np.sort(rng.choice(len(Xt), size=min(len(Xt), 2000), replace=False))
        train_sample = (Xt[sample], train[1][sample])
        history, best, best_score = [], None, None
        for step, value in enumerate(grid):
            estimator.set_params(**{self.param_name: value})
            estimator.fit(Xt, train[1])
            history.append(_history_row(step, value, estimator.predict_proba, train_sample, (Xv, val[1])))
            score = _val_score(estimator.predict_proba(Xv), val[1])
            if best_score is None or score > best_score:
                best, best_score = (value, copy.deepcopy(estimator)), score
        best[1].set_params(**({"warm_start": False} if "warm_start" in best[1].get_params() else {}))
        self.chosen = {self.grid_name: best[0]}
        fitted_prep = prep.steps if prep is not None else []
        self.model = Pipeline(fitted_prep + [(template.steps[-1][0], best[1])])
        log.info("%s: chose %s=%s on validation (accuracy %.4f)", self.name, self.grid_name, best[0], best_score[0])
        return history

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
                     "model": self.model}, path)
        return path

    @classmethod
    def load(cls, folder):
        import joblib

        data = joblib.load(Path(folder) / cls.file)
        head = cls(data["n_classes"], HeadParams())
        head.model, head.chosen = data["model"], data["chosen"]
        return head


class LogisticHead(_SklearnHead):
    """Standardised features + (multinomial) logistic regression, C chosen on validation."""

    name = "logistic"
    description = "scikit-learn logistic regression, C chosen on validation"

    def make(self, value):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        cw = self.params.class_weight
        return make_pipeline(StandardScaler(), LogisticRegression(C=value, max_iter=500, class_weight=cw,
                                                                  random_state=self.params.seed))


class SvmHead(_SklearnHead):
    """Linear SVM on standardised features with sigmoid-calibrated probabilities."""

    name = "svm"
    description = "linear SVM with calibrated probabilities, C chosen on validation"
    param_name = "estimator__C"

    def make(self, value):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        svc = LinearSVC(C=value, class_weight=self.params.class_weight, random_state=self.params.seed,
                        max_iter=5000)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=3))


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
    description = "RBF-kernel SVM with calibrated probabilities, C chosen on validation"
    param_name = "estimator__C"

    def grid(self):
        return self.params.rbf_c_grid

    def fit(self, train, val):
        if len(train[1]) > 10_000:
            log.warning("rbf-svm on %d training rows may take hours (kernel SVMs grow at least quadratically); "
                        "logistic or svm fit in seconds", len(train[1]))
        return super().fit(train, val)

    def make(self, value):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        svc = SVC(C=value, kernel="rbf", gamma="scale", class_weight=self.params.class_weight,
                  random_state=self.params.seed, cache_size=500)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=3, ensemble=False))


class KnnHead(_SklearnHead):
    """Cosine k-nearest neighbours (L2-normalised features), k chosen on validation."""

    name = "knn"
    description = "cosine k-NN, k chosen on validation"
    grid_name = "k"
    param_name = "n_neighbors"

    def grid(self):
        return self.params.k_grid

    def make(self, value):
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import Normalizer

        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=int(value), weights="distance",
                                                                algorithm="brute", metric="euclidean"))

    def fit(self, train, val):
        n = len(train[1])
        original = self.params.k_grid
        self.params.k_grid = tuple(k for k in original if k <= n) or (1,)
        try:
            return super().fit(train, val)
        finally:
            self.params.k_grid = original


class DenseHead(Head):
    """A small Keras network: normalise → dropout → dense(relu) → dropout → sigmoid/softmax."""

    name = "dense"
    description = "small Keras network, early stopping on validation loss, best epoch restored"
    file = "head.keras"

    def build(self, dim: int, train_X: np.ndarray | None = None):
        import keras

        keras.utils.set_random_seed(self.params.seed)
        # Global rescale first: untrained bases can give features ~1e-16, below Normalization's epsilon.
        scale = float(np.std(train_X)) if train_X is not None else 1.0
        scale = 1.0 / scale if np.isfinite(scale) and scale > 0 else 1.0
        norm = keras.layers.Normalization(name="normalize")
        if train_X is not None:
            norm.adapt(np.asarray(train_X, dtype=np.float32) * np.float32(scale))
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

    def fit(self, train, val):
        import keras

        X, y = train
        self.model = self.build(X.shape[1], X)
        weights = None
        if self.params.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            present = np.unique(y)
            w = compute_class_weight("balanced", classes=present, y=y)
            weights = {int(c): float(v) for c, v in zip(present, w)}
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.params.patience,
                                             restore_best_weights=True)
        timer = _EpochTimer()
        hist = self.model.fit(X, y.astype("float32"), validation_data=(val[0], val[1].astype("float32")),
                              epochs=self.params.epochs, batch_size=self.params.batch_size,
                              class_weight=weights, callbacks=[stop, timer], verbose=0, shuffle=True)
        h = hist.history
        rows = []
        for epoch in range(len(h["loss"])):
            rows.append({"step": epoch + 1, "param": epoch + 1,
                         "train_accuracy": float(h["accuracy"][epoch]), "val_accuracy": float(h["val_accuracy"][epoch]),
                         "train_loss": float(h["loss"][epoch]), "val_loss": float(h["val_loss"][epoch]),
                         "seconds": timer.seconds[epoch] if epoch < len(timer.seconds) else 0.0})
        best = int(np.argmin(h["val_loss"])) + 1
        self.chosen = {"best_epoch": best, "epochs_run": len(rows)}
        log.info("dense: best epoch %d of %d (val loss %.4f)", best, len(rows), min(h["val_loss"]))
        return rows

    def predict_proba(self, X):
        p = np.asarray(self.model.predict(X, batch_size=1024, verbose=0), dtype=np.float64)
        if self.n_classes == 2:
            p = np.concatenate([1 - p, p], axis=1)
        return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)  # exact in float64

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


HEADS: dict[str, type[Head]] = {h.name: h for h in (LogisticHead, DenseHead, SvmHead, RbfSvmHead, KnnHead)}


def get_head(name: str) -> type[Head]:
    """Look a head up by name; unknown names list the valid ones."""
    key = name.strip().lower()
    if key not in HEADS:
        raise UsageError(f"unknown head '{name}'; valid heads: {', '.join(HEADS)}")
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
