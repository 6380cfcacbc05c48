"""The ``blocks`` column of the bases table: the output of every block or stage of each base, shallow
to deep (``tlpipe extract --layers blocks``).

Read off the layer names of each ``keras.applications`` model built with ``weights=None``;
tests/test_depths.py checks that every name exists (one base per family; every base with
``TLPIPE_ALL_BASES=1``).  Only layers with stable names are listed (Keras numbers unnamed layers per
session: ``add_3``, ``activation_17``), so Xception's middle flow is represented by its blocks' last
batch norm, and MobileNetV3 by its residual additions only.
"""

from __future__ import annotations

_VGG = tuple(f"block{i}_pool" for i in range(1, 6))
_MOBILENET = tuple(f"conv_pw_{i}_relu" for i in range(1, 14))


def _resnet(blocks3: int, blocks4: int, last: str | None = None) -> tuple[str, ...]:
    out = ("conv2_block3_out", f"conv3_block{blocks3}_out", f"conv4_block{blocks4}_out", "conv5_block3_out")
    return out + ((last,) if last else ())


_DENSENET = ("pool2_pool", "pool3_pool", "pool4_pool", "relu")  # the same names at every depth


def _efficientnet(repeats: list[int], depth: float, top: bool = True) -> tuple[str, ...]:
    """The last layer of each stage: ``block<i><letter>_add`` (``_project_bn`` when the stage has one block)."""
    import math

    out = []
    for i, r in enumerate(repeats, start=1):
        n = int(math.ceil(depth * r))
        out.append(f"block{i}a_project_bn" if n == 1 else f"block{i}{chr(96 + n)}_add")
    return tuple(out) + (("top_activation",) if top else ())


_EFF_B = [1, 2, 2, 3, 3, 4, 1]
_EFF_V2_B = [1, 2, 2, 3, 5, 8]


def _convnext(name: str, depths: list[int]) -> tuple[str, ...]:
    return tuple(f"{name}_stage_{i}_block_{d - 1}_identity" for i, d in enumerate(depths))


BLOCKS: dict[str, tuple[str, ...]] = {
    "vgg16": _VGG, "vgg19": _VGG,
    "resnet50": _resnet(4, 6), "resnet101": _resnet(4, 23), "resnet152": _resnet(8, 36),
    "resnet50_v2": _resnet(4, 6, "post_relu"), "resnet101_v2": _resnet(4, 23, "post_relu"),
    "resnet152_v2": _resnet(8, 36, "post_relu"),
    "inception_v3": tuple(f"mixed{i}" for i in range(11)),
    "inception_resnet_v2": ("mixed_5b", "block35_10_ac", "mixed_6a", "block17_20_ac", "mixed_7a",
                            "block8_9_ac", "conv_7b_ac"),
    "xception": ("block2_pool", "block3_pool", "block4_pool", "block6_sepconv3_bn", "block8_sepconv3_bn",
                 "block10_sepconv3_bn", "block12_sepconv3_bn", "block13_pool", "block14_sepconv2_act"),
    "mobilenet": _MOBILENET, "mobilenet_0.75": _MOBILENET, "mobilenet_0.5": _MOBILENET,
    "mobilenet_0.25": _MOBILENET,
    "mobilenet_v2": ("block_2_add", "block_5_add", "block_9_add", "block_12_add", "block_15_add", "out_relu"),
    "mobilenet_v3_small": ("expanded_conv_2_add", "expanded_conv_5_add", "expanded_conv_7_add",
                           "expanded_conv_9_add", "expanded_conv_10_add"),
    "mobilenet_v3_large": ("expanded_conv_2_add", "expanded_conv_5_add", "expanded_conv_9_add",
                           "expanded_conv_11_add", "expanded_conv_13_add", "expanded_conv_14_add"),
    "densenet121": _DENSENET, "densenet169": _DENSENET, "densenet201": _DENSENET,
    "nasnet_mobile": ("reduction_concat_stem_2", "normal_concat_3", "reduction_concat_reduce_4", "normal_concat_8",
                      "reduction_concat_reduce_8", "normal_concat_12"),
    "nasnet_large": ("reduction_concat_stem_2", "normal_concat_5", "reduction_concat_reduce_6", "normal_concat_12",
                     "reduction_concat_reduce_12", "normal_concat_18"),
    **{f"efficientnet_b{i}": _efficientnet(_EFF_B, d)
       for i, d in enumerate([1.0, 1.1, 1.2, 1.4, 1.8, 2.2, 2.6, 3.1])},
    **{f"efficientnet_v2_b{i}": _efficientnet(_EFF_V2_B, d) for i, d in enumerate([1.0, 1.1, 1.2, 1.4])},
    "efficientnet_v2_s": _efficientnet([2, 4, 4, 6, 9, 15], 1.0),
    "efficientnet_v2_m": _efficientnet([3, 5, 5, 7, 14, 18, 5], 1.0),
    "efficientnet_v2_l": _efficientnet([4, 7, 7, 10, 19, 25, 7], 1.0),
    "convnext_tiny": _convnext("convnext_tiny", [3, 3, 9, 3]),
    **{f"convnext_{v}": _convnext(f"convnext_{v}", [3, 3, 27, 3]) for v in ("small", "base", "large", "xlarge")},
}
