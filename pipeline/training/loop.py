"""The epoch loop and the head-folder writer shared by the image-training stages
(``tlpipe fine-tune`` and ``tlpipe baseline``).

``train_epochs`` runs epoch 0 (the model as built: scored, never trained), then epochs until
``epochs`` or until the loss on the early-stopping slice of train has not improved for
``patience`` epochs; it writes a checkpoint after every epoch (weights, optimizer state,
progress) so that the same command resumes after a kill, and restores the best epoch's weights
at the end.  Val is only scored after each epoch for the curve: it chooses nothing.

``score_splits`` and ``write_outputs`` give the head-folder schema (metrics.json,
evaluation.json, history.csv, predictions.csv, roc.csv, figures/, model/head.json and
model.keras).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.reporting.curves import ROC_COLUMNS
from pipeline.reporting.curves import roc_rows as roc_rows_of

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["split", "id", "actual", "predicted", "probability"]



def epoch_batches(n: int, batch_size: int, epoch: int, order: Callable[[int], Any], batch: Callable[[Any, int], Any]):
    """A ``keras.utils.PyDataset`` of ``ceil(n / batch_size)`` batches per epoch, starting at ``epoch``:
    ``order(epoch)`` draws the epoch's order (seeded by the epoch, so a resumed run sees what an
    uninterrupted one would), ``batch(order, i)`` builds batch ``i`` from it."""
    import math

    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = epoch
            self.order = order(epoch)

        def __len__(self):
            return math.ceil(n / batch_size)

        def __getitem__(self, i):
            return batch(self.order, i)

        def on_epoch_end(self):
            self.epoch += 1
            self.order = order(self.epoch)

    return Batches()


@dataclass
class Loop:
    """What ``train_epochs`` needs: the models, the images and the rows they train and stop on."""

    train: Any  # the training model (augmentation in front), compiled
    core: Any  # the model scored after each epoch (no augmentation)
    optimizer: Any
    images: Any  # pipeline.stage3.finetune._Images
    labels: np.ndarray  # the label of every row of ``images``
    fit_rows: np.ndarray  # train rows trained on
    tune_rows: np.ndarray  # train rows early stopping watches
    val_rows: np.ndarray  # scored after each epoch, for the curve only
    epochs: int
    patience: int
    batch_size: int
    seed: int
    ckpt: Path  # checkpoint folder
    key: dict  # what the checkpoint must have been made with to be resumed
    best: Path  # where the best epoch's weights are kept while training
    tensorboard: Path | None = None
    after_epoch: Callable[[int], None] | None = None  # test hook, called after each checkpoint
    fit_model: Any = None  # the model trained, when not ``train`` (fine-tune --views: the top on cached activations)
    batches: Callable[[int], Any] | None = None  # epoch -> training data (default: augmented image batches)
    proba: Callable[[np.ndarray], np.ndarray] | None = None  # rows -> probabilities (default: ``core`` on images)
    on_abort: Callable[[], None] | None = None  # called when training stops on an exception


def _score(lp: Loop, rows: np.ndarray) -> tuple[float | None, float | None]:
    from pipeline.stage3.finetune import _proba
    from pipeline.heads.models import _scores

    if not len(rows):
        return None, None
    proba = lp.proba(rows) if lp.proba else _proba(lp.core, lp.images, rows, lp.batch_size)
    return _scores(proba, lp.labels[rows])


def train_epochs(lp: Loop, epoch0: Callable[[float | None], dict] | None = None) -> dict:
    """Train (or resume), restore the best epoch's weights, return the state: ``history`` (one row
    per epoch, 0 included), ``best_epoch``, ``epoch`` (epochs run), ``seconds`` (training time),
    ``epoch0`` (``epoch0(val accuracy at epoch 0)``, or that accuracy)."""
    import keras

    from pipeline.stage3.finetune import _load_checkpoint, _load_weights, _save_checkpoint, image_batches

    fit_model = lp.fit_model or lp.train
    state = _load_checkpoint(lp.ckpt, lp.train, lp.optimizer, lp.key, fit_model.trainable_variables)
    if state is not None:
        if (lp.ckpt / "best.weights.h5").is_file():
            shutil.copy2(lp.ckpt / "best.weights.h5", lp.best)
        log.info("resuming from the checkpoint after epoch %d", state["epoch"])
    else:
        t0 = time.perf_counter()
        tune0, val0 = _score(lp, lp.tune_rows), _score(lp, lp.val_rows)
        lp.train.save_weights(lp.best)
        state = {"key": lp.key, "epoch": 0, "best_epoch": 0, "best_loss": tune0[1], "wait": 0, "seconds": 0.0,
                 "epoch0": epoch0(val0[0]) if epoch0 else {"val_accuracy": val0[0]},
                 "history": [{"epoch": 0, "train_accuracy": None, "train_loss": None,
                              "tune_accuracy": tune0[0], "tune_loss": tune0[1], "val_accuracy": val0[0],
                              "val_loss": val0[1], "seconds": round(time.perf_counter() - t0, 3)}]}
        _save_checkpoint(lp.ckpt, lp.train, lp.optimizer, state, lp.best)
        log.info("epoch 0 (before training): tune loss %.4f, val accuracy %.4f", tune0[1], val0[0])

    callbacks = [keras.callbacks.TensorBoard(log_dir=str(lp.tensorboard))] if lp.tensorboard else []
    try:
        while state["epoch"] < lp.epochs and state["wait"] < lp.patience:
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            data = (lp.batches(epoch) if lp.batches
                    else image_batches(lp.images, lp.labels, lp.fit_rows, lp.batch_size, True, lp.seed, epoch))
            h = fit_model.fit(data, epochs=epoch, initial_epoch=epoch - 1, verbose=0, callbacks=callbacks).history
            seconds = time.perf_counter() - t0
            tune, val = _score(lp, lp.tune_rows), _score(lp, lp.val_rows)
            state["history"].append({"epoch": epoch, "train_accuracy": float(h["accuracy"][-1]),
                                     "train_loss": float(h["loss"][-1]), "tune_accuracy": tune[0],
                                     "tune_loss": tune[1], "val_accuracy": val[0], "val_loss": val[1],
                                     "seconds": round(seconds, 3)})
            state["epoch"], state["seconds"] = epoch, state["seconds"] + seconds
            if tune[1] < state["best_loss"]:
                state.update(best_epoch=epoch, best_loss=tune[1], wait=0)
                lp.train.save_weights(lp.best)
            else:
                state["wait"] += 1
            _save_checkpoint(lp.ckpt, lp.train, lp.optimizer, state, lp.best)
            log.info("epoch %d: train %.4f, tune loss %.4f, val accuracy %.4f (%.1f s)", epoch,
                     h["accuracy"][-1], tune[1], val[0], seconds)
            if lp.after_epoch is not None:
                lp.after_epoch(epoch)
    except BaseException:
        lp.images.close()  # the checkpoint of the last finished epoch stays: the same command resumes
        if lp.on_abort:
            lp.on_abort()
        raise
    _load_weights(lp.train, lp.best)  # the best epoch on the train slice
    return state


def tuning_record(state: dict, tune_fraction: float, n_tune: int) -> dict[str, Any]:
    """evaluation.json ``tuning`` for epochs chosen by early stopping on a slice of train."""
    from pipeline.stage3.finetune import TUNE_METHOD

    best, hist = int(state["best_epoch"]), state["history"]
    return {"method": TUNE_METHOD if abs(tune_fraction - 0.1) < 1e-9
            else f"early stopping on a {tune_fraction:.0%} stratified slice of train",
            "param": "epochs", "chosen": best, "epochs_run": int(state["epoch"]), "tune_rows": int(n_tune),
            "cv_accuracy": hist[best]["tune_accuracy"], "cv_log_loss": hist[best]["tune_loss"],
            "val_used_for_tuning": False}


def score_splits(core, images, rows: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 ids: dict[str, list[str]], classes: list[str], batch_size: int,
                 proba: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per split: metrics, confusion matrix and per-class scores; val/test prediction rows; the val
    ROC rows (one-vs-rest per class beyond two).  ``proba(rows)`` replaces ``core`` on the images when given."""
    from pipeline.stage3.finetune import _proba
    from pipeline.stage2.fit_head import evaluate, per_class

    k = len(classes)
    splits: dict[str, Any] = {}
    pred_rows: list[dict[str, Any]] = []
    roc_rows: list[dict[str, Any]] = []
    score = proba or (lambda r: _proba(core, images, r, batch_size))
    for name in rows:
        p = score(rows[name])
        y = labels[name]
        splits[name] = {**evaluate(p, y, k), **per_class(p, y, classes)}
        if name != "train":
            pred_rows += [{"split": name, "id": i, "actual": classes[a], "predicted": classes[c],
                           "probability": round(float(pr.max()), 6)}
                          for i, a, c, pr in zip(ids[name], y, p.argmax(1), p)]
        if name == "val":
            roc_rows = roc_rows_of(y, p, classes)  # one-vs-rest per class beyond two
    return splits, pred_rows, roc_rows


def write_outputs(tmp: Path, *, head_json: dict, metrics: dict, evaluation: dict, history: list[dict],
                  pred_rows: list[dict], roc_rows: list[dict], export_model, metadata: dict) -> None:
    """The head-folder files in ``tmp`` (then renamed into place by the caller)."""
    from pipeline.deploy.export import _save_keras
    from pipeline.stage2.fit_head import _write_csv
    from pipeline.heads.models import GRID_COLUMNS, HISTORY_COLUMNS
    from pipeline.reporting.plots import write_head_figures
    from pipeline.core.util import write_json

    (tmp / "model").mkdir(parents=True, exist_ok=True)
    write_json(tmp / "model" / "head.json", head_json)
    export_model.trainable = False
    _save_keras(export_model, metadata, tmp / "model.keras")
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "evaluation.json", evaluation)
    _write_csv(tmp / "history.csv", history, HISTORY_COLUMNS)
    _write_csv(tmp / "grid.csv", [], GRID_COLUMNS)
    _write_csv(tmp / "predictions.csv", pred_rows, PREDICTION_COLUMNS)
    _write_csv(tmp / "roc.csv", roc_rows, ROC_COLUMNS)
    write_head_figures(tmp)


def training_and_export(core, size: int, augment: str, seed: int, name: str) -> tuple[Any, Any]:
    """(training model: uint8 images -> augmentation -> ``core``; export model: uint8 images of any
    size -> the in-graph resize decoding does -> ``core``), sharing ``core``'s layers."""
    import keras

    from pipeline.deploy.export import _resize
    from pipeline.stage3.finetune import augmentation_layers

    t_in = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    y = keras.layers.Rescaling(1.0, name="to_float")(t_in)  # uint8 -> float32 for the augmentation layers
    for layer in augmentation_layers(augment, seed):
        y = layer(y)
    train = keras.Model(t_in, core(y), name="training")
    e_in = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    export = keras.Model(e_in, core(_resize(e_in, size)), name=name)
    return train, export
