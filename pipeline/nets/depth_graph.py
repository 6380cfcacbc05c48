"""The Keras graph of a head on pooled depths: the trunk that computes the depths' pools from the
base's preprocessed input in one pass, and the exact mirror flip with built-in layers.

Shared by export (``pipeline.deploy``) and fine-tuning (``pipeline.stage3``), so the exported and the
fine-tuned models compute the depths exactly as stage one stored them.
"""

from __future__ import annotations

from typing import Any


__all__ = ["mirror_layers", "depth_trunk"]


def mirror_layers(x, size: int, suffix: str = ""):
    """``x[:, :, ::-1, :]`` with built-in layers (exact: a permutation matrix on the width axis)."""
    import keras  # here, not at the top: fine-tune's checks run before Keras loads
    import numpy as np

    x = keras.layers.Permute((1, 3, 2), name=f"width_last{suffix}")(x)
    flip = keras.layers.Dense(size, use_bias=False, trainable=False, name=f"mirror{suffix}")
    flip.build((None, None, 3, size))
    flip.set_weights([np.eye(size, dtype="float32")[::-1]])
    x = flip(x)
    return keras.layers.Permute((1, 3, 2), name=f"width_back{suffix}")(x)


def depth_trunk(attrs: dict[str, Any], weights: str | None, layers: list[str], name: str = "depths"):
    """``(backbone, size, pooling, trunk, weights info)``: the trunk computes ``layers``' pools from the
    base's (preprocessed) input in one pass, with the weights the features file was extracted with."""
    from pipeline.nets.depths import pooled_depths_model
    from pipeline.nets.weights import build_with_weights, seeded_init, weights_of_features

    backbone, resolved = weights_of_features(attrs, weights)
    size, pooling = int(attrs["input_size"]), str(attrs.get("pooling", "avg"))
    with seeded_init():  # as extract: --weights none gives the same random base
        if backbone.hub:  # the preset's converter and the pooled pyramid levels, built by pipeline.nets.hub
            trunk, winfo = build_with_weights(backbone, resolved, size, pooling, depths=tuple(layers))
        else:
            base_model, winfo = build_with_weights(backbone, resolved, size, pooling)
            # "last" (a file of --layers last): the base's own pooled output, the pool of the layer before it
            last = base_model.layers[-2].name if len(base_model.output.shape) == 2 else base_model.layers[-1].name
            trunk = pooled_depths_model(base_model, tuple(last if n == "last" else n for n in layers), pooling,
                                        name=name)
    return backbone, size, pooling, trunk, winfo
