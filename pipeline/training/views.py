"""Cached views for fine-tuning (``tlpipe fine-tune --views K``).

The frozen bottom of the fine-tuning model (the base's preprocessing and every base layer below the
first trainable one) gives the same activations at every epoch for the same input image, because it
has no trainable weight and its BatchNorm layers run in inference mode.  So it runs once:

* over the un-augmented image of every row (train, val, test): dataset ``clean_I`` (float32), and
* over ``K - 1`` augmented views of every row of the fit part of train (train less the 10 % tune
  slice): dataset ``views_I`` (float16, or float32 where the clean activations pass 1e4), shape
  ``[n_fit, K - 1, ...]``.  View 0 is the clean image.

``I`` numbers the tensors that cross the unfreeze point (one for chain bases such as MobileNet and
VGG, more where a residual branch skips over it).  Each epoch then trains only the top (the trainable
layers of the base and the head) on one view per fit image, drawn uniformly from the K views with a
generator seeded by (seed, epoch); the tune slice, val and test are scored on the clean activations.

The file ``<out parent>/.<out name>.views/views-<key>.h5`` is keyed by what determines its content
(features fingerprint, weights, unfreeze point, K, augmentation, seed, tune fraction, the rows), so a
rerun or a resumed run with the same settings reuses it, and other learning rates or epochs do too.
It is written in chunks (a killed build continues where it stopped) and read batch by batch from the
file when larger than ``MEMORY_BYTES``, else loaded into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.heads.metrics import normalise_proba
from pipeline.nets.graph import probabilities_layer
from pipeline.training.augment import augmentation_layers
from pipeline.training.images import Images, epoch_batches

log = logging.getLogger(__name__)

MEMORY_BYTES = 2 << 30  # a views file up to this size is read into memory
FORMAT = 1  # bump when the file layout changes


@dataclass
class Split:
    """The base cut at the unfreeze point."""

    bottom: Any  # float32 image [N, S, S, 3] (0..255) -> list of frontier activations
    top: Any  # list of frontier activations -> probabilities (shares the layers of the full model)
    shapes: list[tuple[int, ...]]  # per frontier tensor, without the batch axis
    start_layer: str  # the first trainable layer of the base


def split_model(built) -> Split:
    """Cut ``built`` (``pipeline.stage3.finetune.build_models``) at its first trainable base layer."""
    import keras

    base, start = built.base, built.start
    index = {layer.name: i for i, layer in enumerate(base.layers)}
    frontier: list = []
    for layer in base.layers[start:]:
        for t in keras.tree.flatten(layer.input):
            if index[t._keras_history.operation.name] < start and all(t is not f for f in frontier):
                frontier.append(t)
    if not frontier:  # unfreeze all: the cut is the base's input
        frontier = [base.input]
    base_bottom = keras.Model(base.input, frontier, name="views_bottom_base")
    base_top = keras.Model(frontier, base.output, name="views_top_base")
    shapes = [tuple(int(d) for d in t.shape[1:]) for t in frontier]

    image = keras.Input(shape=(built.size, built.size, 3), dtype="float32", name="image")
    x = image
    for layer in built.pre:
        x = layer(x)
    outs = keras.tree.flatten(base_bottom(x, training=False))
    bottom = keras.Model(image, outs, name="views_bottom")

    ins = [keras.Input(shape=s, dtype="float32", name=f"activations_{i}") for i, s in enumerate(shapes)]
    y = base_top(ins if len(ins) > 1 else ins[0], training=False)  # BatchNorm in inference mode
    y = probabilities_layer(built.head_fn(y), built.k)
    top = keras.Model(ins, y, name="views_top")
    return Split(bottom, top, shapes, base.layers[start].name)


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**fields, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(out: Path, key: str) -> Path:
    return out.parent / f".{out.name}.views" / f"views-{key}.h5"


def _aug_model(spec: str, size: int, seed: int):
    """A fresh, seeded augmentation stack (float32 in and out), so each chunk's views are reproducible."""
    import keras

    x = inp = keras.Input(shape=(size, size, 3), dtype="float32")
    for layer in augmentation_layers(spec, seed):
        x = layer(x)
    return keras.Model(inp, x)


def build_cache(path: Path, key_fields: dict[str, Any], split: Split, images: Images, n_rows: int,
                fit_rows: np.ndarray, views: int, augment: str, seed: int, batch_size: int) -> dict[str, Any]:
    """Write (or finish, or reuse) the views file; return what it cost."""
    import h5py

    key_json = json.dumps({**key_fields, "format": FORMAT}, sort_keys=True)
    if _reusable(path, key_json):
        log.info("views cache reused: %s", path)
        return {"path": str(path), "reused": True, "bottom_images_run": 0, "build_seconds": 0.0}
    part = path.with_name(path.name + ".part")
    t0 = time.perf_counter()
    with h5py.File(part, "a") as f:
        _start_file(f, key_json, split.shapes, n_rows)
        run = _write_clean(f, split, images, n_rows, batch_size)
        if views > 1:
            run += _write_views(f, split, images, fit_rows, views, augment, seed, batch_size)
        f.attrs["complete"] = True
    part.rename(path)
    seconds = time.perf_counter() - t0
    log.info("views cache: %d bottom passes in %.1f s -> %s", run, seconds, path)
    return {"path": str(path), "reused": False, "bottom_images_run": run, "build_seconds": round(seconds, 3)}


def _reusable(path: Path, key_json: str) -> bool:
    """True when ``path`` is a complete views file for ``key_json``; otherwise clear the way for a new one
    (one views file per output folder: other keys go)."""
    import h5py

    if path.is_file():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("key") == key_json and f.attrs.get("complete"):
                    return True
        except OSError:
            pass
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("views-*.h5*"):
        if old.name not in (path.name, path.name + ".part"):
            old.unlink()
    return False


def _start_file(f, key_json: str, shapes: list[tuple[int, ...]], n_rows: int) -> None:
    """Keep a partial file made with the same key (to continue it); else empty it and lay out the clean
    datasets."""
    if f.attrs.get("key") == key_json:
        return
    for name in list(f):
        del f[name]
    for name in list(f.attrs):
        del f.attrs[name]
    f.attrs["key"] = key_json
    f.attrs["clean_done"] = 0
    f.attrs["views_done"] = 0
    for i, s in enumerate(shapes):
        f.create_dataset(f"clean_{i}", (n_rows, *s), "float32", chunks=(1, *s))


def _write_clean(f, split: Split, images: Images, n_rows: int, batch_size: int) -> int:
    """The bottom's activations of the un-augmented image of every row; return the images run."""
    done, run = int(f.attrs["clean_done"]), 0
    if done:
        log.info("views cache: continuing an interrupted build at clean row %d", done)
    for s in range(done, n_rows, batch_size):
        rows = np.arange(s, min(n_rows, s + batch_size))
        acts = _run(split.bottom, images.get(rows).astype("float32"))
        for i, a in enumerate(acts):
            f[f"clean_{i}"][s:s + len(rows)] = a
        run += len(rows)
        f.attrs["clean_done"] = s + len(rows)
        f.flush()
    return run


def _write_views(f, split: Split, images: Images, fit_rows: np.ndarray, views: int, augment: str, seed: int,
                 batch_size: int) -> int:
    """The bottom's activations of ``views - 1`` augmented views of every fit row; return the images run."""
    n_fit, run = len(fit_rows), 0
    size = int(split.bottom.input_shape[1])
    if "views_0" not in f:
        # float16 halves the file; float32 where the clean activations come near float16's range
        peak = max(_peak(f[f"clean_{i}"], batch_size) for i in range(len(split.shapes)))
        dtype = "float16" if peak < 1e4 else "float32"
        for i, s in enumerate(split.shapes):
            f.create_dataset(f"views_{i}", (n_fit, views - 1, *s), dtype, chunks=(1, 1, *s))
    for s in range(int(f.attrs["views_done"]), n_fit, batch_size):
        chunk = np.arange(s, min(n_fit, s + batch_size))
        x = images.get(fit_rows[chunk]).astype("float32")
        for v in range(1, views):
            aug = _aug_model(augment, size, _seed(seed, v, s))
            acts = _run(split.bottom, np.asarray(aug(x, training=True)))
            for i, a in enumerate(acts):
                f[f"views_{i}"][s:s + len(chunk), v - 1] = a
            run += len(chunk)
        f.attrs["views_done"] = s + len(chunk)
        f.flush()
        if (s // batch_size) % 10 == 0:
            log.info("views cache: %d of %d fit images (%d views each)", s + len(chunk), n_fit, views - 1)
    return run


def _peak(ds, batch: int) -> float:
    return max([float(np.abs(ds[s:s + batch * 8]).max()) for s in range(0, len(ds), batch * 8)] or [0.0])


def _seed(seed: int, view: int, start: int) -> int:
    return int(np.random.default_rng([seed, view, start]).integers(0, 2**31 - 1))


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    out = model.predict_on_batch(x)
    return [np.asarray(a) for a in (out if isinstance(out, (list, tuple)) else [out])]


class Activations:
    """Read the views file: clean rows and (fit position, view) pairs, as float32 lists per frontier tensor."""

    def __init__(self, path: Path, n_tensors: int, memory_bytes: int | None = None):
        import h5py

        self.file = h5py.File(path, "r")
        self.n = n_tensors
        self.clean = [self.file[f"clean_{i}"] for i in range(n_tensors)]
        self.views = [self.file[f"views_{i}"] for i in range(n_tensors)] if "views_0" in self.file else None
        nbytes = sum(d.size * d.dtype.itemsize for d in self.clean + (self.views or []))
        self.in_memory = nbytes <= (MEMORY_BYTES if memory_bytes is None else memory_bytes)
        if self.in_memory:
            self.clean = [d[...] for d in self.clean]
            self.views = [d[...] for d in self.views] if self.views is not None else None
            self.file.close()
        log.info("views cache: %.2f GiB, %s", nbytes / 2**30, "in memory" if self.in_memory else "read from the file")

    def get_clean(self, rows: np.ndarray) -> list[np.ndarray]:
        rows = np.asarray(rows)
        if self.in_memory:
            return [d[rows].astype("float32") for d in self.clean]
        order = np.argsort(rows)
        back = np.argsort(order)
        return [d[rows[order]][back].astype("float32") for d in self.clean]  # h5py: increasing indices

    def get_views(self, fit_pos: np.ndarray, rows: np.ndarray, views: np.ndarray) -> list[np.ndarray]:
        """Per item: view ``v`` of fit position ``p`` (row ``r``); view 0 is the clean row."""
        out = [np.empty((len(rows), *d.shape[1:]), np.float32) for d in self.clean]
        plain = views == 0
        if plain.any():
            for o, c in zip(out, self.get_clean(rows[plain])):
                o[plain] = c
        aug = np.flatnonzero(~plain)
        if self.in_memory and len(aug):
            for o, d in zip(out, self.views):
                o[aug] = d[fit_pos[aug], views[aug] - 1]
            return out
        for j in aug:
            for o, d in zip(out, self.views):
                o[j] = d[fit_pos[j], views[j] - 1]
        return out

    def close(self) -> None:
        if not self.in_memory:
            self.file.close()


def view_batches(acts: Activations, labels: np.ndarray, fit_rows: np.ndarray, n_views: int, batch_size: int,
                 seed: int, epoch: int):
    """A ``keras.utils.PyDataset`` over the fit rows: each epoch, one view per image (uniform over the K
    views, seeded by (seed, epoch), so a resumed run draws what an uninterrupted one would)."""
    def order(e):
        rng = np.random.default_rng([seed, e, 1])
        return rng.permutation(len(fit_rows)), rng.integers(0, n_views, len(fit_rows))

    def batch(drawn, i):
        perm, view = drawn
        pos = perm[i * batch_size:(i + 1) * batch_size]
        x = acts.get_views(pos, fit_rows[pos], view[pos])
        return (x if len(x) > 1 else x[0]), labels[fit_rows[pos]].astype("int32")

    return epoch_batches(len(fit_rows), batch_size, epoch, order, batch)


def proba(top, acts: Activations, rows: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(rows), batch_size):
        x = acts.get_clean(rows[s:s + batch_size])
        out.append(np.asarray(top.predict_on_batch(x if len(x) > 1 else x[0]), np.float64))
    p = np.concatenate(out) if out else np.zeros((0, 1))
    return normalise_proba(p)


def check_views(n: int) -> None:
    if n is not None and n < 1:
        raise UsageError(f"--views {n}: give at least 1 (the number of views of each training image to cache; "
                         "1 = the un-augmented image only)")
