"""Built-in-layer pieces shared by every image -> probabilities model tlpipe writes (``tlpipe export``,
``fine-tune``, ``baseline``), and the ``.keras`` file that carries its metadata.

* ``resize_in_graph``: what ``pipeline.data.images.decode_image`` does to a photo, as layers;
* ``probabilities_layer``: the ``probabilities`` output, ``[N, K]`` float32 (two columns for two classes);
* ``build_branch``: the frozen base a features file was extracted with (same weights, same seeding);
* ``save_keras``: ``model.keras`` with ``tlpipe.json`` (class names, provenance) inside the zip.

Keras is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import UsageError
from pipeline.nets.weights import build_with_weights, seeded_init, weights_of_features

OUTPUT_LAYER = "probabilities"
METADATA_MEMBER = "tlpipe.json"  # in the .keras zip; assets.extra/ of a SavedModel; NAME.json beside .tflite


def resize_in_graph(x, size: int, suffix: str = ""):
    """The in-graph resize: what ``pipeline.data.images.decode_image`` does to a photo of any size.

    ``Resizing(antialias=True)`` (bilinear; antialiased when a side shrinks), then rounded to
    integer levels as decoding to uint8 does: + 0.5, a cast to int32 (truncation: the values
    are >= 0) and back to float32, with ``Rescaling`` layers (``Discretization`` would do it
    too, at 10x the cost of the resize).  The identity on an image that already has the base's
    input size (what ``tlpipe predict`` feeds).
    """
    import keras

    x = keras.layers.Resizing(size, size, interpolation="bilinear", antialias=True, name=f"resize{suffix}")(x)
    x = keras.layers.Rescaling(1.0, offset=0.5, dtype="float32", name=f"round_half{suffix}")(x)
    x = keras.layers.Rescaling(1.0, dtype="int32", name=f"round{suffix}")(x)
    return keras.layers.Rescaling(1.0, dtype="float32", name=f"to_float{suffix}")(x)


def probabilities_layer(x, n_classes: int):
    """``[N, K]`` float32 probabilities named ``probabilities``, with built-in layers only.

    A binary sigmoid output ``p`` ``[N, 1]`` becomes ``[1 - p, p]``: ``Rescaling(-1, offset=1)``
    then ``Concatenate``.
    """
    import keras

    if x.shape[-1] == 1 and n_classes == 2:
        p = keras.layers.Activation("linear", dtype="float32", name="p_positive")(x)
        q = keras.layers.Rescaling(-1.0, offset=1.0, dtype="float32", name="p_negative")(p)
        return keras.layers.Concatenate(dtype="float32", name=OUTPUT_LAYER)([q, p])
    return keras.layers.Activation("linear", dtype="float32", name=OUTPUT_LAYER)(x)


@dataclass
class Branch:
    """One frozen base, as a features file recorded it."""

    base: str
    size: int
    pooling: str
    model: Any
    weights: Any  # pipeline.nets.weights.WeightsInfo


def build_branch(attrs: dict[str, Any], weights: str | None, index: int, fused: bool) -> Branch:
    """The frozen base (with the weights the features were extracted with) for one features file."""
    backbone, resolved = weights_of_features(attrs, weights)
    size, pooling = int(attrs["input_size"]), str(attrs.get("pooling", "avg"))
    with seeded_init():  # as extract: --weights none gives the same random base
        model, winfo = build_with_weights(backbone, resolved, size, pooling)
    if int(model.output_shape[-1]) != int(attrs["feature_size"]):
        raise UsageError(f"{backbone.name} gives {model.output_shape[-1]} features but its features file has "
                         f"{attrs['feature_size']}")
    if fused:
        model.name = f"branch{index}_{model.name}"
    return Branch(backbone.name, size, pooling, model, winfo)


def temp_name(out: Path) -> Path:
    """A hidden name beside ``out`` that this process writes before renaming into place."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")


def save_keras(model, metadata: dict[str, Any], out: Path) -> None:
    """``model`` to ``out`` (.keras) with ``metadata`` as the zip member ``tlpipe.json``, atomically."""
    tmp = temp_name(out)
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:  # keras.saving.load_model ignores members it does not know
            zf.writestr(METADATA_MEMBER, json.dumps(metadata, indent=2))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
