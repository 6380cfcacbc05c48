"""Checkpoints of the image-training loop: weights, optimizer state and progress after every epoch, so
that the same command resumes after a kill."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from pipeline.core.safety import guard_head_folder, replace_dir
from pipeline.core.util import write_json

log = logging.getLogger(__name__)

CHECKPOINT = ".checkpoint"  # the checkpoint folder inside the output folder


def save_checkpoint(ckpt: Path, model, optimizer, state: dict, best_weights: Path | None) -> None:
    """Weights, optimizer state and progress, written to a temp folder then renamed into place."""
    import keras

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_weights(tmp / "last.weights.h5")
    np.savez(tmp / "optimizer.npz", *[keras.ops.convert_to_numpy(v) for v in optimizer.variables])
    if best_weights is not None and best_weights.is_file():
        shutil.copy2(best_weights, tmp / "best.weights.h5")
    write_json(tmp / "state.json", state)
    replace_dir(tmp, ckpt)


def load_weights(model, path: Path) -> None:
    """Model weights only (the optimizer state travels separately, in optimizer.npz)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def load_checkpoint(ckpt: Path, model, optimizer, key: dict, train_vars=None) -> dict | None:
    """The progress saved by ``save_checkpoint``, with the weights and optimizer state restored; None when
    there is none, or it was made with another ``key``, or it is unusable (then training starts over)."""
    state_path = ckpt / "state.json"
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
        if state.get("key") != key:
            log.warning("%s was made with other settings; starting over", ckpt)
            return None
        load_weights(model, ckpt / "last.weights.h5")
        saved = np.load(ckpt / "optimizer.npz")
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        optimizer.build(model.trainable_variables if train_vars is None else train_vars)
        if len(arrays) != len(optimizer.variables):
            raise ValueError("optimizer state does not match")
        for var, arr in zip(optimizer.variables, arrays):
            var.assign(arr)
    except Exception as exc:  # noqa: BLE001 - an unusable checkpoint: start over
        log.warning("checkpoint %s is unusable (%s); starting over", ckpt, exc)
        return None
    return state


def guard_resumable(out: Path, new: dict, force: bool) -> None:
    """``guard_head_folder``, except that a folder holding only our checkpoint is resumed, not refused."""
    if out.exists() and all(p.name == CHECKPOINT for p in out.iterdir()):
        return
    guard_head_folder(out, new, force)
