"""Export a fitted head and its base as one model: image in, class probabilities out.

The exported model holds, in one graph::

    uint8[N, H, W, 3] (any size) -> Resizing (bilinear, antialiased, to the base's input size)
      -> rounded to integer levels (as pipeline.data.images.decode_image's uint8 output)
      -> the base's preprocess_input as built-in layers (pipeline.nets.extractor.builtin_preprocess)
      -> frozen base + pooling -> head -> "probabilities": float32[N, K] (also for two classes)

A head fitted on fused features (several ``--features`` files: other bases, or the same
base at other input sizes) becomes one branch per file, concatenated in the head's order.
Branches at the same input size share one image input; a model whose branches need
several sizes takes one input per size, named ``image_<size>``, so that each branch sees
the image resized exactly as at extraction (``tlpipe predict`` feeds them).

Heads: ``dense`` reuses the saved Keras head; ``logistic`` folds the StandardScaler into
one Dense layer + softmax (equal to scikit-learn's ``predict_proba`` up to float32
rounding; a streamed logistic head is the same LogisticRegression).  Both use built-in Keras layers only, so their ``.keras`` file loads with
``keras.saving.load_model`` where tlpipe is not installed.  ``svm``, ``rbf-svm`` and
``knn`` become the custom layers ``CalibratedLinearSVC``, ``CalibratedRbfSVC`` and
``KnnProba`` that reproduce scikit-learn's ``predict_proba``: their ``.keras`` file needs
``import pipeline.deploy.export``; their SavedModel runs with TensorFlow alone.

Formats (``FORMATS``): ``keras`` (one file), ``savedmodel`` (a folder, ``serving_default``
signature on uint8 images of any size), ``tflite`` (fixed input of the base's input size:
TFLite's builtin ops have no antialiased resize).  Class names and provenance go in
``tlpipe.json``: a member of the .keras zip (Keras ignores it), ``assets.extra/`` of a
SavedModel, ``NAME.json`` (+ ``NAME.labels.txt``) beside a .tflite file.  Models exported
by older tlpipe versions kept them in the config of a ``tlpipe>Probabilities`` last layer;
``read_metadata`` reads both.  Base, input size, pooling and weights default to what the
head's features file recorded.

A KerasHub base (``hub:PRESET``, pipeline.nets.hub) brings its preset's image converter inside the
base model instead of ``builtin_preprocess``; its ``.keras`` file loads with ``import keras_hub`` and
``keras.saving.load_model`` (no tlpipe), as the metadata's ``requires`` says.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.core.errors import FeaturesFileError, TlpipeError, UsageError
from pipeline.core.util import atomic_write_text
from pipeline.deploy.export_spec import (  # noqa: F401 - FORMATS, check_out, custom_layer_note: re-exported
    CUSTOM_LAYER_HEADS,
    FORMATS,
    ExportConfig,
    check_export,
    check_out,
    custom_layer_note,
)
from pipeline.deploy.export_depths import DEPTH_HEADS, build_depth_export, depth_trunk, mirror_layers
from pipeline.heads.folded import logistic_layers
from pipeline.heads.folder import read_head_info
from pipeline.heads.models import load_head
from pipeline.nets.backbones import get_backbone
from pipeline.nets.extractor import builtin_preprocess
from pipeline.nets.graph import (
    METADATA_MEMBER,
    OUTPUT_LAYER,
    Branch,
    build_branch,
    probabilities_layer,
    resize_in_graph,
    save_keras,
    temp_name,
)
from pipeline.store.features import locate_head_features, read_attrs

log = logging.getLogger(__name__)

METADATA_VERSION = 2  # 1: metadata in the Probabilities layer's config (still read)


@keras.saving.register_keras_serializable(package="tlpipe")
class Probabilities(keras.layers.Layer):
    """Final layer of models exported by older tlpipe versions (kept so they still load): ``[N, 1]``
    sigmoid output becomes ``[N, 2]``; carries class names and metadata.  New exports use built-in
    layers (``pipeline.nets.graph.probabilities_layer``) and keep the metadata in ``tlpipe.json``."""

    def __init__(self, class_names: list[str], metadata: dict[str, Any] | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.metadata = dict(metadata or {})

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if x.shape[-1] == 1 and len(self.class_names) == 2:
            x = keras.ops.concatenate([1.0 - x, x], axis=-1)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], len(self.class_names))

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names, "metadata": self.metadata}


def _calibrated_proba(d, slope, offset, n_folds: int, n_columns: int, binary: bool, class_index: list[int],
                      n_classes: int):
    """scikit-learn's sigmoid calibration of decision values ``d`` [N, folds * columns]."""
    ops = keras.ops
    p = ops.sigmoid(-(slope * d + offset))
    p = ops.reshape(p, (-1, n_folds, n_columns))
    if binary:
        p = ops.concatenate([1.0 - p, p], axis=-1)
    else:
        s = ops.sum(p, axis=-1, keepdims=True)
        p = ops.where(s > 0, p / ops.where(s > 0, s, 1.0), 1.0 / n_columns)
    p = ops.mean(p, axis=1)  # [N, C'] over the classes the folds saw
    scatter = np.zeros((p.shape[-1], n_classes), dtype="float64")
    for j, k in enumerate(class_index):
        scatter[j, k] = 1.0
    return ops.cast(ops.matmul(p, ops.convert_to_tensor(scatter)), "float32")


@keras.saving.register_keras_serializable(package="tlpipe")
class CalibratedLinearSVC(keras.layers.Layer):
    """scikit-learn ``CalibratedClassifierCV(LinearSVC, method="sigmoid")`` after a StandardScaler.

    Per fold f and calibrated column c: ``d = x @ W + b`` (scaler folded in),
    ``p = sigmoid(-(a * d + b'))``; binary folds give ``[1 - p, p]``, multi-class folds
    are normalised (uniform where every column is 0); folds are averaged; columns are
    scattered to the K classes through ``class_index``.
    """

    def __init__(self, n_features: int, n_folds: int, n_columns: int, n_classes: int, binary: bool,
                 class_index: list[int], **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.n_features, self.n_folds, self.n_columns = int(n_features), int(n_folds), int(n_columns)
        self.n_classes, self.binary, self.class_index = int(n_classes), bool(binary), list(class_index)
        m = self.n_folds * self.n_columns
        self.kernel = self.add_weight(shape=(self.n_features, m), initializer="zeros", trainable=False,
                                      name="kernel", dtype="float64")
        self.bias = self.add_weight(shape=(m,), initializer="zeros", trainable=False, name="bias", dtype="float64")
        self.slope = self.add_weight(shape=(m,), initializer="zeros", trainable=False, name="slope", dtype="float64")
        self.offset = self.add_weight(shape=(m,), initializer="zeros", trainable=False, name="offset",
                                      dtype="float64")

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float64")
        d = keras.ops.matmul(x, self.kernel) + self.bias
        return _calibrated_proba(d, self.slope, self.offset, self.n_folds, self.n_columns, self.binary,
                                 self.class_index, self.n_classes)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_features": self.n_features, "n_folds": self.n_folds,
                "n_columns": self.n_columns, "n_classes": self.n_classes, "binary": self.binary,
                "class_index": self.class_index}


@keras.saving.register_keras_serializable(package="tlpipe")
class CalibratedRbfSVC(keras.layers.Layer):
    """scikit-learn ``CalibratedClassifierCV(SVC(kernel="rbf"), method="sigmoid", ensemble=False)``
    after a StandardScaler.

    ``k = exp(-gamma * |z - sv|^2)`` with ``z`` the standardised input; one decision value
    per class pair, ``k @ pair_coef + pair_bias`` (libsvm's one-vs-one); two classes use it
    as is, more classes turn the pairs into scikit-learn's one-vs-rest votes + confidences;
    then the sigmoid calibration, as ``CalibratedLinearSVC``.  Computed in float64.
    """

    def __init__(self, n_features: int, n_support: int, n_classes: int, classes_seen: int, gamma: float,
                 class_index: list[int], **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.n_features, self.n_support, self.n_classes = int(n_features), int(n_support), int(n_classes)
        self.classes_seen, self.gamma, self.class_index = int(classes_seen), float(gamma), list(class_index)
        c = self.classes_seen
        self.n_pairs = 1 if c == 2 else c * (c - 1) // 2
        self.n_columns = 1 if c == 2 else c

        def weight(name, shape):
            return self.add_weight(shape=shape, initializer="zeros", trainable=False, name=name, dtype="float64")

        self.mean, self.scale = weight("mean", (self.n_features,)), weight("scale", (self.n_features,))
        self.support = weight("support", (self.n_support, self.n_features))
        self.pair_coef = weight("pair_coef", (self.n_support, self.n_pairs))
        self.pair_bias = weight("pair_bias", (self.n_pairs,))
        self.slope, self.offset = weight("slope", (self.n_columns,)), weight("offset", (self.n_columns,))

    def call(self, inputs):
        ops = keras.ops
        z = (ops.cast(inputs, "float64") - self.mean) / self.scale
        sq = (ops.sum(z * z, axis=-1, keepdims=True) - 2.0 * ops.matmul(z, ops.transpose(self.support))
              + ops.sum(self.support * self.support, axis=-1)[None, :])
        k = ops.exp(-self.gamma * ops.maximum(sq, 0.0))
        d = ops.matmul(k, self.pair_coef) + self.pair_bias  # [N, pairs]
        if self.classes_seen > 2:
            d = self._ovr(d)
        return _calibrated_proba(d, self.slope, self.offset, 1, self.n_columns, self.classes_seen == 2,
                                 self.class_index, self.n_classes)

    def _ovr(self, d):
        """scikit-learn's ``_ovr_decision_function(d < 0, -d, C)``: votes + confidences / (3 (|c| + 1))."""
        ops = keras.ops
        c = self.classes_seen
        plus, minus = np.zeros((self.n_pairs, c)), np.zeros((self.n_pairs, c))
        p = 0
        for i in range(c):
            for j in range(i + 1, c):
                plus[p, i], minus[p, j] = 1.0, 1.0
                p += 1
        plus, minus = ops.convert_to_tensor(plus), ops.convert_to_tensor(minus)
        win = ops.cast(d >= 0, "float64")  # libsvm: d >= 0 votes for the first class of the pair
        lose = 1.0 - win
        votes = ops.matmul(win, plus) + ops.matmul(lose, minus)
        conf = ops.matmul(d, plus) - ops.matmul(d, minus)
        return votes + conf / (3.0 * (ops.abs(conf) + 1.0))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_features": self.n_features, "n_support": self.n_support,
                "n_classes": self.n_classes, "classes_seen": self.classes_seen, "gamma": self.gamma,
                "class_index": self.class_index}


@keras.saving.register_keras_serializable(package="tlpipe")
class KnnProba(keras.layers.Layer):
    """scikit-learn ``Normalizer + KNeighborsClassifier(weights="distance", euclidean)``.

    Holds the L2-normalised training features; computes in float64 so exact duplicates
    (distance 0) are found as in scikit-learn, where they take all the weight.
    """

    def __init__(self, n_train: int, n_features: int, n_classes: int, k: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.n_train, self.n_features, self.n_classes, self.k = int(n_train), int(n_features), int(n_classes), int(k)
        self.points = self.add_weight(shape=(self.n_train, self.n_features), initializer="zeros", trainable=False,
                                      name="points", dtype="float64")
        self.onehot = self.add_weight(shape=(self.n_train, self.n_classes), initializer="zeros", trainable=False,
                                      name="onehot", dtype="float64")

    def call(self, inputs):
        ops = keras.ops
        x = ops.cast(inputs, "float64")
        norm = ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True))
        x = x / ops.where(norm > 0, norm, 1.0)
        sq = (ops.sum(x * x, axis=-1, keepdims=True) - 2.0 * ops.matmul(x, ops.transpose(self.points))
              + ops.sum(self.points * self.points, axis=-1)[None, :])
        dist = ops.sqrt(ops.maximum(sq, 0.0))
        neg, idx = ops.top_k(-dist, k=self.k)
        d = -neg
        exact = ops.any(d == 0.0, axis=-1, keepdims=True)
        w = ops.where(exact, ops.cast(d == 0.0, "float64"), 1.0 / ops.where(d == 0.0, 1.0, d))
        votes = ops.take(self.onehot, idx, axis=0)  # [N, k, K]
        proba = ops.sum(votes * w[..., None], axis=1)
        proba = proba / ops.sum(proba, axis=-1, keepdims=True)
        return ops.cast(proba, "float32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_train": self.n_train, "n_features": self.n_features,
                "n_classes": self.n_classes, "k": self.k}


EXPORTABLE_HEADS = ("logistic", "dense", "svm", "rbf-svm", "knn")


def _features_attrs(info: dict[str, Any], cache_dir: Path, head_dir: Path) -> list[dict[str, Any]]:
    """The attributes of every features file the head was fitted on, in the head's order (found by
    ``locate_head_features``: old heads recorded paths relative to where fit-head ran)."""
    paths = info.get("features") or []
    if not paths:
        raise UsageError("the head records no features file; refit it with 'tlpipe fit-head'")
    out = []
    for path in paths:
        try:
            resolved = locate_head_features(path, head_dir, cache_dir)
        except FeaturesFileError as exc:
            raise FeaturesFileError(f"the head's features files are needed for export (base, input size, "
                                    f"pooling, weights): {exc}") from None
        out.append(read_attrs(resolved))
    return out


def _svm_layer(model, n_classes: int, dim: int):
    scaler, cal = model.steps[0][1], model.steps[-1][1]
    mean, scale = scaler.mean_, scaler.scale_
    kernels, biases, slopes, offsets = [], [], [], []
    for cc in cal.calibrated_classifiers_:
        if cc.method != "sigmoid":
            raise UsageError(f"export of the svm head supports sigmoid calibration, not {cc.method}")
        coef, icpt = np.atleast_2d(cc.estimator.coef_), np.atleast_1d(cc.estimator.intercept_)
        if list(cc.estimator.classes_) != list(cal.classes_):
            raise UsageError("export of the svm head: a calibration fold saw fewer classes than the head; "
                             "refit with more training images per class")
        for j in range(coef.shape[0]):
            kernels.append(coef[j] / scale)
            biases.append(icpt[j] - float(np.dot(mean / scale, coef[j])))
            slopes.append(cc.calibrators[j].a_)
            offsets.append(cc.calibrators[j].b_)
    n_folds = len(cal.calibrated_classifiers_)
    n_columns = len(kernels) // n_folds
    binary = len(cal.classes_) == 2
    layer = CalibratedLinearSVC(dim, n_folds, n_columns, n_classes, binary, [int(c) for c in cal.classes_],
                                name="svm")
    layer.set_weights([np.stack(kernels, 1), np.array(biases), np.array(slopes, dtype=np.float64).ravel(),
                       np.array(offsets, dtype=np.float64).ravel()])
    return layer


def rbf_svm_layer(model, n_classes: int, dim: int):
    scaler, cal = model.steps[0][1], model.steps[-1][1]
    if len(cal.calibrated_classifiers_) != 1:
        raise UsageError("export of the rbf-svm head expects one calibrated SVM (ensemble=False)")
    cc = cal.calibrated_classifiers_[0]
    svc = cc.estimator
    if cc.method != "sigmoid" or svc.kernel != "rbf":
        raise UsageError(f"export of the rbf-svm head supports an RBF kernel with sigmoid calibration, "
                         f"not {svc.kernel} / {cc.method}")
    if list(svc.classes_) != list(cal.classes_):
        raise UsageError("export of the rbf-svm head: the SVM saw fewer classes than the head")
    sv = np.asarray(svc.support_vectors_, np.float64)
    dual, icpt = np.asarray(svc.dual_coef_, np.float64), np.asarray(svc.intercept_, np.float64)
    c = len(svc.classes_)
    if c == 2:  # scikit-learn's public dual_coef_/intercept_ already give d > 0 for classes_[1]
        pair_coef, pair_bias = dual.T, icpt
    else:  # libsvm one-vs-one: pair (i, j) uses class i's vectors with row j-1, class j's with row i
        starts = np.concatenate([[0], np.cumsum(svc.n_support_)])
        pair_coef = np.zeros((len(sv), c * (c - 1) // 2))
        p = 0
        for i in range(c):
            for j in range(i + 1, c):
                pair_coef[starts[i]:starts[i + 1], p] = dual[j - 1, starts[i]:starts[i + 1]]
                pair_coef[starts[j]:starts[j + 1], p] = dual[i, starts[j]:starts[j + 1]]
                p += 1
        pair_bias = icpt
    gamma = float(svc._gamma)
    layer = CalibratedRbfSVC(dim, len(sv), n_classes, c, gamma, [int(k) for k in cal.classes_], name="rbf_svm")
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(dim)
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(dim)
    layer.set_weights([np.asarray(mean, np.float64), np.asarray(scale, np.float64), sv, pair_coef,
                       np.asarray(pair_bias, np.float64),
                       np.array([cal_.a_ for cal_ in cc.calibrators], np.float64).ravel(),
                       np.array([cal_.b_ for cal_ in cc.calibrators], np.float64).ravel()])
    return layer


def _knn_layer(model, n_classes: int, dim: int):
    knn = model.steps[-1][1]
    X = np.asarray(knn._fit_X, np.float64)
    y = np.asarray(knn.classes_)[np.asarray(knn._y)]
    layer = KnnProba(len(X), dim, n_classes, int(knn.n_neighbors), name="knn")
    layer.set_weights([X, np.eye(n_classes)[y.astype(int)]])
    return layer


def build_export(head_dir: str | Path, base: str | None = None, weights: str | None = None,
                 cache_dir: str | Path = "cache", fixed_size: bool = False) -> tuple[Any, dict[str, Any]]:
    """Build (not save) the image -> probabilities model for a fitted head; return it and its metadata.

    One features file: one ``image`` input.  Fused features: one branch per file; one input
    per distinct input size (``image`` if they all share one, else ``image_<size>``).
    Only built-in Keras layers, except the svm, rbf-svm and knn heads (``CUSTOM_LAYER_HEADS``).
    ``fixed_size``: inputs of exactly the base's input size and no resize layer (for TFLite,
    whose builtin ops have no antialiased resize).
    """
    model_dir, info = read_head_info(head_dir)
    name = info["head"]
    if name in DEPTH_HEADS:  # several pooled depths (tlpipe fit-head --head auto): pipeline.deploy.export_depths
        attrs = _features_attrs(info, Path(cache_dir), Path(head_dir))
        _check_base(base, attrs)
        return build_depth_export(Path(head_dir), model_dir, info, attrs[0], weights, fixed_size, METADATA_VERSION)
    if name not in EXPORTABLE_HEADS:
        raise UsageError(f"export supports the heads {', '.join((*EXPORTABLE_HEADS, *DEPTH_HEADS))}, not '{name}'")
    all_attrs = _features_attrs(info, Path(cache_dir), Path(head_dir))
    _check_base(base, all_attrs)
    low = sorted({str(a.get("precision")) for a in all_attrs} & {"bf16", "fp16"})
    if low:
        log.warning("the head was fitted on %s features; the exported model computes float32 features, so its "
                    "accuracy can differ a little from the head's reported metrics (extract with --precision f32 "
                    "for exact agreement)", "/".join(low))
    if any(a.get("depths") for a in all_attrs):  # fitted on pooled depths (extract --layers blocks|NAMES)
        _check_single_depth(name, all_attrs)
        return _plain_head_on_depths(name, Path(head_dir), model_dir, info, all_attrs[0], weights, fixed_size)
    k, dim = len(info["classes"]), int(info["feature_size"])
    fused = len(all_attrs) > 1
    head_model = load_head(model_dir).model
    branches = [build_branch(a, weights, i, fused) for i, a in enumerate(all_attrs)]
    if sum(int(b.model.output_shape[-1]) for b in branches) != dim:
        raise UsageError(f"the bases give {sum(int(b.model.output_shape[-1]) for b in branches)} features "
                         f"but the head expects {dim}")
    sizes = sorted({b.size for b in branches}, key=[b.size for b in branches].index)
    inputs = {s: keras.Input(shape=(s, s, 3) if fixed_size else (None, None, 3), dtype="uint8",
                             name="image" if len(sizes) == 1 else f"image_{s}") for s in sizes}
    x = _base_outputs(branches, inputs, fixed_size)
    outputs = probabilities_layer(_head_layer(name, head_model, k, dim)(x), k)
    metadata = _metadata(info, branches, sizes, str(head_dir), fixed_size)
    model_name = "_".join(["tlpipe", *dict.fromkeys(b.base for b in branches), name])
    model = keras.Model(list(inputs.values()) if len(sizes) > 1 else inputs[sizes[0]], outputs,
                        name=re.sub(r"[^A-Za-z0-9_]", "_", model_name))
    model.trainable = False
    return model, metadata


def _check_single_depth(name: str, all_attrs: list[dict[str, Any]]) -> None:
    """A plain head on pooled depths exports from one features file (not fused with others)."""
    if len(all_attrs) > 1:
        raise UsageError(f"the {name} head was fitted on several features files, one of them of pooled depths "
                         "(extract --layers blocks|NAMES), which export builds from one file only: refit it on "
                         "one file, or extract that base with --layers last")


def _depths_used(head_dir: Path, model_dir: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """evaluation.json's ``depths`` of the head: the depths it used and whether it predicted with the mirror."""
    from pipeline.nets.depths import depths_of

    for folder in (head_dir, model_dir.parent):
        path = folder / "evaluation.json"
        if path.is_file():
            used = dict(json.loads(path.read_text()).get("depths") or {})
            if used.get("depths"):
                return used
    return {"depths": [n for n, _ in depths_of(attrs)]}


def _plain_head_on_depths(name: str, head_dir: Path, model_dir: Path, info: dict[str, Any], attrs: dict[str, Any],
                          weights: str | None, fixed_size: bool) -> tuple[Any, dict[str, Any]]:
    """image -> probabilities for a plain head (logistic, svm, ...) fitted on pooled depths: the depths it
    used from one pass of the base (``export_depths.depth_trunk``), the head, and, when it predicted so,
    the mean with the mirror image (as ``tlpipe fit-head`` scored it on files with views)."""
    used = _depths_used(head_dir, model_dir, attrs)
    backbone, size, pooling, trunk, winfo = depth_trunk(attrs, weights, list(used["depths"]))
    k, dim = len(info["classes"]), int(info["feature_size"])
    if int(trunk.output_shape[-1]) != dim:
        raise UsageError(f"the depths {', '.join(used['depths'])} give {trunk.output_shape[-1]} features but the "
                         f"head expects {dim}")
    image = keras.Input(shape=(size, size, 3) if fixed_size else (None, None, 3), dtype="uint8", name="image")
    x = (keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(image) if fixed_size
         else resize_in_graph(image, size))
    for layer in builtin_preprocess(backbone, name="preprocess"):
        x = layer(x)
    head = _head_layer(name, load_head(model_dir).model, k, dim)
    out = head(trunk(x, training=False))
    if used.get("test_time_mirror"):
        out = keras.layers.Average(name="mean_with_mirror")([out, head(trunk(mirror_layers(x, size), training=False))])
    model = keras.Model(image, probabilities_layer(out, k),
                        name=re.sub(r"[^A-Za-z0-9_]", "_", f"tlpipe_{backbone.name}_{name}"))
    model.trainable = False
    metadata = _metadata(info, [Branch(backbone.name, size, pooling, trunk, winfo)], [size], str(head_dir), fixed_size)
    return model, {**metadata, "depths": list(used["depths"]), "test_time_mirror": bool(used.get("test_time_mirror"))}


def _check_base(base: str | None, all_attrs: list[dict[str, Any]]) -> None:
    """``--base``, when given, must be one the head was fitted on."""
    head_bases = [get_backbone(a["base"]).name for a in all_attrs]
    if base is not None and get_backbone(base).name not in head_bases:
        raise UsageError(f"--base {base} does not match the head, which was fitted on "
                         f"{' + '.join(head_bases)} features")


def _base_outputs(branches: list[Branch], inputs: dict[int, Any], fixed_size: bool):
    """Every branch on its input (resized as decoding does, unless ``fixed_size``), concatenated when fused."""
    fused = len(branches) > 1
    pooled = []
    for i, b in enumerate(branches):
        suffix = f"_{i}" if fused else ""
        x = inputs[b.size]
        if fixed_size:
            x = keras.layers.Rescaling(1.0, dtype="float32", name=f"to_float{suffix}")(x)
        else:
            x = resize_in_graph(x, b.size, suffix)
        for layer in builtin_preprocess(get_backbone(b.base), name=f"preprocess{suffix}"):
            x = layer(x)
        pooled.append(b.model(x, training=False))
    return keras.layers.Concatenate(name="fuse")(pooled) if fused else pooled[0]


def _head_layer(name: str, model, k: int, dim: int):
    """The fitted head as a layer (or a model called as one)."""
    if name == "dense":
        return lambda x: model(x, training=False)
    if name == "logistic":
        return logistic_layers(model, k, dim)
    if name == "svm":
        return _svm_layer(model, k, dim)
    if name == "rbf-svm":
        return rbf_svm_layer(model, k, dim)
    return _knn_layer(model, k, dim)


def _metadata(info: dict[str, Any], branches: list[Branch], sizes: list[int], head_dir: str,
              fixed_size: bool) -> dict[str, Any]:
    """tlpipe.json: class names and provenance."""
    first, name = branches[0], info["head"]
    return {"format_version": METADATA_VERSION, "class_names": list(info["classes"]),
            "base": " + ".join(b.base for b in branches), "input_size": first.size, "input_sizes": sizes,
            "inputs": ["image"] if len(sizes) == 1 else [f"image_{s}" for s in sizes],
            "input_shape": "fixed: [N, S, S, 3] uint8, S = input_size" if fixed_size
            else "any: [N, H, W, 3] uint8, resized inside",
            "pooling": first.pooling, "weights": first.weights.label, "weights_sha256": first.weights.sha256,
            "branches": [{"base": b.base, "input_size": b.size, "pooling": b.pooling,
                          "weights": b.weights.label, "weights_sha256": b.weights.sha256} for b in branches],
            "head": name, "head_dir": head_dir, "custom_layers": name in CUSTOM_LAYER_HEADS,
            "requires": requires(b.base for b in branches),
            "features": info.get("features"), "fingerprints": info.get("fingerprints")}


def requires(bases) -> list[str]:
    """The packages an exported ``.keras`` model needs to load (besides tlpipe's custom head layers)."""
    from pipeline.nets.hub import is_hub_name

    return ["keras", "keras-hub"] if any(is_hub_name(b) for b in bases) else ["keras"]


def import_hub_layers(path: str | Path) -> None:
    """Import ``keras_hub`` (its layers register on import) before loading an exported ``.keras`` model
    whose base is a KerasHub preset; one line naming the install when it is missing."""
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read(METADATA_MEMBER)) if METADATA_MEMBER in zf.namelist() else {}
    except (OSError, zipfile.BadZipFile, ValueError):
        return
    if "keras-hub" in meta.get("requires", []):
        from pipeline.nets.hub import require_keras_hub

        require_keras_hub(f"{path} (a KerasHub base)")
        import keras_hub  # noqa: F401


def build_export_model(head_dir: str | Path, base: str | None = None, weights: str | None = None,
                       cache_dir: str | Path = "cache"):
    """``build_export`` without the metadata (the model alone)."""
    return build_export(head_dir, base, weights, cache_dir)[0]


# ----------------------------------------------------------------------------- writing the formats

def _save_savedmodel(model, metadata: dict[str, Any], out: Path) -> None:
    tmp = temp_name(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / "assets.extra" / METADATA_MEMBER).write_text(json.dumps(metadata, indent=2))
        if out.exists() or out.is_symlink():  # --force: move the old one aside, then rename
            if out.is_dir() and not out.is_symlink():
                out.rename(old)
            else:
                out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _save_tflite(model, metadata: dict[str, Any], out: Path) -> None:
    tmp = temp_name(out)
    try:
        try:
            model.export(str(tmp), format="litert", verbose=False)
        except Exception as exc:  # noqa: BLE001 - the converter's errors are long; keep the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TlpipeError(f"TFLite conversion failed: {first}") from exc
        atomic_write_text(out.with_suffix(".json"), json.dumps(metadata, indent=2) + "\n")
        atomic_write_text(out.with_suffix(".labels.txt"), "".join(f"{c}\n" for c in metadata["class_names"]))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_model(cfg: ExportConfig) -> Path:
    """Build the exported model and save it to ``cfg.out`` in ``cfg.format``; return the path.

    ``pipeline.export`` (``pipeline.deploy.api.export_model``) makes the same checks before importing
    this module, so that a usage error ends before TensorFlow starts."""
    out = check_export(cfg)
    model, metadata = build_export(cfg.head, cfg.base, cfg.weights, cfg.cache_dir,
                                   fixed_size=cfg.format == "tflite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "keras":
        save_keras(model, metadata, out)
    elif cfg.format == "savedmodel":
        _save_savedmodel(model, metadata, out)
    else:
        _save_tflite(model, metadata, out)
    log.info("exported %s -> %s (%s)", cfg.head, out, cfg.format)
    return out


# ----------------------------------------------------------------------------- reading metadata

def _metadata_from_layer(model) -> dict[str, Any] | None:
    """The old form (tlpipe < 0.x): metadata in the config of a ``tlpipe>Probabilities`` last layer."""
    try:
        layer = model.get_layer(OUTPUT_LAYER)
    except ValueError:
        return None
    if not hasattr(layer, "metadata") or not hasattr(layer, "class_names"):
        return None
    return {**layer.metadata, "class_names": list(layer.class_names)}


def read_metadata(source) -> dict[str, Any]:
    """Class names and provenance of an exported model: a path (.keras, SavedModel folder, .tflite) or a
    loaded Keras model.

    New exports keep them in ``tlpipe.json`` (a member of the .keras zip, ``assets.extra/tlpipe.json``
    in a SavedModel, ``NAME.json`` beside a .tflite file); older .keras exports kept them in the
    config of their last layer, which is still read.
    """
    not_ours = ("not a model written by 'tlpipe export' (a head's model/head.keras is not one): "
                "run 'tlpipe export --head DIR --out model.keras' first")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            meta = path / "assets.extra" / METADATA_MEMBER
            if not meta.is_file():
                raise UsageError(f"{path}: {not_ours}")
            return json.loads(meta.read_text())
        if path.suffix == ".tflite":
            meta = path.with_suffix(".json")
            if not meta.is_file():
                raise UsageError(f"{path}: no {meta.name} beside it (tlpipe export writes one)")
            return json.loads(meta.read_text())
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if METADATA_MEMBER in zf.namelist():
                    return json.loads(zf.read(METADATA_MEMBER))
        import pipeline.nets.extractor  # noqa: F401 - registers BasePreprocess for old exports

        import_hub_layers(path)
        return read_metadata(keras.saving.load_model(path))
    meta = getattr(source, "tlpipe_metadata", None) or _metadata_from_layer(source)
    if meta is None:
        raise UsageError(not_ours)
    return dict(meta)
