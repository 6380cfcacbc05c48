"""The from-scratch baseline: the Keras tutorials' small convnet trained on the images alone.

What transfer learning is measured against (Chollet's "cats vs dogs" convnet, *Deep Learning
with Python* ch. 8): no ImageNet base, random initial weights::

    uint8[N, S, S, 3] -> augmentation (training model only) -> Rescaling(1/255)
      -> 4 x [Conv2D(32, 64, 128, 256; 3x3, relu) -> MaxPooling2D(2)] -> Conv2D(256, 3x3, relu)
      -> Flatten -> Dropout(0.5) -> Dense(K, softmax) -> probabilities [N, K]

The convolutions pad ("same") so that any input size from 16 px works (the book's 180 px gives
11 x 11 x 256 before the Dense layer).  The data are read as ``tlpipe extract`` reads them (the
same source, split and decoding; undecodable files are skipped), and the training loop is
fine-tune's (``pipeline.training.loop``): the same augmentation layers (training only), early stopping
on a seeded stratified 10 % slice of train (never val), the best epoch restored, a checkpoint
after each epoch and resume after a kill.  ``cache/baseline/NAME/`` (NAME: the data folder's or
tfds dataset's name) has the head-folder schema and a ``model.keras`` with the contract of
``tlpipe export`` (uint8 images of any size in, probabilities out, built-in layers only).
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import __version__
from pipeline.core.errors import UsageError
from pipeline.core.util import require_tensorboard
from pipeline.data.images import DecodeError
from pipeline.data.sources import Item, decode_item, open_source
from pipeline.heads.metrics import chance
from pipeline.heads.models import DenseHead, HeadParams
from pipeline.nets.graph import probabilities_layer
from pipeline.training.augment import DEFAULT_AUGMENT, normalise_augment, parse_augment
from pipeline.training.checkpoint import CHECKPOINT, guard_resumable
from pipeline.training.images import MEMO_BYTES, Images
from pipeline.training.loop import (
    Loop,
    publish,
    run_record,
    score_splits,
    train_epochs,
    training_and_export,
    tuning_record,
)

log = logging.getLogger(__name__)

MODEL = "scratch-cnn"  # evaluation.json base and head
WEIGHTS = "scratch"  # evaluation.json weights: random initial weights, trained on the images
DEFAULT_SIZE = 180
MIN_SIZE = 16  # four 2x2 poolings


@dataclass
class BaselineConfig:
    """Everything ``baseline`` needs."""

    data: str
    split: str = "80/10/10"
    input_size: int = DEFAULT_SIZE
    epochs: int = 30
    lr: float = 3e-4  # Adam, as the Keras "image classification from scratch" example
    augment: str = DEFAULT_AUGMENT
    batch_size: int = 32
    patience: int = 5
    seed: int = 0
    limit: int = 0  # at most this many images per split (0: all)
    tensorboard: Path | None = None
    out: Path | None = None  # default: <cache_dir>/baseline/<data name>
    cache_dir: Path = Path("cache")
    force: bool = False
    tfds_data_dir: str | None = None
    workers: int = 0  # decode threads (0: up to 4)
    tune_fraction: float = 0.1
    after_epoch: Callable[[int], None] | None = None  # test hook, called after each checkpoint

    def settings(self) -> dict[str, Any]:
        """What determines the result (recorded; a folder made from other settings is not replaced)."""
        return {"model": MODEL, "input_size": self.input_size, "epochs": self.epochs, "lr": self.lr,
                "augment": normalise_augment(self.augment), "batch_size": self.batch_size,
                "patience": self.patience, "seed": self.seed, "tune_fraction": self.tune_fraction,
                "split": self.split, "limit": self.limit}


def data_name(data: str) -> str:
    """The output folder's name for a data source: ``tfds:cats_vs_dogs`` -> ``cats_vs_dogs``,
    ``../shared/data/trashnet`` -> ``trashnet``."""
    text = str(data).strip()
    name = text[5:] if text.startswith("tfds:") else Path(text).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "data"


def output_dir(cfg: BaselineConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.cache_dir) / "baseline" / data_name(cfg.data)


def build_cnn(size: int, n_classes: int):
    """The tutorials' small convnet: uint8[N, size, size, 3] -> probabilities [N, K] (built-in layers)."""
    import keras

    image = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 255, dtype="float32", name="rescale")(image)
    for i, filters in enumerate((32, 64, 128, 256), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    return keras.Model(image, probabilities_layer(x, n_classes), name="scratch_cnn")


def read_images(source, size: int, workers: int, chunk: int = 256):
    """Decode every item of every split once (skipping undecodable ones, as extraction does).

    Returns ``(images, rows, labels, ids, skipped)``: a ``pipeline.training.images.Images`` over the kept
    items (decoded images kept in memory within its budget), and per split the item rows, labels and ids.
    """
    memo = sum(source.counts.values()) * size * size * 3 <= MEMO_BYTES
    kept = _Kept(memo)
    rows, labels, ids = {}, {}, {}
    with ThreadPoolExecutor(workers or 4) as pool:
        for split in source.splits:
            start = len(kept.items)
            batch: list = []
            for item in source.iter_items(split):
                batch.append(item)
                if len(batch) >= chunk:
                    kept.add(split, batch, pool.map(lambda it: _decode_or_error(it, size), batch))
                    batch = []
            kept.add(split, batch, pool.map(lambda it: _decode_or_error(it, size), batch))
            rows[split] = np.arange(start, len(kept.items))
            labels[split] = np.asarray([it.label for it in kept.items[start:]], dtype=np.int64)
            ids[split] = [it.id for it in kept.items[start:]]
    for s in kept.skipped:
        log.warning("skipped %s/%s: %s", s["split"], s["id"], s["reason"])
    images = Images(kept.items, size, workers, memo)
    if images.memo is not None:
        images.memo.update(kept.decoded)
    return images, rows, labels, ids, kept.skipped


def _decode_or_error(item, size: int):
    try:
        return decode_item(item, size)
    except DecodeError as exc:
        return exc


class _Kept:
    """The items that decoded (tfds: with the small decoded image, not the original), their decoded
    images when kept in memory, and the skipped ones with their reason."""

    def __init__(self, memo: bool):
        self.memo = memo
        self.items: list = []
        self.decoded: dict[int, np.ndarray] = {}
        self.skipped: list[dict[str, str]] = []

    def add(self, split: str, batch: list, arrays) -> None:
        for item, arr in zip(batch, arrays):
            if isinstance(arr, Exception):
                self.skipped.append({"split": split, "id": item.id, "reason": str(arr)})
                continue
            if item.array is not None:
                item = Item(item.id, item.label, None, arr)
            if self.memo:
                self.decoded[len(self.items)] = arr
            self.items.append(item)


def _check(cfg: BaselineConfig) -> None:
    """Refuse bad settings before anything slow."""
    if cfg.epochs < 1 or cfg.patience < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UsageError("--epochs, --patience and --batch-size must be at least 1 and --lr above 0")
    if cfg.input_size < MIN_SIZE:
        raise UsageError(f"--input-size must be at least {MIN_SIZE} (the convnet pools four times)")
    parse_augment(cfg.augment)
    if cfg.tensorboard:
        require_tensorboard()


def _check_rows(cfg: BaselineConfig, rows: dict, labels: dict) -> None:
    if "val" not in rows or not len(rows["val"]):
        raise UsageError(f"{cfg.data} has no val images; give a --split with a val share")
    if len(np.unique(labels["train"])) < 2:
        raise UsageError(f"the train split of {cfg.data} has a single class; need at least two")


def _train(cfg: BaselineConfig, out: Path, source, images: Images, rows: dict, labels: dict, k: int
           ) -> tuple[dict, Any, Any, int]:
    """Build the convnet and train (or resume) it to its best epoch; return the state, the scored model,
    the export model and the size of the tune slice."""
    import keras  # after the checks: a usage error does not wait for TensorFlow

    keras.utils.set_random_seed(cfg.seed)
    size = int(cfg.input_size)
    core = build_cnn(size, k)
    name = re.sub(r"[^A-Za-z0-9_]", "_", f"tlpipe_{MODEL}")
    train_model, export = training_and_export(core, size, cfg.augment, cfg.seed, name)
    optimizer = keras.optimizers.Adam(cfg.lr)
    train_model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                        jit_compile=False)
    core.compile(jit_compile=False)
    tuner = DenseHead(k, HeadParams(seed=cfg.seed, tune_fraction=cfg.tune_fraction))
    fit_idx, tune_idx = tuner.tune_split(labels["train"])
    # not --epochs: the state after an epoch does not depend on the cap, so a run stopped for time can be
    # finished with a smaller --epochs (or continued with a larger one) from its checkpoint
    key = {"settings": {k: v for k, v in cfg.settings().items() if k != "epochs"},
           "fingerprint": source.fingerprint, "data": cfg.data}
    out.mkdir(parents=True, exist_ok=True)
    loop = Loop(train=train_model, core=core, optimizer=optimizer, images=images,
                labels=np.concatenate([labels[s] for s in rows]), fit_rows=rows["train"][fit_idx],
                tune_rows=rows["train"][tune_idx], val_rows=rows["val"], epochs=cfg.epochs, patience=cfg.patience,
                batch_size=cfg.batch_size, seed=cfg.seed, ckpt=out / CHECKPOINT, key=key, best=_best_path(out),
                tensorboard=cfg.tensorboard, after_epoch=cfg.after_epoch)
    return train_epochs(loop), core, export, len(tune_idx)


def _best_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.best.weights.h5")


def _evaluation(cfg: BaselineConfig, source, state: dict, tuning: dict, splits: dict, labels: dict,
                skipped: list, n_params: int) -> dict:
    """evaluation.json."""
    seconds, hist = round(state["seconds"], 3), state["history"]
    info = {"model": MODEL, "layers": "4 x (Conv2D 3x3 relu + MaxPooling2D 2), Conv2D 256, Flatten, Dropout 0.5, "
                                      "Dense softmax", "trainable_parameters": n_params, "input_size": int(cfg.input_size),
            **run_record(state, lr=cfg.lr, augment=normalise_augment(cfg.augment), batch_size=cfg.batch_size,
                         patience=cfg.patience, epochs=cfg.epochs),
            "skipped": skipped}
    return {
        "base": MODEL, "head": MODEL, "features": [], "weights": [WEIGHTS], "data_source": source.spec,
        "split_spec": source.split_spec, "limit": int(cfg.limit or 0), "classes": list(source.class_names),
        "feature_size": None, "fit_seconds": seconds, "extract_images_per_second": None, "tuning": tuning,
        "baseline": info, "splits": splits, "chance": chance(labels, len(source.class_names)),
        "untrained": {"val": {"accuracy": hist[0]["val_accuracy"], "log_loss": hist[0]["val_loss"]}},
    }


def baseline(cfg: BaselineConfig) -> Path:
    """Train the small convnet from scratch on ``cfg.data``; write the output folder and return it."""
    _check(cfg)
    source = open_source(cfg.data, cfg.split, cfg.tfds_data_dir, limit=cfg.limit or None)
    out = output_dir(cfg)
    settings = cfg.settings()
    new_meta = {"head": MODEL, "fingerprints": [source.fingerprint], "params": settings}
    guard_resumable(out, new_meta, cfg.force)

    classes, size = list(source.class_names), int(cfg.input_size)
    images, rows, labels, ids, skipped = read_images(source, size, cfg.workers)
    _check_rows(cfg, rows, labels)
    state, core, export, n_tune = _train(cfg, out, source, images, rows, labels, len(classes))
    splits, parts, roc = score_splits(core, images, rows, labels, ids, classes, cfg.batch_size)
    images.close()
    tuning = tuning_record(state, cfg.tune_fraction, n_tune)
    n_params = int(sum(np.prod(v.shape) for v in core.trainable_variables))
    metadata = {"base": MODEL, "head": MODEL, "input_size": size, "input_sizes": [size], "weights": WEIGHTS,
                "class_names": classes, "data_source": source.spec, "baseline": settings}
    head_json = {**new_meta, "description": "small convnet trained from scratch on the images (no base)",
                 "classes": classes, "base": MODEL, "features": [], "data_source": source.spec,
                 "tuning": tuning, "tlpipe_version": __version__}
    metrics = publish(out, head_json=head_json, state=state, parts=parts, roc=roc, classes=classes,
                      evaluation=_evaluation(cfg, source, state, tuning, splits, labels, skipped, n_params),
                      export_model=export, metadata=metadata)
    _best_path(out).unlink(missing_ok=True)
    log.info("%s on %s: val accuracy %.4f, %d epochs, %.1f s -> %s", MODEL, source.spec,
             metrics["val"]["accuracy"], state["epoch"], state["seconds"], out)
    return out


def summary(out: Path) -> str:
    """A few lines for the terminal."""
    out = Path(out)
    ev = json.loads((out / "evaluation.json").read_text())
    b = ev["baseline"]
    lines = [f"{MODEL} from scratch on {ev['data_source']}: {b['trainable_parameters']:,} parameters, "
             f"{b['input_size']} px, lr {b['lr']:g}, augment {b['augment']}",
             f"  best epoch {b['best_epoch']} of {b['epochs_run']} chosen by {ev['tuning']['method']}; "
             f"val and test not used for tuning; {b['seconds']:.1f} s ({b['seconds_per_epoch']:.1f} s/epoch)"]
    for split in ("train", "val", "test"):
        s = ev["splits"].get(split)
        if s:
            lines.append(f"  {split:5s} n={s['n']:<6d} accuracy {s['accuracy']:.4f}  log_loss {s['log_loss']:.4f}")
    lines.append(f"  -> {out}")
    return "\n".join(lines)
