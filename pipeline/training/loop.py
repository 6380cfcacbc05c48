"""The epoch loop shared by the image-training stages (``tlpipe fine-tune`` and ``tlpipe baseline``), and
what they record of it.

``train_epochs`` runs epoch 0 (the model as built: scored, never trained), then epochs until
``epochs`` or until the loss on the early-stopping slice of train has not improved for
``patience`` epochs; it writes a checkpoint after every epoch (weights, optimizer state,
progress) so that the same command resumes after a kill, and restores the best epoch's weights
at the end.  Val is only scored after each epoch for the curve: it chooses nothing.

``score_splits`` and ``publish`` write the head-folder schema (``pipeline.heads.folder``) plus
``model.keras``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.heads import folder
from pipeline.heads.metrics import accuracy_and_log_loss
from pipeline.nets.graph import resize_in_graph, save_keras
from pipeline.training.augment import augmentation_layers
from pipeline.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from pipeline.training.images import Images, image_batches, predict_proba

log = logging.getLogger(__name__)

TUNE_METHOD = "early stopping on a 10% stratified slice of train"


@dataclass
class Loop:
    """What ``train_epochs`` needs: the models, the images and the rows they train and stop on."""

    train: Any  # the training model (augmentation in front), compiled
    core: Any  # the model scored after each epoch (no augmentation)
    optimizer: Any
    images: Images
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
    if not len(rows):
        return None, None
    proba = lp.proba(rows) if lp.proba else predict_proba(lp.core, lp.images, rows, lp.batch_size)
    return accuracy_and_log_loss(proba, lp.labels[rows])


def train_epochs(lp: Loop, epoch0: Callable[[float | None], dict] | None = None) -> dict:
    """Train (or resume), restore the best epoch's weights, return the state: ``history`` (one row
    per epoch, 0 included), ``best_epoch``, ``epoch`` (epochs run), ``seconds`` (training time),
    ``epoch0`` (``epoch0(val accuracy at epoch 0)``, or that accuracy)."""
    import keras

    fit_model = lp.fit_model or lp.train
    state = load_checkpoint(lp.ckpt, lp.train, lp.optimizer, lp.key, fit_model.trainable_variables)
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
        save_checkpoint(lp.ckpt, lp.train, lp.optimizer, state, lp.best)
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
            save_checkpoint(lp.ckpt, lp.train, lp.optimizer, state, lp.best)
            log.info("epoch %d: train %.4f, tune loss %.4f, val accuracy %.4f (%.1f s)", epoch,
                     h["accuracy"][-1], tune[1], val[0], seconds)
            if lp.after_epoch is not None:
                lp.after_epoch(epoch)
    except BaseException:
        lp.images.close()  # the checkpoint of the last finished epoch stays: the same command resumes
        if lp.on_abort:
            lp.on_abort()
        raise
    load_weights(lp.train, lp.best)  # the best epoch on the train slice
    return state


def tuning_record(state: dict, tune_fraction: float, n_tune: int) -> dict[str, Any]:
    """evaluation.json ``tuning`` for epochs chosen by early stopping on a slice of train."""
    best, hist = int(state["best_epoch"]), state["history"]
    return {"method": TUNE_METHOD if abs(tune_fraction - 0.1) < 1e-9
            else f"early stopping on a {tune_fraction:.0%} stratified slice of train",
            "param": "epochs", "chosen": best, "epochs_run": int(state["epoch"]), "tune_rows": int(n_tune),
            "cv_accuracy": hist[best]["tune_accuracy"], "cv_log_loss": hist[best]["tune_loss"],
            "val_used_for_tuning": False}


def score_splits(core, images: Images, rows: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 ids: dict[str, list[str]], classes: list[str], batch_size: int,
                 proba: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[dict[str, Any], list[folder.PredictionPart], list[dict[str, Any]]]:
    """``pipeline.heads.folder.score_splits`` of ``core`` on the images of each split's rows (or of
    ``proba(rows)`` when given)."""
    score = proba or (lambda r: predict_proba(core, images, r, batch_size))
    return folder.score_splits(rows, lambda name: score(rows[name]), labels, ids, classes)


def run_record(state: dict, *, lr: float, augment: str, batch_size: int, patience: int, epochs: int) -> dict:
    """The settings and course of a training run, as evaluation.json records them."""
    return {"lr": lr, "optimizer": "adam", "augment": augment, "batch_size": batch_size, "patience": patience,
            "epochs_max": epochs, "epochs_run": int(state["epoch"]), "best_epoch": int(state["best_epoch"]),
            "seconds": round(state["seconds"], 3),
            "seconds_per_epoch": round(state["seconds"] / max(1, state["epoch"]), 3)}


def publish(out: Path, *, head_json: dict, evaluation: dict, state: dict, parts: list[folder.PredictionPart],
            roc: list[dict], classes: list[str], export_model, metadata: dict) -> dict[str, Any]:
    """Write the head folder and ``model.keras`` beside ``out``, rename it into place (the checkpoint goes
    with the previous folder: the run is complete); return metrics.json's content."""
    metrics = folder.metrics_record(evaluation["splits"], state["seconds"])
    tmp = folder.temp_folder(out)
    export_model.trainable = False
    save_keras(export_model, metadata, tmp / "model.keras")
    folder.write_head_folder(tmp, head_json=head_json, metrics=metrics, evaluation=evaluation,
                             history=state["history"], predictions=folder.prediction_rows(parts, classes), roc=roc)
    folder.publish(tmp, out)  # keeps the files the user added to the previous folder
    return metrics


def training_and_export(core, size: int, augment: str, seed: int, name: str) -> tuple[Any, Any]:
    """(training model: uint8 images -> augmentation -> ``core``; export model: uint8 images of any
    size -> the in-graph resize decoding does -> ``core``), sharing ``core``'s layers."""
    import keras

    t_in = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    y = keras.layers.Rescaling(1.0, name="to_float")(t_in)  # uint8 -> float32 for the augmentation layers
    for layer in augmentation_layers(augment, seed):
        y = layer(y)
    train = keras.Model(t_in, core(y), name="training")
    e_in = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    export = keras.Model(e_in, core(resize_in_graph(e_in, size)), name=name)
    return train, export
