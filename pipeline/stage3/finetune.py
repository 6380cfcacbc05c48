"""Stage three: fine-tune the top of the base together with a fitted head, on the images.

Starts from a head fitted on cached features (``dense``, ``logistic`` folded into a
``Dense(K, softmax)`` as ``tlpipe export`` does, or ``auto`` as its affine map), so epoch 0 already
scores the head's accuracy.  A head fitted on several pooled depths (``extract --layers``) gets them
from one pass of the base, and one that predicted with the mean over each image and its mirror keeps
that mean in the model (``pipeline.stage3.start``).  The same base, weights, input size, data source, split and limit are read from the
head's features file; the rows of each split are the features file's rows (files skipped at
extraction stay out).

Model (one graph, Keras 3 only)::

    uint8[N, S, S, 3] -> augmentation (training model only) -> the base's preprocessing
      -> base(training=False: BatchNorm in inference mode, and never trainable)
         (a head on pooled depths: the base up to its deepest depth, the depths' pools side by side)
      -> head -> probabilities [N, K]   (the head's mirror mean: the same on the mirrored image, averaged)

Built-in Keras layers only, as ``tlpipe export``: ``model.keras`` (uint8 images of any size,
resized in the graph as decoding does) loads with ``keras.saving.load_model`` without tlpipe.

Only the top of the base is trainable (``--unfreeze N`` layers, ``BLOCK`` to the top, or
``all``; checked before TensorFlow starts against ``pipeline.stage3.unfreeze_table``).  Tuning is honest: the epochs are chosen by early stopping on a seeded, stratified
10 % slice of train (the best epoch, epoch 0 included, is restored); val is only scored after
each epoch for the curve.  A checkpoint after each epoch (weights, optimizer state, epoch,
best so far, history) in ``<out>/.checkpoint/`` lets the same command resume after a kill
or Ctrl-C.  The output folder ``cache/finetuned/FEATURES-HEAD/`` has the head-folder schema
plus ``model.keras`` (the contract of ``tlpipe export``: uint8 images of any size in,
probabilities out).

``views=K`` (``--views K``, see ``pipeline.training.views``): the frozen bottom runs once over K views of each
fit image and the clean image of every row, its activations are cached in HDF5, and the epochs train
only the top (sharing its layers with the full model, which is what ``model.keras`` saves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import __version__
from pipeline.core.errors import FeaturesFileError, UsageError
from pipeline.core.safety import check_out_path
from pipeline.core.util import require_tensorboard
from pipeline.data.sources import old_split_rule, open_source
from pipeline.heads.folder import read_head_info
from pipeline.heads.metrics import chance
from pipeline.heads.models import DenseHead, HeadParams
from pipeline.nets.backbones import get_backbone
from pipeline.nets.depth_graph import depth_trunk, mirror_layers
from pipeline.nets.graph import build_branch, probabilities_layer
from pipeline.nets.hub import is_hub_name
from pipeline.stage3.start import (
    Start,
    check_cached_views,
    check_kind,
    check_unfreeze,
    check_weights,
    head_layers,
    read_start,
)
from pipeline.store.features import load_features, locate_head_features, read_attrs
from pipeline.training.augment import DEFAULT_AUGMENT, normalise_augment, parse_augment
from pipeline.training.checkpoint import CHECKPOINT, guard_resumable
from pipeline.training.images import MEMO_BYTES, Images, predict_proba
from pipeline.training.loop import (
    Loop,
    publish,
    run_record,
    score_splits,
    train_epochs,
    training_and_export,
    tuning_record,
)
from pipeline.training.views import Activations, build_cache, cache_key, check_views, split_model, view_batches
from pipeline.training.views import cache_path as views_cache_path
from pipeline.training.views import proba as views_proba

log = logging.getLogger(__name__)


@dataclass
class FineTuneConfig:
    """Everything ``fine_tune`` needs."""

    head: Path  # a fitted head folder: cache/heads/FEATURES-HEAD
    unfreeze: str = "block"  # N layers from the top, a block name, "all", or "block": the base's last block
    epochs: int = 10
    lr: float = 1e-5  # Adam
    augment: str = DEFAULT_AUGMENT  # or "none"
    batch_size: int = 32
    patience: int = 3
    out: Path | None = None  # default: <cache_dir>/finetuned/<head folder name>
    force: bool = False
    tensorboard: Path | None = None
    weights: str | None = None  # default: as recorded in the features file
    cache_dir: Path = Path("cache")
    seed: int = 0
    tune_fraction: float = 0.1
    workers: int = 0  # decode threads (0: up to 4)
    views: int | None = None  # K: cache the frozen bottom's activations of K views per training image
    after_epoch: Callable[[int], None] | None = None  # test hook, called after each checkpoint

    def settings(self) -> dict[str, Any]:
        """What determines the result (recorded; a folder made from other settings is not replaced)."""
        return {"unfreeze": str(self.unfreeze), "epochs": self.epochs, "lr": self.lr,
                "augment": normalise_augment(self.augment), "batch_size": self.batch_size,
                "patience": self.patience, "seed": self.seed, "tune_fraction": self.tune_fraction,
                "weights": self.weights, **({"views": self.views} if self.views else {})}


# ----------------------------------------------------------------------------- unfreezing


def _is_bn(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def block_names(base) -> list[str]:
    """The block names of a base, in order of first appearance, found from its layer names.

    A block is a prefix of layer names, cut at ``_``, that ends in a token with a digit and is
    shared by at least two layers (``block5`` in VGG16, ``conv5``/``conv5_block3`` in ResNet,
    ``conv_dw_13`` in MobileNet), or the name of a layer that joins branches (``mixed9`` in
    InceptionV3)."""
    names = [layer.name for layer in base.layers[1:]]
    counts: dict[str, int] = {}
    for n in names:
        tokens = n.split("_")
        for i in range(1, len(tokens) + 1):
            if tokens[i - 1][-1:].isdigit():  # block5, conv5, 13 (not conv2d)
                key = "_".join(tokens[:i])
                counts[key] = counts.get(key, 0) + 1
    joins = _joins(base)
    valid = {k for k, c in counts.items() if c >= 2} | joins
    order: list[str] = []
    for n in names:
        tokens = n.split("_")
        for i in range(1, len(tokens) + 1):
            key = "_".join(tokens[:i])
            if key in valid and key not in order:
                order.append(key)
    return order


def _joins(base) -> set[str]:
    """Names like ``mixed9``: layers joining branches, named with a number and no ``_``."""
    import keras

    return {layer.name for layer in base.layers
            if isinstance(layer, (keras.layers.Concatenate, keras.layers.Add)) and re.search(r"\d$", layer.name)
            and "_" not in layer.name}


def _in_block(name: str, block: str) -> bool:
    return name == block or name.startswith(block + "_")


def unfreeze_start(base, spec: str) -> int:
    """Index in ``base.layers`` of the first layer to train, from ``N``, ``BLOCK``, ``all`` or ``block``."""
    layers = base.layers
    n_layers = len(layers) - 1  # the InputLayer is not counted
    text = str(spec).strip()
    if text.lower() == "all":
        return 1
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if not 1 <= n <= n_layers:
            raise UsageError(f"--unfreeze {n} is out of range: {base.name} has {n_layers} layers "
                             f"(give 1..{n_layers}, a block name, or all)")
        return len(layers) - n
    blocks = block_names(base)
    if text.lower() == "block":  # default: the last top-level block (not inside another block)
        top = [b for b in blocks if not any(o != b and _in_block(b, o) for o in blocks)]
        if not top:
            raise UsageError(f"{base.name} has no named blocks; give --unfreeze N or all")
        text = max(top, key=lambda b: next(i for i, l in enumerate(layers) if _in_block(l.name, b)))
    if text not in blocks:
        raise UsageError(f"--unfreeze: unknown block '{text}' for {base.name}; valid blocks: {', '.join(blocks)} "
                         "(or a number of layers, or all)")
    joins = _joins(base)
    if text in joins:  # a layer that ends its block (InceptionV3's mixedN): from after the previous one
        at = next(i for i, layer in enumerate(layers) if layer.name == text)
        before = [i for i, layer in enumerate(layers[:at]) if layer.name in joins]
        return before[-1] + 1 if before else 1
    first = next(i for i, layer in enumerate(layers) if _in_block(layer.name, text))
    # also take the unnamed layers just before it that belong to no other block (InceptionV3's convs
    # before 'mixed9' belong to mixed9)
    start = first
    while start > 1 and not any(_in_block(layers[start - 1].name, b) for b in blocks if not _in_block(text, b)):
        start -= 1
    return start


def set_trainable(base, start: int) -> list[str]:
    """Train ``base.layers[start:]`` except BatchNorm; freeze the rest. Return the trainable layers'
    names that hold weights."""
    base.trainable = True
    names = []
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not _is_bn(layer)
        if layer.trainable and layer.weights:
            names.append(layer.name)
    return names


# ----------------------------------------------------------------------------- model


@dataclass
class _Built:
    core: Any  # uint8[N, S, S, 3] -> probabilities
    train: Any  # core with augmentation in front (training only)
    export: Any  # uint8 any size -> Resizing -> core
    base: Any
    trainable: list[str]
    start: int = 1  # index in base.layers of the first trainable layer
    pre: list | None = None  # the layers before the base (cast to float32, the base's preprocessing)
    head_fn: Any = None  # the head's layers, features -> scores (before the probabilities layer)
    size: int = 0
    k: int = 0


def build_models(head_dir: Path, info: dict, attrs: dict, weights: str | None, unfreeze: str, augment: str,
                 seed: int, metadata: dict, start: Start | None = None) -> _Built:
    """The core, training and export models sharing one set of layers.  ``start`` (default: read from
    the head folder): the head's kind, the pooled depths it reads and whether it averages with the mirror."""
    import keras

    from pipeline.nets.extractor import builtin_preprocess  # Keras: imported when a model is built

    start = start or read_start(Path(head_dir).parent, Path(head_dir), info, attrs)
    k = len(info["classes"])
    if start.depths:  # several pooled depths: one pass of the base computes them (as tlpipe export)
        backbone, size, pooling, base, winfo = depth_trunk(attrs, weights, start.depths,
                                                           name=f"{attrs['base']}_depths".replace(".", "_"))
        base_name = backbone.name
    else:
        branch = build_branch(attrs, weights, 0, False)
        base_name, size, pooling, base, winfo = branch.base, branch.size, branch.pooling, branch.model, branch.weights
    head_fn, dim = head_layers(start, Path(head_dir), k, int(info["feature_size"]))
    if int(base.output_shape[-1]) != dim:
        raise UsageError(f"{base_name} gives {base.output_shape[-1]} features"
                         f"{' at ' + ', '.join(start.depths) if start.depths else ''} but the head expects {dim}")
    first = unfreeze_start(base, unfreeze)
    trainable = set_trainable(base, first)

    # built-in layers only (as tlpipe export): model.keras loads with plain keras.saving.load_model
    image = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    pre = [keras.layers.Rescaling(1.0, dtype="float32", name="to_float"), *builtin_preprocess(get_backbone(base_name))]
    x = image
    for layer in pre:
        x = layer(x)
    out = head_fn(base(x, training=False))  # BatchNorm in inference mode, whatever the rest does
    if start.mirror:  # the head predicted with the mean over the image and its mirror: so does the model
        mirrored = head_fn(base(mirror_layers(x, size), training=False))
        out = keras.layers.Average(name="mean_with_mirror")([out, mirrored])
    x = probabilities_layer(out, k)
    metadata.update({"base": base_name, "input_size": size, "input_sizes": [size], "pooling": pooling,
                     "weights": winfo.label, "weights_sha256": winfo.sha256, **start.record(),
                     "class_names": list(info["classes"])})  # saved in the .keras zip, as export does
    name = re.sub(r"[^A-Za-z0-9_]", "_", f"tlpipe_{base_name}_{info['head']}_ft")
    core = keras.Model(image, x, name="finetuned")
    train, export = training_and_export(core, size, augment, seed, name)  # export: the same resize as decoding
    return _Built(core, train, export, base, trainable, first, pre, head_fn, size, k)


# ----------------------------------------------------------------------------- main


def _read_head(head_dir: Path, cache_dir: Path) -> tuple[Path, dict, Path, dict, dict, Start]:
    """(model dir, head.json, features path, features attrs, head evaluation.json, what the fine-tuning
    starts from); bad input -> UsageError."""
    if not Path(head_dir).exists():
        raise UsageError(f"head folder not found: {head_dir} (fit one with 'tlpipe fit-head')")
    model_dir, info = read_head_info(head_dir)
    check_kind(info)
    feats = info.get("features") or []
    if len(feats) != 1:
        raise UsageError(f"fine-tune cannot rebuild a head fitted on fused features ({len(feats)} files); "
                         "fit a head on one features file")
    try:
        path = locate_head_features(feats[0], head_dir, cache_dir)
        attrs = read_attrs(path)
    except (FeaturesFileError, OSError) as exc:
        raise UsageError(f"the head's features file is needed to rebuild its data and base: {exc}") from None
    if is_hub_name(str(attrs.get("base", ""))):
        raise UsageError(f"fine-tune unfreezes blocks of keras.applications bases; {attrs['base']} is a KerasHub "
                         "base (not supported yet): its heads export and predict as they are")
    if attrs.get("fingerprint") != (info.get("fingerprints") or [None])[0]:
        raise UsageError(f"{path} was extracted again after {head_dir} was fitted (stale head); "
                         "fit the head again first")
    ev_path = Path(head_dir) / "evaluation.json"
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
    return model_dir, info, path, attrs, evaluation, read_start(Path(head_dir), model_dir, info, attrs)


def split_rows(fs, source) -> tuple[list, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[str]]]:
    """All items of the splits (features-file order) and per split the item rows, labels and ids."""
    items: list = []
    rows, labels, ids = {}, {}, {}
    for name, split in fs.splits.items():
        by_id = {it.id: it for it in source.iter_items(name)}
        missing = [i for i in split.ids if i not in by_id]
        if missing:
            raise UsageError(f"{len(missing)} {name} images of the features file are no longer in the data "
                             f"(e.g. {missing[0]}); extract again")
        rows[name] = np.arange(len(items), len(items) + len(split.ids))
        items += [by_id[i] for i in split.ids]
        labels[name] = np.asarray(split.y)
        ids[name] = list(split.ids)
    return items, rows, labels, ids



def output_dir(cfg: FineTuneConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.cache_dir) / "finetuned" / Path(cfg.head).resolve().name


@dataclass
class _Job:
    """What the head folder and its features file say, read once."""

    head_dir: Path
    model_dir: Path
    info: dict  # the head's head.json
    feat_path: Path
    attrs: dict  # the features file's attributes
    head_eval: dict  # the head's evaluation.json
    out: Path
    name: str  # "<head>+ft"
    settings: dict
    new_meta: dict  # what the output folder is guarded with
    fs: Any  # the features file (splits, ids, labels)
    items: list
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    ids: dict[str, list[str]]
    start: Start  # the head's kind, depths and mirror


def _check(cfg: FineTuneConfig) -> None:
    """Refuse bad settings before anything slow."""
    if cfg.epochs < 1 or cfg.patience < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UsageError("--epochs, --patience and --batch-size must be at least 1 and --lr above 0")
    check_views(cfg.views)
    parse_augment(cfg.augment)
    if cfg.tensorboard:
        require_tensorboard()


def _open_job(cfg: FineTuneConfig) -> _Job:
    """Read the head and its features file, check the output is writable, and find the images of every row."""
    head_dir = Path(cfg.head)
    model_dir, info, feat_path, attrs, head_eval, start = _read_head(head_dir, Path(cfg.cache_dir))
    check_unfreeze(str(attrs["base"]), cfg.unfreeze, start.depths)  # a wrong block: one line, no TensorFlow
    check_weights(attrs, cfg.weights)
    check_cached_views(start, cfg.views)
    out, name, settings = output_dir(cfg), f"{info['head']}+ft", cfg.settings()
    new_meta = {"head": name, "fingerprints": list(info.get("fingerprints") or []), "params": settings}
    check_out_path(out, "folder")  # unwritable: one line before TensorFlow starts
    fs = load_features(feat_path)
    source = open_source(str(attrs["data_source"]), str(attrs.get("split_spec") or "80/10/10"),
                         limit=int(attrs.get("limit") or 0) or None)
    if attrs.get("source_fingerprint") and source.fingerprint != attrs.get("source_fingerprint"):
        raise UsageError(f"{feat_path} was {old_split_rule(attrs)}" if old_split_rule(attrs) else
                         f"the images of {attrs['data_source']} changed since {feat_path} was extracted; "
                         "extract again, then fit the head again")
    items, rows, labels, ids = split_rows(fs, source)
    return _Job(head_dir, model_dir, info, feat_path, attrs, head_eval, out, name, settings, new_meta, fs,
                items, rows, labels, ids, start)


@dataclass
class _Views:
    """``--views K``: the frozen bottom's cached activations and the top trained on them."""

    split: Any  # pipeline.training.views.Split
    acts: Activations
    info: dict[str, Any]  # evaluation.json fine_tune.views_cache


def _cache_views(cfg: FineTuneConfig, job: _Job, built: _Built, metadata: dict, images: Images,
                 fit_rows: np.ndarray) -> _Views:
    """Run the frozen bottom once, over K views of the fit images and the clean image of every row."""
    split = split_model(built)
    key_fields = {"features_fingerprint": job.attrs.get("fingerprint"), "weights": metadata.get("weights"),
                  "weights_sha256": metadata.get("weights_sha256"), "input_size": built.size,
                  "start": built.start, "start_layer": split.start_layer, "views": cfg.views,
                  "augment": normalise_augment(cfg.augment), "seed": cfg.seed,
                  "tune_fraction": cfg.tune_fraction, "n_rows": len(job.items),
                  "fit_rows": hashlib.sha256(np.asarray(fit_rows, np.int64).tobytes()).hexdigest()}
    path = views_cache_path(job.out, cache_key(key_fields))
    try:
        info = build_cache(path, key_fields, split, images, len(job.items), fit_rows, cfg.views, cfg.augment,
                           cfg.seed, cfg.batch_size)
    except BaseException:
        images.close()
        raise
    acts = Activations(path, len(split.shapes))
    info.update(start_layer=split.start_layer, shapes=[list(s) for s in split.shapes], in_memory=acts.in_memory)
    return _Views(split, acts, info)


def _epoch0_check(head_eval: dict) -> Callable[[float], dict]:
    """Epoch 0's record: its val accuracy against the head's (a warning when they differ)."""

    def epoch0(val_accuracy):
        head_val = (head_eval.get("splits") or {}).get("val", {}).get("accuracy")
        if head_val is not None and abs(val_accuracy - head_val) > 0.005:
            log.warning("epoch 0 val accuracy %.4f differs from the head's %.4f: the rebuilt base or data "
                        "differ from the features'", val_accuracy, head_val)
        return {"val_accuracy": val_accuracy, "head_val_accuracy": head_val}

    return epoch0


def _train(cfg: FineTuneConfig, job: _Job, built: _Built, metadata: dict, images: Images
           ) -> tuple[dict, _Views | None, Callable[[np.ndarray], np.ndarray], int]:
    """Train (or resume) to the best epoch; return the state, the views (if any), the scorer of rows and
    the size of the tune slice."""
    import keras

    all_labels = np.concatenate([job.labels[s] for s in job.fs.splits])
    tuner = DenseHead(len(job.info["classes"]), HeadParams(seed=cfg.seed, tune_fraction=cfg.tune_fraction))
    fit_idx, tune_idx = tuner.tune_split(job.labels["train"])
    fit_rows, tune_rows = job.rows["train"][fit_idx], job.rows["train"][tune_idx]
    optimizer = keras.optimizers.Adam(cfg.lr)
    views = _cache_views(cfg, job, built, metadata, images, fit_rows) if cfg.views else None
    fit_model = views.split.top if views else built.train
    fit_model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      jit_compile=False)
    built.core.compile(jit_compile=False)

    def proba_of(rows):
        if views is not None:
            return views_proba(views.split.top, views.acts, rows, cfg.batch_size)
        return predict_proba(built.core, images, rows, cfg.batch_size)

    def views_batches(epoch):
        return view_batches(views.acts, all_labels, fit_rows, cfg.views, cfg.batch_size, cfg.seed, epoch)

    key = {"settings": job.settings, "head_fingerprints": job.info.get("fingerprints"),
           "head": str(job.head_dir.resolve()), "head_mtime": (job.model_dir / "head.json").stat().st_mtime_ns}
    job.out.mkdir(parents=True, exist_ok=True)
    loop = Loop(train=built.train, core=built.core, optimizer=optimizer, images=images, labels=all_labels,
                fit_rows=fit_rows, tune_rows=tune_rows, val_rows=job.rows["val"], epochs=cfg.epochs,
                patience=cfg.patience, batch_size=cfg.batch_size, seed=cfg.seed, ckpt=job.out / CHECKPOINT,
                key=key, best=_best_path(job.out), tensorboard=cfg.tensorboard, after_epoch=cfg.after_epoch,
                fit_model=fit_model, batches=views_batches if views else None, proba=proba_of,
                on_abort=views.acts.close if views else None)
    state = train_epochs(loop, _epoch0_check(job.head_eval))  # the best epoch (0: the head as fitted)
    return state, views, proba_of, len(tune_rows)


def _best_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.best.weights.h5")


def _fine_record(cfg: FineTuneConfig, job: _Job, built: _Built, state: dict, views: _Views | None) -> dict:
    """evaluation.json ``fine_tune``."""
    fine = {"from_head": str(job.head_dir), "from_head_name": job.info["head"], "unfreeze": str(cfg.unfreeze),
            "trainable_layers": built.trainable, "n_trainable_layers": len(built.trainable),
            "trainable_parameters": int(sum(np.prod(v.shape) for v in built.train.trainable_variables)),
            **run_record(state, lr=cfg.lr, augment=normalise_augment(cfg.augment), batch_size=cfg.batch_size,
                         patience=cfg.patience, epochs=cfg.epochs),
            "epoch0_val_accuracy": state["epoch0"]["val_accuracy"],
            "head_val_accuracy": state["epoch0"]["head_val_accuracy"],
            "batchnorm": "inference mode, frozen", **job.start.record()}
    if views is not None:
        fine["views"] = cfg.views
        fine["views_sampling"] = ("each epoch, one view per fit image, drawn uniformly from the K cached views "
                                  "(view 0: un-augmented); tune slice, val and test scored on un-augmented images")
        fine["views_cache"] = views.info
    return fine


def _evaluation(job: _Job, fine: dict, tuning: dict, splits: dict, state: dict) -> dict:
    """evaluation.json."""
    classes, attrs, fs = list(job.info["classes"]), job.attrs, job.fs
    return {
        "base": fs.base, "head": job.name, "features": [str(job.feat_path)],
        "weights": [str(attrs.get("weights", ""))], "data_source": str(attrs.get("data_source", "")),
        "limit": int(attrs.get("limit") or 0), "classes": classes, "feature_size": int(job.info["feature_size"]),
        "fit_seconds": round(state["seconds"], 3), "extract_images_per_second": None, "tuning": tuning,
        "fine_tune": fine, "splits": splits,
        "chance": chance({s: job.labels[s] for s in fs.splits}, len(classes)),
        "untrained": job.head_eval.get("untrained", {}),
        "head_before": {s: (job.head_eval.get("splits") or {}).get(s, {}).get("accuracy") for s in fs.splits},
    }


def fine_tune(cfg: FineTuneConfig) -> Path:
    """Fine-tune the head's base and head on the images; write the output folder and return it.

    Every value is checked (options, head, data, --unfreeze against the base's table, --weights) before
    an existing --out is compared with this run's settings, and all before TensorFlow is imported: the
    real mistake is named first, in one line."""
    _check(cfg)
    job = _open_job(cfg)
    guard_resumable(job.out, job.new_meta, cfg.force)
    import keras  # after the checks: a usage error does not wait for TensorFlow

    keras.utils.set_random_seed(cfg.seed)
    metadata = {"head": job.name, "head_dir": str(job.head_dir), "features": job.info.get("features"),
                "fingerprints": job.info.get("fingerprints"), "fine_tune": job.settings}
    built = build_models(job.model_dir, job.info, job.attrs, cfg.weights, cfg.unfreeze, cfg.augment, cfg.seed,
                         metadata, job.start)
    size = built.size
    memo = not cfg.views and len(job.items) * size * size * 3 <= MEMO_BYTES  # views: each image decoded once
    images = Images(job.items, size, cfg.workers, memo)
    state, views, proba_of, n_tune = _train(cfg, job, built, metadata, images)
    classes = list(job.info["classes"])
    splits, parts, roc = score_splits(built.core, images, job.rows, job.labels, job.ids, classes, cfg.batch_size,
                                      proba=proba_of)
    if views is not None:  # the shipped model on the images against its top on the cached activations
        check = job.rows["val"][:16] if len(job.rows["val"]) else job.rows["train"][:16]
        diff = np.abs(predict_proba(built.core, images, check, cfg.batch_size) - proba_of(check)).max()
        views.info["check_rows"], views.info["check_max_abs_diff"] = int(len(check)), float(diff)
        views.acts.close()
    images.close()
    fine = _fine_record(cfg, job, built, state, views)
    tuning = tuning_record(state, cfg.tune_fraction, n_tune)
    head_json = {**job.new_meta, "description": "fine-tuned base top + head, end to end on the images",
                 "classes": classes, "base": job.fs.base, "features": [str(job.feat_path)],
                 "feature_size": int(job.info["feature_size"]), "from_head": str(job.head_dir), "tuning": tuning,
                 "tlpipe_version": __version__}
    metrics = publish(job.out, head_json=head_json, evaluation=_evaluation(job, fine, tuning, splits, state),
                      state=state, parts=parts, roc=roc, classes=classes, export_model=built.export,
                      metadata=metadata)
    _best_path(job.out).unlink(missing_ok=True)
    log.info("%s on %s: val accuracy %.4f (head %.4f), %d epochs, %.1f s -> %s", job.name, job.fs.base,
             metrics["val"]["accuracy"], fine["head_val_accuracy"] or float("nan"), state["epoch"],
             state["seconds"], job.out)
    return job.out


def summary(out: Path) -> str:
    """A few lines for the terminal."""
    out = Path(out)
    ev = json.loads((out / "evaluation.json").read_text())
    f = ev["fine_tune"]
    lines = [f"{ev['head']} on {ev['base']}: {f['n_trainable_layers']} layers with weights trainable "
             f"(--unfreeze {f['unfreeze']}), lr {f['lr']:g}, augment {f['augment']}",
             f"  best epoch {f['best_epoch']} of {f['epochs_run']} chosen by {ev['tuning']['method']}; "
             f"val and test not used for tuning; {f['seconds']:.1f} s ({f['seconds_per_epoch']:.1f} s/epoch)"]
    if f.get("views"):
        c = f.get("views_cache") or {}
        built = "reused" if c.get("reused") else f"built in {c.get('build_seconds', 0):.1f} s"
        lines.append(f"  --views {f['views']}: bottom activations at {c.get('start_layer')} cached ({built}): "
                     f"{c.get('path')}")
    for split in ("train", "val", "test"):
        s = ev["splits"].get(split)
        if s:
            before = ev.get("head_before", {}).get(split)
            b = f"  (head {before:.4f})" if before is not None else ""
            lines.append(f"  {split:5s} n={s['n']:<6d} accuracy {s['accuracy']:.4f}  log_loss {s['log_loss']:.4f}{b}")
    lines.append(f"  -> {out}")
    return "\n".join(lines)
