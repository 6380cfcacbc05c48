"""Export of heads fitted on several pooled depths (``--head auto``): image -> probabilities.
The trunk and the mirror flip are ``pipeline.nets.depth_graph``'s (shared with fine-tuning).

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
import re
from pathlib import Path
from typing import Any

import keras

from pipeline.core.errors import UsageError
from pipeline.nets.depth_graph import depth_trunk, mirror_layers
from pipeline.nets.graph import OUTPUT_LAYER

DEPTH_HEADS = ("auto",)


def size_groups(layers: list[str], size: int) -> list[tuple[int, list[str]]]:
    """``[(input size, [depth, ...])]`` in the head's order: depths named ``NAME@SIZE`` (files of one base
    fused at several input sizes) grouped by size, else every depth at the file's ``size``."""
    from pipeline.store.features import split_size

    groups: list[tuple[int, list[str]]] = []
    for layer in layers:
        name, at = split_size(layer)
        at = size if at is None else at
        if groups and groups[-1][0] == at:
            groups[-1][1].append(name)
        elif any(g[0] == at for g in groups):
            raise UsageError(f"the head's depths are not grouped by input size ({', '.join(layers)}); refit it")
        else:
            groups.append((at, [name]))
    return groups


def build_depth_export(head_dir: Path, model_dir: Path, info: dict[str, Any], attrs: dict[str, Any],
                       weights: str | None = None, fixed_size: bool = False,
                       metadata_version: int = 2) -> tuple[Any, dict[str, Any]]:
    """The image -> probabilities model of a multi-depth head, and its metadata (tlpipe.json, in
    ``pipeline.deploy.export``'s format ``metadata_version``).  A head on depths at several input sizes
    (``NAME@SIZE``) takes one input per size, ``image_<size>``, each resized as at extraction (as
    ``pipeline.deploy.export`` does for fused files; ``tlpipe predict`` feeds them)."""
    from pipeline.heads.auto import load_any_head
    from pipeline.nets.backbones import get_backbone

    head = load_any_head(model_dir)
    W, b, layers = head.linear()
    groups = size_groups(layers, int(attrs["input_size"]))
    multi = len(groups) > 1
    if multi and get_backbone(attrs["base"]).hub:
        raise UsageError("export of a head on a KerasHub base at several input sizes is not supported; refit "
                         "--head auto on one features file")
    branches = [_branch(attrs, weights, size, names, multi, fixed_size) for size, names in groups]
    backbone, pooling, winfo = branches[0]["backbone"], branches[0]["pooling"], branches[0]["winfo"]
    width = sum(int(br["trunk"].output_shape[-1]) for br in branches)
    if width != W.shape[0]:
        raise UsageError(f"the chosen depths give {width} features but the head expects {W.shape[0]}")
    dense = keras.layers.Dense(W.shape[1], activation="softmax", name="auto_head")
    dense.build((None, W.shape[0]))
    dense.set_weights([W, b])
    out = dense(_joined([br["trunk"](br["x"], training=False) for br in branches], "depths_sizes"))
    if head.tta:
        mirrored = [br["trunk"](mirror_layers(br["x"], br["size"], br["suffix"]), training=False) for br in branches]
        out = keras.layers.Average(name="mean_with_mirror")([out, dense(_joined(mirrored, "mirror_sizes"))])
    out = keras.layers.Activation("linear", dtype="float32", name=OUTPUT_LAYER)(out)
    inputs = [br["input"] for br in branches]
    model = keras.Model(inputs if multi else inputs[0], out,
                        name=re.sub(r"[^A-Za-z0-9_]", "_", f"tlpipe_{backbone.name}_auto"))
    model.trainable = False
    sizes = [br["size"] for br in branches]
    metadata = {"format_version": metadata_version, "class_names": list(info["classes"]), "base": backbone.name,
                "input_size": sizes[0], "input_sizes": sizes,
                "inputs": [f"image_{s}" for s in sizes] if multi else ["image"],
                "input_shape": "fixed: [N, S, S, 3] uint8, S = input_size" if fixed_size
                else "any: [N, H, W, 3] uint8, resized inside",
                "pooling": pooling, "weights": winfo.label, "weights_sha256": winfo.sha256,
                "branches": [{"base": backbone.name, "input_size": br["size"], "pooling": pooling,
                              "weights": winfo.label, "weights_sha256": winfo.sha256,
                              "depths": br["depths"]} for br in branches],
                "depths": layers, "test_time_mirror": bool(head.tta),
                "requires": ["keras", "keras-hub"] if backbone.hub else ["keras"],
                "head": info["head"], "head_dir": str(head_dir), "custom_layers": False,
                "features": info.get("features"), "fingerprints": info.get("fingerprints")}
    return model, metadata


def _branch(attrs: dict[str, Any], weights: str | None, size: int, names: list[str], multi: bool,
            fixed_size: bool) -> dict[str, Any]:
    """One input size: its image input, resize and preprocessing, and the trunk of its depths."""
    from pipeline.nets.extractor import builtin_preprocess
    from pipeline.nets.graph import resize_in_graph

    suffix = f"_{size}" if multi else ""
    backbone, size, pooling, trunk, winfo = depth_trunk({**attrs, "input_size": size}, weights, names,
                                                        name=f"depths{suffix}")
    image = keras.Input(shape=(size, size, 3) if fixed_size else (None, None, 3), dtype="uint8",
                        name=f"image{suffix}")
    x = (keras.layers.Rescaling(1.0, dtype="float32", name=f"to_float{suffix}")(image) if fixed_size
         else resize_in_graph(image, size, suffix))
    for layer in builtin_preprocess(backbone, name=f"preprocess{suffix}"):
        x = layer(x)
    return {"backbone": backbone, "size": size, "pooling": pooling, "trunk": trunk, "winfo": winfo, "input": image,
            "x": x, "suffix": suffix, "depths": names}


def _joined(parts: list, name: str):
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(name=name)(parts)


def head_json(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "head.json").read_text())
