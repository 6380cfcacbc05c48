"""The table of convolutional bases: one row per ``keras.applications`` model.

Each row names the constructor, the base's own ``preprocess_input``, its default
input size, the size of its pooled feature vector and the file name Keras caches
its ImageNet (no-top) weights under.  Adding a base is one row in ``_ROWS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.errors import UsageError
from pipeline.nets import hub


@dataclass(frozen=True)
class Backbone:
    """One convolutional base."""

    name: str
    module: str  # module under keras.applications holding preprocess_input
    constructor: str  # constructor name in keras.applications
    input_size: int  # default square input size
    feature_size: int  # length of the globally pooled feature vector
    weights_file: str  # file name of the ImageNet no-top weights in the Keras cache
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    min_size: int = 32  # smallest input the architecture accepts

    hub = False  # a keras.applications base (pipeline.nets.hub.HubBackbone: a KerasHub preset)

    @property
    def constructor_path(self) -> str:
        return f"keras.applications.{self.constructor}"

    @property
    def preprocessing(self) -> str:
        """What the features record as preprocessing (in the attributes and the fingerprint)."""
        return f"keras.applications.{self.module}.preprocess_input"

    def pooling_for(self, pooling: str | None) -> str:
        """The pooling to use for ``--pooling`` (``auto``: global average)."""
        p = (pooling or "auto").strip().lower()
        if p == "auto":
            return "avg"
        if p not in ("avg", "max"):
            raise UsageError(f"--pooling {p} does not fit {self.name} (a keras.applications CNN); use auto, avg or max")
        return p

    @property
    def preprocess_mode(self) -> str:
        """What ``preprocess_input`` does: ``caffe``, ``tf``, ``torch`` or ``none`` (see ``PREPROCESS_MODES``)."""
        return PREPROCESS_MODES[self.module]

    @property
    def preprocess_input(self) -> Callable[..., Any]:
        """The base's own ``keras.applications.<module>.preprocess_input``."""
        return getattr(_module(self.module), "preprocess_input")

    def build(self, weights: str | None, input_size: int | None = None, pooling: str = "avg"):
        """Build the frozen base (``include_top=False``) with global pooling."""
        size = input_size or self.input_size
        import keras

        ctor = getattr(keras.applications, self.constructor)
        model = ctor(
            include_top=False,
            weights=weights,
            input_shape=(size, size, 3),
            pooling=pooling,
            **self.kwargs,
        )
        model.trainable = False
        return model


# What each module's preprocess_input does (keras.applications.imagenet_utils):
#   caffe: RGB -> BGR, then subtract the ImageNet channel means (no scaling);
#   tf:    x / 127.5 - 1;
#   torch: x / 255, then (x - mean) / std per RGB channel;
#   none:  identity (the model rescales inside itself: EfficientNet, EfficientNetV2, ConvNeXt,
#          MobileNetV3).
# tests/test_export_formats.py checks every row against the module's own preprocess_input.
PREPROCESS_MODES: dict[str, str] = {
    "vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe",
    "resnet_v2": "tf", "inception_v3": "tf", "inception_resnet_v2": "tf", "xception": "tf",
    "mobilenet": "tf", "mobilenet_v2": "tf", "nasnet": "tf",
    "densenet": "torch",
    "mobilenet_v3": "none", "efficientnet": "none", "efficientnet_v2": "none", "convnext": "none",
}


def _module(name: str):
    return importlib.import_module(f"keras.applications.{name}")


# name, module, constructor, input size, feature size, weights file, extra
_ROWS: list[Backbone] = [
    Backbone("vgg16", "vgg16", "VGG16", 224, 512,
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("vgg19", "vgg19", "VGG19", 224, 512,
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("resnet50", "resnet", "ResNet50", 224, 2048,
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("resnet101", "resnet", "ResNet101", 224, 2048,
             "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("resnet152", "resnet", "ResNet152", 224, 2048,
             "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("resnet50_v2", "resnet_v2", "ResNet50V2", 224, 2048,
             "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", aliases=("resnet50v2",)),
    Backbone("resnet101_v2", "resnet_v2", "ResNet101V2", 224, 2048,
             "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5", aliases=("resnet101v2",)),
    Backbone("resnet152_v2", "resnet_v2", "ResNet152V2", 224, 2048,
             "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5", aliases=("resnet152v2",)),
    Backbone("inception_v3", "inception_v3", "InceptionV3", 299, 2048,
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
             aliases=("googlenet", "inceptionv3"), min_size=75),
    Backbone("inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", 299, 1536,
             "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
             aliases=("inceptionresnetv2",), min_size=75),
    Backbone("xception", "xception", "Xception", 299, 2048,
             "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", min_size=71),
    Backbone("mobilenet", "mobilenet", "MobileNet", 224, 1024,
             "mobilenet_1_0_224_tf_no_top.h5", aliases=("mobilenet_1.0",)),
    Backbone("mobilenet_0.75", "mobilenet", "MobileNet", 224, 768,
             "mobilenet_7_5_224_tf_no_top.h5", kwargs={"alpha": 0.75}),
    Backbone("mobilenet_0.5", "mobilenet", "MobileNet", 224, 512,
             "mobilenet_5_0_224_tf_no_top.h5", kwargs={"alpha": 0.5}),
    Backbone("mobilenet_0.25", "mobilenet", "MobileNet", 224, 256,
             "mobilenet_2_5_224_tf_no_top.h5", kwargs={"alpha": 0.25}),
    Backbone("mobilenet_v2", "mobilenet_v2", "MobileNetV2", 224, 1280,
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
             aliases=("mobilenetv2",)),
    Backbone("mobilenet_v3_small", "mobilenet_v3", "MobileNetV3Small", 224, 576,
             "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
             aliases=("mobilenetv3small",)),
    Backbone("mobilenet_v3_large", "mobilenet_v3", "MobileNetV3Large", 224, 960,
             "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
             aliases=("mobilenetv3large",)),
    Backbone("densenet121", "densenet", "DenseNet121", 224, 1024,
             "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("densenet169", "densenet", "DenseNet169", 224, 1664,
             "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("densenet201", "densenet", "DenseNet201", 224, 1920,
             "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("nasnet_mobile", "nasnet", "NASNetMobile", 224, 1056,
             "nasnet_mobile_no_top.h5", aliases=("nasnetmobile",)),
    Backbone("nasnet_large", "nasnet", "NASNetLarge", 331, 4032,
             "nasnet_large_no_top.h5", aliases=("nasnetlarge",)),
    *[
        Backbone(f"efficientnet_b{i}", "efficientnet", f"EfficientNetB{i}", size, feat,
                 f"efficientnetb{i}_notop.h5", aliases=(f"efficientnetb{i}",))
        for i, (size, feat) in enumerate([
            (224, 1280), (240, 1280), (260, 1408), (300, 1536),
            (380, 1792), (456, 2048), (528, 2304), (600, 2560),
        ])
    ],
    *[
        Backbone(f"efficientnet_v2_{v}", "efficientnet_v2", f"EfficientNetV2{v.upper()}", size, feat,
                 f"efficientnetv2-{v}_notop.h5", aliases=(f"efficientnetv2{v}",))
        for v, size, feat in [
            ("b0", 224, 1280), ("b1", 240, 1280), ("b2", 260, 1408), ("b3", 300, 1536),
            ("s", 384, 1280), ("m", 480, 1280), ("l", 480, 1280),
        ]
    ],
    *[
        Backbone(f"convnext_{v}", "convnext", f"ConvNeXt{ctor}", 224, feat,
                 f"convnext_{v}_notop.h5", aliases=(f"convnext{v}",))
        for v, ctor, feat in [("tiny", "Tiny", 768), ("small", "Small", 768), ("base", "Base", 1024),
                              ("large", "Large", 1536), ("xlarge", "XLarge", 2048)]
    ],
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ROWS}
ALIASES: dict[str, str] = {a: b.name for b in _ROWS for a in b.aliases}


def names() -> list[str]:
    """Canonical names of every base, in table order."""
    return list(BACKBONES)


def get_backbone(name: str) -> Backbone:
    """Look a base up by name or alias (case-insensitive, '-' same as '_'); ``hub:PRESET``: a KerasHub preset."""
    if not isinstance(name, str):  # already a base (a Backbone or a hub.HubBackbone)
        return name
    if hub.is_hub_name(name):
        return hub.get_hub_backbone(name)
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in BACKBONES:
        import difflib

        close = difflib.get_close_matches(key, [*BACKBONES, *ALIASES], n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UsageError(f"unknown base '{name}'; {hint}valid bases: {', '.join(names())} "
                         "(aliases such as googlenet = inception_v3; KerasHub presets as hub:PRESET: "
                         "see 'tlpipe bases')")
    return BACKBONES[key]


def hub_bases() -> list:
    """The listed KerasHub bases (``hub:PRESET``; ``pipeline.nets.hub.HubBackbone``), for 'tlpipe bases'."""
    return hub.listing()
