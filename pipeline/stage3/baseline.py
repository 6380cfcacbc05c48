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
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import __version__
from pipeline.core.errors import UsageError
from pipeline.data.images import DecodeError

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
    augment: str = "flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1"  # finetune.DEFAULT_AUGMENT
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
        from pipeline.stage3.finetune import normalise_augment

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

    from pipeline.deploy.export import _probabilities_layer

    image = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 255, dtype="float32", name="rescale")(image)
    for i, filters in enumerate((32, 64, 128, 256), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    return keras.Model(image, _probabilities_layer(x, n_classes), name="scratch_cnn")


def read_images(source, size: int, workers: int, chunk: int = 256):
    """Decode every item of every split once (skipping undecodable ones, as extraction does).

    Returns ``(images, rows, labels, ids, skipped)``: a ``finetune._Images`` over the kept items
    (decoded images kept in memory within its budget), and per split the item rows, labels and ids.
    """
    from pipeline.stage1.extract import _decode_one
    from pipeline.stage3.finetune import MEMO_BYTES, _Images
    from pipeline.data.sources import Item

    n_total = sum(source.counts.values())
    memo = n_total * size * size * 3 <= MEMO_BYTES
    pool = ThreadPoolExecutor(workers or 4)

    def one(item):
        try:
            return _decode_one(item, size)
        except DecodeError as exc:
            return exc

    items: list = []
    decoded: dict[int, np.ndarray] = {}
    rows, labels, ids, skipped = {}, {}, {}, []
    for split in source.splits:
        start, ys, names = len(items), [], []
        batch: list = []

        def flush():
            for item, arr in zip(batch, pool.map(one, batch)):
                if isinstance(arr, Exception):
                    skipped.append({"split": split, "id": item.id, "reason": str(arr)})
                    continue
                if item.array is not None:  # tfds: keep the small decoded image, not the original
                    item = Item(item.id, item.label, None, arr)
                if memo:
                    decoded[len(items)] = arr
                items.append(item)
                ys.append(item.label)
                names.append(item.id)
            batch.clear()

        for item in source.iter_items(split):
            batch.append(item)
            if len(batch) >= chunk:
                flush()
        flush()
        rows[split] = np.arange(start, len(items))
        labels[split] = np.asarray(ys, dtype=np.int64)
        ids[split] = names
    pool.shutdown()
    for s in skipped:
        log.warning("skipped %s/%s: %s", s["split"], s["id"], s["reason"])
    images = _Images(items, size, workers, memo)
    if images.memo is not None:
        images.memo.update(decoded)
    return images, rows, labels, ids, skipped


def baseline(cfg: BaselineConfig) -> Path:
    """Train the small convnet from scratch on ``cfg.data``; write the output folder and return it."""
    from pipeline.data.sources import open_source
    from pipeline.stage3.finetune import _guard, parse_augment
    from pipeline.heads.models import DenseHead, HeadParams
    from pipeline.core.safety import replace_dir
    from pipeline.training.loop import Loop, score_splits, train_epochs, training_and_export, tuning_record, write_outputs

    if cfg.epochs < 1 or cfg.patience < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UsageError("--epochs, --patience and --batch-size must be at least 1 and --lr above 0")
    if cfg.input_size < MIN_SIZE:
        raise UsageError(f"--input-size must be at least {MIN_SIZE} (the convnet pools four times)")
    parse_augment(cfg.augment)
    if cfg.tensorboard:
        from pipeline.core.util import require_tensorboard

        require_tensorboard()
    source = open_source(cfg.data, cfg.split, cfg.tfds_data_dir, limit=cfg.limit or None)
    out = output_dir(cfg)
    settings = cfg.settings()
    new_meta = {"head": MODEL, "fingerprints": [source.fingerprint], "params": settings}
    _guard(out, new_meta, cfg.force)

    classes, size = list(source.class_names), int(cfg.input_size)
    k = len(classes)
    images, rows, labels, ids, skipped = read_images(source, size, cfg.workers)
    if "val" not in rows or not len(rows["val"]):
        raise UsageError(f"{cfg.data} has no val images; give a --split with a val share")
    if len(np.unique(labels["train"])) < 2:
        raise UsageError(f"the train split of {cfg.data} has a single class; need at least two")
    all_labels = np.concatenate([labels[s] for s in rows])

    import keras  # after the checks: a usage error does not wait for TensorFlow

    keras.utils.set_random_seed(cfg.seed)
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
    key = {"settings": {k: v for k, v in settings.items() if k != "epochs"}, "fingerprint": source.fingerprint,
           "data": cfg.data}
    out.mkdir(parents=True, exist_ok=True)
    loop = Loop(train=train_model, core=core, optimizer=optimizer, images=images, labels=all_labels,
                fit_rows=rows["train"][fit_idx], tune_rows=rows["train"][tune_idx], val_rows=rows["val"],
                epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, seed=cfg.seed,
                ckpt=out / ".checkpoint", key=key, best=out.with_name(f".{out.name}.best.weights.h5"),
                tensorboard=cfg.tensorboard, after_epoch=cfg.after_epoch)
    state = train_epochs(loop)

    splits, pred_rows, roc_rows = score_splits(core, images, rows, labels, ids, classes, cfg.batch_size)
    images.close()
    hist = state["history"]
    tuning = tuning_record(state, cfg.tune_fraction, len(tune_idx))
    seconds = round(state["seconds"], 3)
    metrics: dict[str, Any] = {s: {"accuracy": splits[s]["accuracy"], "log_loss": splits[s]["log_loss"]}
                               for s in ("val", "test") if s in splits}
    metrics["fit_seconds"] = seconds
    n_params = int(sum(np.prod(v.shape) for v in core.trainable_variables))
    info = {"model": MODEL, "layers": "4 x (Conv2D 3x3 relu + MaxPooling2D 2), Conv2D 256, Flatten, Dropout 0.5, "
                                      "Dense softmax", "trainable_parameters": n_params, "input_size": size,
            "lr": cfg.lr, "optimizer": "adam", "augment": settings["augment"], "batch_size": cfg.batch_size,
            "patience": cfg.patience, "epochs_max": cfg.epochs, "epochs_run": int(state["epoch"]),
            "best_epoch": int(state["best_epoch"]), "seconds": seconds,
            "seconds_per_epoch": round(state["seconds"] / max(1, state["epoch"]), 3), "skipped": skipped}
    evaluation = {
        "base": MODEL, "head": MODEL, "features": [], "weights": [WEIGHTS], "data_source": source.spec,
        "split_spec": source.split_spec, "limit": int(cfg.limit or 0), "classes": classes,
        "feature_size": None, "fit_seconds": seconds, "extract_images_per_second": None, "tuning": tuning,
        "baseline": info, "splits": splits,
        "chance": {s: float(np.bincount(labels[s], minlength=k).max() / max(1, len(labels[s]))) for s in rows},
        "untrained": {"val": {"accuracy": hist[0]["val_accuracy"], "log_loss": hist[0]["val_loss"]}},
    }
    metadata = {"base": MODEL, "head": MODEL, "input_size": size, "input_sizes": [size], "weights": WEIGHTS,
                "class_names": classes, "data_source": source.spec, "baseline": settings}
    head_json = {**new_meta, "description": "small convnet trained from scratch on the images (no base)",
                 "classes": classes, "base": MODEL, "features": [], "data_source": source.spec,
                 "tuning": tuning, "tlpipe_version": __version__}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_outputs(tmp, head_json=head_json, metrics=metrics, evaluation=evaluation, history=hist,
                  pred_rows=pred_rows, roc_rows=roc_rows, export_model=export, metadata=metadata)
    replace_dir(tmp, out)  # the checkpoint goes with the previous folder: the run is complete
    loop.best.unlink(missing_ok=True)
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
