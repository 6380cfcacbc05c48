"""Keras 3 model pieces shared by extraction and export (backend-agnostic).

The feature extractor takes ``uint8[B, S, S, 3]`` RGB images, applies the base's own
``preprocess_input`` inside the graph (so readers hand over compact uint8 batches),
runs the frozen base with global pooling and returns float32 features.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import keras
import numpy as np

from pipeline.nets.backbones import Backbone, get_backbone

log = logging.getLogger(__name__)


_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)  # caffe mode, in BGR order
_IMAGENET_RGB_MEAN, _IMAGENET_RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torch mode


def builtin_preprocess(backbone: Backbone, name: str = "preprocess") -> list:
    """The base's ``preprocess_input`` as built-in Keras layers (frozen), to apply in order.

    A model made of these loads with plain ``keras.saving.load_model`` (no tlpipe needed):
    ``tf`` is ``Rescaling(1/127.5, offset=-1)``, ``torch`` a per-channel ``Rescaling``,
    ``caffe`` a ``Dense(3)`` whose kernel swaps R and B and whose bias subtracts the means,
    ``none`` no layer at all.  Equal to ``preprocess_input`` up to float32 rounding.
    """
    mode = backbone.preprocess_mode
    if mode == "none":
        return []
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name=name)]
    if mode == "torch":
        std = np.asarray(_IMAGENET_RGB_STD, np.float64)
        scale = (1.0 / (255.0 * std)).tolist()
        offset = (-np.asarray(_IMAGENET_RGB_MEAN) / std).tolist()
        return [keras.layers.Rescaling(scale, offset=offset, dtype="float32", name=name)]
    if mode == "caffe":
        dense = keras.layers.Dense(3, dtype="float32", trainable=False, name=name)
        dense.build((None, 3))
        kernel = np.eye(3, dtype="float32")[:, ::-1]  # out[..., j] = in[..., 2 - j]: RGB -> BGR
        dense.set_weights([kernel, -np.asarray(_IMAGENET_BGR_MEAN, np.float32)])
        return [dense]
    raise ValueError(f"unknown preprocessing mode {mode!r} for {backbone.name}")


@keras.saving.register_keras_serializable(package="tlpipe")
class BasePreprocess(keras.layers.Layer):
    """Cast to float32 and apply ``keras.applications.<base>.preprocess_input``.

    Extraction uses it (the features are defined by it); exports use ``builtin_preprocess``
    instead. It stays registered so that models exported by older tlpipe versions load.
    """

    def __init__(self, base: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.base = base

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        return get_backbone(self.base).preprocess_input(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "base": self.base}


@lru_cache(maxsize=1)
def accelerator() -> str | None:
    """Name of the accelerator the current Keras backend will use, or None on CPU."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return "gpu" if tf.config.list_physical_devices("GPU") else None
        if backend == "jax":
            import jax

            platform = jax.devices()[0].platform
            return None if platform == "cpu" else platform
        if backend == "torch":
            import torch

            return "cuda" if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - defensive
        return None
    return None


def build_extractor(backbone: Backbone, base_model, input_size: int, mixed_precision: bool = False):
    """Wrap a built base into ``uint8 image -> float32 pooled features``."""
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name="image")
    if backbone.hub:  # a KerasHub base holds its preset's image converter: it takes float pixels in [0, 255]
        x = keras.layers.Rescaling(1.0, dtype="float32", name="preprocess")(inputs)
    else:
        x = BasePreprocess(backbone.name, name="preprocess")(inputs)
    x = base_model(x, training=False)
    outputs = keras.layers.Activation("linear", dtype="float32", name="features")(x)
    model = keras.Model(inputs, outputs, name=f"tlpipe_{backbone.name}".replace(".", "_").replace(":", "_"))
    model.trainable = False
    # XLA only on accelerators: on this kind of CPU it is ~10x slower than plain graph mode.
    model.compile(jit_compile=accelerator() is not None or keras.backend.backend() == "jax")
    return model


class Forward:
    """Compiled forward pass on fixed-size batches (the last batch is zero-padded)."""

    def __init__(self, model, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self._pad: np.ndarray | None = None

    def warmup(self, input_size: int) -> None:
        """Trace and compile the forward pass once (on a zero batch) before real data arrives."""
        self(np.zeros((self.batch_size, input_size, input_size, 3), dtype=np.uint8))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n != self.batch_size:
            full = np.zeros((self.batch_size, *batch.shape[1:]), dtype=batch.dtype)
            full[:n] = batch
            batch = full
        out = self.model.predict_on_batch(batch)
        return np.asarray(out, dtype=np.float32)[:n]
