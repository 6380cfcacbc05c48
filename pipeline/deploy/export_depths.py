"""Export of heads fitted on several pooled depths (``--head auto``): image -> probabilities.
``depth_trunk`` also serves the other heads fitted on pooled depths (``pipeline.deploy.export``).

The exported model resizes the image as decoding does, applies the base's preprocessing with
built-in layers, computes the chosen depths' global pools from one pass of the base (a KerasHub base:
its preset's converter and pyramid levels, ``pipeline.nets.hub.build_pooled_depths``), and applies
the head as one ``Dense`` + softmax (per-depth standardisation folded into it).  When the head
chose the test-time mirror, the mirrored image goes through the same layers (the flip is a fixed
``Dense`` on the width axis between two ``Permute``) and the two probabilities are averaged.
Built-in Keras layers only (and KerasHub's, for a hub base): the ``.keras`` file loads without tlpipe.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.core.errors import UsageError

DEPTH_HEADS = ("auto",)


def mirror_layers(x, size: int, suffix: str = ""):
    """``x[:, :, ::-1, :]`` with built-in layers (exact: a permutation matrix on the width axis)."""
    x = keras.layers.Permute((1, 3, 2), name=f"width_last{suffix}")(x)
    flip = keras.layers.Dense(size, use_bias=False, trainable=False, name=f"mirror{suffix}")
    flip.build((None, None, 3, size))
    flip.set_weights([np.eye(size, dtype="float32")[::-1]])
    x = flip(x)
    return keras.layers.Permute((1, 3, 2), name=f"width_back{suffix}")(x)


def depth_trunk(attrs: dict[str, Any], weights: str | None, layers: list[str]):
    """``(backbone, size, pooling, trunk, weights info)``: the trunk computes ``layers``' pools from the
    base's (preprocessed) input in one pass, with the weights the features file was extracted with."""
    from pipeline.nets.backbones import get_backbone
    from pipeline.nets.depths import pooled_depths_model
    from pipeline.nets.weights import build_with_weights, parse_weights, sha256_file

    backbone = get_backbone(attrs["base"])
    size, pooling = int(attrs["input_size"]), str(attrs.get("pooling", "avg"))
    recorded = str(attrs.get("weights", "imagenet"))
    resolved = parse_weights(weights if weights is not None else recorded, backbone)
    want = str(attrs.get("weights_sha256") or "")
    if isinstance(resolved, Path) and want and sha256_file(resolved) != want:
        raise UsageError(f"weights {resolved} differ from the ones the features were extracted with")
    state = random.getstate()
    random.seed(0)  # as extract: --weights none gives the same random base
    try:
        if backbone.hub:  # the preset's converter and the pooled pyramid levels, built by pipeline.nets.hub
            trunk, winfo = build_with_weights(backbone, resolved, size, pooling, depths=tuple(layers))
        else:
            base_model, winfo = build_with_weights(backbone, resolved, size, pooling)
            trunk = pooled_depths_model(base_model, tuple(layers), pooling)
    finally:
        random.setstate(state)
    return backbone, size, pooling, trunk, winfo


def build_depth_export(head_dir: Path, model_dir: Path, info: dict[str, Any], attrs: dict[str, Any],
                       weights: str | None = None, fixed_size: bool = False,
                       metadata_version: int = 2) -> tuple[Any, dict[str, Any]]:
    """The image -> probabilities model of a multi-depth head, and its metadata (tlpipe.json, in
    ``pipeline.deploy.export``'s format ``metadata_version``)."""
    from pipeline.heads.auto import load_any_head
    from pipeline.nets.extractor import builtin_preprocess
    from pipeline.nets.graph import OUTPUT_LAYER, resize_in_graph

    head = load_any_head(model_dir)
    W, b, layers = head.linear()
    backbone, size, pooling, trunk, winfo = depth_trunk(attrs, weights, layers)
    if int(trunk.output_shape[-1]) != W.shape[0]:
        raise UsageError(f"the chosen depths give {trunk.output_shape[-1]} features but the head expects {W.shape[0]}")
    image = keras.Input(shape=(size, size, 3) if fixed_size else (None, None, 3), dtype="uint8", name="image")
    x = (keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(image) if fixed_size
         else resize_in_graph(image, size))
    for layer in builtin_preprocess(backbone, name="preprocess"):
        x = layer(x)
    dense = keras.layers.Dense(W.shape[1], activation="softmax", name="auto_head")
    dense.build((None, W.shape[0]))
    dense.set_weights([W, b])
    out = dense(trunk(x, training=False))
    if head.tta:
        mirrored = dense(trunk(mirror_layers(x, size), training=False))
        out = keras.layers.Average(name="mean_with_mirror")([out, mirrored])
    out = keras.layers.Activation("linear", dtype="float32", name=OUTPUT_LAYER)(out)
    model = keras.Model(image, out, name=re.sub(r"[^A-Za-z0-9_]", "_", f"tlpipe_{backbone.name}_auto"))
    model.trainable = False
    metadata = {"format_version": metadata_version, "class_names": list(info["classes"]), "base": backbone.name,
                "input_size": size, "input_sizes": [size], "inputs": ["image"],
                "input_shape": "fixed: [N, S, S, 3] uint8, S = input_size" if fixed_size
                else "any: [N, H, W, 3] uint8, resized inside",
                "pooling": pooling, "weights": winfo.label, "weights_sha256": winfo.sha256,
                "branches": [{"base": backbone.name, "input_size": size, "pooling": pooling,
                              "weights": winfo.label, "weights_sha256": winfo.sha256}],
                "depths": layers, "test_time_mirror": bool(head.tta),
                "requires": ["keras", "keras-hub"] if backbone.hub else ["keras"],
                "head": info["head"], "head_dir": str(head_dir), "custom_layers": False,
                "features": info.get("features"), "fingerprints": info.get("fingerprints")}
    return model, metadata


def head_json(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "head.json").read_text())
