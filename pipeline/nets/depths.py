"""Depths: which layers of a base stage one pools and stores, and the multi-depth extractor.

``--layers`` is ``last`` (the base's pooled output: today's features file), ``blocks`` (the output
of every block or stage of the base: ``BLOCKS[base]``) or explicit layer names, comma-separated.

A multi-depth extractor returns ONE float32 matrix: the globally pooled output of each depth, side
by side in the order asked for.  The features file records the depths and their widths
(attributes ``depths`` and ``depth_dims``), so ``depth_slices`` recovers each depth's columns and a
head reads any subset without extracting again.  One output tensor keeps every part of stage one
as it is (resume, shards, merge, the Ray engine, the OpenVINO conversion).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.nets import hub
from pipeline.nets.block_table import BLOCKS

__all__ = ["BLOCKS", "parse_layers", "resolve_layers", "depth_slices", "depths_of", "build_depth_extractor",
           "pooled_depths_model"]


def parse_layers(spec: str | None) -> str | tuple[str, ...]:
    """``"last"`` / ``"blocks"`` or a tuple of names from a ``--layers`` value (one line on nonsense)."""
    text = str(spec or "last").strip()
    if text.lower() in ("last", "blocks"):
        return text.lower()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError(f"--layers must be last, blocks or layer names separated by commas, not '{spec}'")
    if len(set(names)) != len(names):
        raise UsageError(f"--layers names a layer twice: {text}")
    return names


def resolve_layers(base: str, spec: str | tuple[str, ...] | None, model: Any = None) -> tuple[str, ...] | None:
    """The layer names to pool for ``spec`` on ``base`` (None: ``last``, the plain extractor).

    Names are checked against ``model`` when given (a built base), else against the table; a short
    name such as ``conv_pw_7`` stands for ``conv_pw_7_relu`` when that is a block.  An unknown name
    fails in one line listing the valid ones.  A hub base (``hub:PRESET``) offers the levels of its
    KerasHub feature pyramid (``pipeline.nets.hub.resolve_depths``: ``blocks`` stays ``("blocks",)``
    until the backbone is loaded; a family without a pyramid fails here in one line).
    """
    spec = parse_layers(spec) if isinstance(spec, str) or spec is None else tuple(spec)
    if spec == "last":
        return None
    if hub.is_hub_name(base):  # a KerasHub base: its feature pyramid (checked when built: hub.build_pooled_depths)
        return hub.resolve_depths(hub.get_hub_backbone(base), spec)
    blocks = BLOCKS.get(base)
    if blocks is None:
        raise UsageError(f"no depth table for base '{base}'; use --layers last")
    if spec == "blocks":
        return tuple(blocks)
    valid = [layer.name for layer in model.layers] if model is not None else list(blocks)
    out = []
    for name in spec:
        hit = name if name in valid else next((b for b in blocks if b.startswith(name + "_")), None)
        if hit is None or hit not in valid:
            raise UsageError(f"unknown layer '{name}' for {base}; {keyword_hint(name)}its blocks are: "
                             f"{', '.join(blocks)}"
                             + ("" if model is None else " (any layer name of the base is accepted)"))
        out.append(hit)
    return tuple(out)


def keyword_hint(name: str) -> str:
    """``"did you mean blocks? "`` when ``name`` looks like a mistyped keyword of ``--layers``."""
    import difflib

    close = difflib.get_close_matches(name.lower(), ["last", "blocks"], n=1, cutoff=0.6)
    return f"did you mean --layers {close[0]}? (keywords: last, blocks) " if close else ""


def depths_of(attrs: dict[str, Any]) -> list[tuple[str, int]]:
    """``[(depth, width)]`` recorded in a features file's attributes (``[("last", D)]`` when one)."""
    import json

    names, dims = attrs.get("depths"), attrs.get("depth_dims")
    if isinstance(names, str):
        names = json.loads(names)
    if isinstance(dims, str):
        dims = json.loads(dims)
    if not names:
        return [("last", int(attrs.get("feature_size", 0)))]
    return [(str(n), int(d)) for n, d in zip(names, dims)]


def depth_slices(attrs: dict[str, Any]) -> dict[str, slice]:
    """``{depth: columns}`` of the stored features matrix."""
    out, start = {}, 0
    for name, dim in depths_of(attrs):
        out[name] = slice(start, start + dim)
        start += dim
    return out


def pooled_depths_model(base_model, layers: tuple[str, ...], pooling: str = "avg", name: str = "depths"):
    """``base input -> concat(pool(layer) for layer in layers)`` sharing ``base_model``'s layers."""
    import keras

    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    outs = [pool(name=f"pool_{layer}")(base_model.get_layer(layer).output) for layer in layers]
    merged = outs[0] if len(outs) == 1 else keras.layers.Concatenate(name="depths_concat")(outs)
    return keras.Model(base_model.inputs, merged, name=name)


def build_depth_extractor(backbone, base_model, input_size: int, layers: tuple[str, ...], pooling: str = "avg"):
    """``uint8 image -> float32 [pooled depth, ...]`` (the extractor of ``--layers`` other than last).

    A hub base's ``base_model`` already pools its depths behind the preset's converter
    (``pipeline.nets.hub.build_pooled_depths``): it is wrapped as ``build_extractor`` wraps a hub base."""
    import keras

    from pipeline.nets.extractor import BasePreprocess, accelerator, build_extractor

    if backbone.hub:
        return build_extractor(backbone, base_model, input_size)

    trunk = pooled_depths_model(base_model, layers, pooling, name=f"{backbone.name}_depths".replace(".", "_"))
    trunk.trainable = False
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name="image")
    x = BasePreprocess(backbone.name, name="preprocess")(inputs)
    x = trunk(x, training=False)
    outputs = keras.layers.Activation("linear", dtype="float32", name="features")(x)
    model = keras.Model(inputs, outputs, name=f"tlpipe_{backbone.name}_depths".replace(".", "_"))
    model.trainable = False
    model.compile(jit_compile=accelerator() is not None or keras.backend.backend() == "jax")
    return model


def layer_dims(base_model, layers: tuple[str, ...]) -> list[int]:
    """Channels of each layer's output (the width of its pooled depth)."""
    return [int(base_model.get_layer(layer).output.shape[-1]) for layer in layers]


def split_columns(X: np.ndarray, attrs: dict[str, Any], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{depth: X[:, columns]}`` for ``names`` (default: every stored depth)."""
    slices = depth_slices(attrs)
    names = list(slices) if names is None else names
    return {n: X[:, slices[n]] for n in names}


def depth_layout(extractor) -> list[tuple[str, int]] | None:
    """``[(layer, width)]`` of a multi-depth extractor (None for the plain one), in column order."""
    for layer in extractor.layers:
        pools = [sub for sub in getattr(layer, "layers", []) if sub.name.startswith("pool_")]
        if pools:
            return [(p.name[len("pool_"):], int(p.output.shape[-1])) for p in pools]
    return None
