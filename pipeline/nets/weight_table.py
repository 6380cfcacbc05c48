"""The arrays of each keras.applications base without its top, as ``(count, values)``: what a weights file
for it holds (``model.save_weights`` or Keras' ``*_notop.h5``), independent of the input size.

Read off each base built with ``weights=None`` (``pipeline.nets.weights.model_weight_shapes``), so that a
``--weights`` file of another base, or one with the classification top, is refused with h5py alone, before
TensorFlow is imported (``pipeline.nets.weights.check_weight_arrays``).  tests/test_fast_failures.py checks
two bases; every base with ``TLPIPE_ALL_BASES=1``.
"""

from __future__ import annotations

WEIGHT_ARRAYS: dict[str, tuple[int, int]] = {
    "vgg16": (26, 14714688),
    "vgg19": (32, 20024384),
    "resnet50": (318, 23587712),
    "resnet101": (624, 42658176),
    "resnet152": (930, 58370944),
    "resnet50_v2": (270, 23564800),
    "resnet101_v2": (542, 42626560),
    "resnet152_v2": (814, 58331648),
    "inception_v3": (376, 21802784),
    "inception_resnet_v2": (896, 54336736),
    "xception": (234, 20861480),
    "mobilenet": (135, 3228864),
    "mobilenet_0.75": (135, 1832976),
    "mobilenet_0.5": (135, 829536),
    "mobilenet_0.25": (135, 218544),
    "mobilenet_v2": (260, 2257984),
    "mobilenet_v3_small": (206, 939120),
    "mobilenet_v3_large": (262, 2996352),
    "densenet121": (604, 7037504),
    "densenet169": (844, 12642880),
    "densenet201": (1004, 18321984),
    "nasnet_mobile": (1124, 4269716),
    "nasnet_large": (1544, 84916818),
    "efficientnet_b0": (311, 4049570),
    "efficientnet_b1": (439, 6575238),
    "efficientnet_b2": (439, 7768568),
    "efficientnet_b3": (496, 10783534),
    "efficientnet_b4": (610, 17673822),
    "efficientnet_b5": (738, 28513526),
    "efficientnet_b6": (852, 40960142),
    "efficientnet_b7": (1037, 64097686),
    "efficientnet_v2_b0": (359, 5919312),
    "efficientnet_v2_b1": (441, 6931124),
    "efficientnet_v2_b2": (460, 8769374),
    "efficientnet_v2_b3": (536, 12930622),
    "efficientnet_v2_s": (670, 20331360),
    "efficientnet_v2_m": (961, 53150388),
    "efficientnet_v2_l": (1329, 117746848),
    "convnext_tiny": (180, 27820128),
    "convnext_small": (342, 49454688),
    "convnext_base": (342, 87566464),
    "convnext_large": (342, 196230336),
    "convnext_xlarge": (342, 348147968),
}
