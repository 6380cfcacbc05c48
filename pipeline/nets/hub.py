"""KerasHub image backbones as bases: ``--base hub:PRESET`` (DINOv2, CLIP, SigLIP, ViT, ResNet, ...).

A hub base is a KerasHub preset: its ``Backbone`` (architecture + weights) and its image converter
(resize, rescale, normalisation), loaded with ``from_preset`` from a preset folder (``--weights DIR``)
or from KerasHub's own download cache (``--weights imagenet``: the preset's pretrained weights).

The base model built here takes float32 pixels in [0, 255] at the input size and returns one pooled
vector per image: converter -> backbone -> pooling.  Pooling fits the model (``POOLINGS``):

* ``cls`` / ``mean`` / ``cls_mean``: the class token, the mean of the patch tokens (register tokens
  left out), or both concatenated, for ViT-like transformers (DINOv2: ``cls_mean``; ViT: ``cls``);
* ``embed``: the image embedding of an image-text model (CLIP, SigLIP: ``get_vision_embeddings``);
* ``avg`` / ``max``: global average / max of the last feature map, for CNNs.

Every layer is a built-in Keras or KerasHub layer: an exported model loads with ``keras`` and
``keras-hub`` alone.  The table of listed presets (``PRESETS``) needs no KerasHub import; input and
feature sizes there are the published ones, and a features file records the size actually computed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import UsageError

log = logging.getLogger(__name__)

PREFIX = "hub:"
INSTALL = 'pip install "tlpipe[hub]"'
POOLINGS = {
    "cls": "class token",
    "mean": "mean of the patch tokens",
    "cls_mean": "class token and mean of the patch tokens, concatenated",
    "embed": "image embedding (the image-text model's projected vector)",
    "avg": "global average of the last feature map",
    "max": "global max of the last feature map",
}


@dataclass(frozen=True)
class Family:
    """How tlpipe runs one KerasHub model family."""

    backbone_class: str  # keras_hub.models.<name>
    kind: str  # tokens | embed | cnn
    poolings: tuple[str, ...]  # the first is the default (--pooling auto)
    resizable: bool  # any input size (interpolated position embeddings, or convolutional)
    pyramid: bool = False  # exposes intermediate outputs (``pyramid_outputs``): depths for --layers


FAMILIES: dict[str, Family] = {
    "dinov2": Family("DINOV2Backbone", "tokens", ("cls_mean", "cls", "mean"), True, pyramid=True),
    "vit": Family("ViTBackbone", "tokens", ("cls", "mean", "cls_mean"), False),
    "clip": Family("CLIPBackbone", "embed", ("embed",), False),
    "siglip": Family("SigLIPBackbone", "embed", ("embed",), False),
    "resnet": Family("ResNetBackbone", "cnn", ("avg", "max"), True, pyramid=True),
    "efficientnet": Family("EfficientNetBackbone", "cnn", ("avg", "max"), True, pyramid=True),
    "mobilenet": Family("MobileNetBackbone", "cnn", ("avg", "max"), True),
    "densenet": Family("DenseNetBackbone", "cnn", ("avg", "max"), True, pyramid=True),
}

# family -> (preset, input size, width): width is the token / embedding / channel size of the preset
# (published model dimensions; the pooled feature size follows from it and the pooling).
_TABLE: dict[str, list[tuple[str, int, int]]] = {
    "dinov2": [(f"dinov2{reg}_{s}", 224, w) for reg in ("", "_with_registers")
               for s, w in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536))],
    "vit": [("vit_base_patch16_224_imagenet", 224, 768), ("vit_base_patch16_384_imagenet", 384, 768),
            ("vit_large_patch16_224_imagenet", 224, 1024), ("vit_large_patch16_384_imagenet", 384, 1024),
            ("vit_base_patch32_384_imagenet", 384, 768), ("vit_large_patch32_384_imagenet", 384, 1024),
            ("vit_base_patch16_224_imagenet21k", 224, 768), ("vit_base_patch32_224_imagenet21k", 224, 768),
            ("vit_huge_patch14_224_imagenet21k", 224, 1280), ("vit_large_patch16_224_imagenet21k", 224, 1024),
            ("vit_large_patch32_224_imagenet21k", 224, 1024)],
    "clip": [("clip_vit_base_patch16", 224, 512), ("clip_vit_base_patch32", 224, 512),
             ("clip_vit_large_patch14", 224, 768), ("clip_vit_large_patch14_336", 336, 768),
             ("clip_vit_b_32_laion2b_s34b_b79k", 224, 512), ("clip_vit_h_14_laion2b_s32b_b79k", 224, 1024),
             ("clip_vit_g_14_laion2b_s12b_b42k", 224, 1024), ("clip_vit_bigg_14_laion2b_39b_b160k", 224, 1280)],
    "siglip": [*[(f"siglip_base_patch16_{s}", s, 768) for s in (224, 256, 384, 512)],
               ("siglip_large_patch16_256", 256, 1024), ("siglip_large_patch16_384", 384, 1024),
               ("siglip_so400m_patch14_224", 224, 1152), ("siglip_so400m_patch14_384", 384, 1152),
               ("siglip_so400m_patch16_256_i18n", 256, 1152), ("siglip_base_patch16_256_multilingual", 256, 768),
               *[(f"siglip2_base_patch16_{s}", s, 768) for s in (224, 256, 384)],
               ("siglip2_base_patch32_256", 256, 768),
               *[(f"siglip2_large_patch16_{s}", s, 1024) for s in (256, 384, 512)],
               *[(f"siglip2_giant_opt_patch16_{s}", s, 1536) for s in (256, 384)],
               *[(f"siglip2_so400m_patch14_{s}", s, 1152) for s in (224, 384)],
               *[(f"siglip2_so400m_patch16_{s}", s, 1152) for s in (256, 384, 512)]],
    "resnet": [("resnet_18_imagenet", 224, 512), *[(f"resnet_{d}_imagenet", 224, 2048) for d in (50, 101, 152)],
               ("resnet_v2_50_imagenet", 224, 2048), ("resnet_v2_101_imagenet", 224, 2048),
               ("resnet_vd_18_imagenet", 224, 512), ("resnet_vd_34_imagenet", 224, 512),
               *[(f"resnet_vd_{v}_imagenet", 224, 2048) for v in
                 ("50", "50_ssld", "50_ssld_v2", "50_ssld_v2_fix", "101", "101_ssld", "152", "200")]],
    "efficientnet": [("efficientnet_b0_ra_imagenet", 224, 1280), ("efficientnet_b0_ra4_e3600_r224_imagenet", 224, 1280),
                     ("efficientnet_b1_ft_imagenet", 240, 1280), ("efficientnet_b1_ra4_e3600_r240_imagenet", 240, 1280),
                     ("efficientnet_b2_ra_imagenet", 260, 1408), ("efficientnet_b3_ra2_imagenet", 300, 1536),
                     ("efficientnet_b4_ra2_imagenet", 380, 1792), ("efficientnet_b5_sw_imagenet", 456, 2048),
                     ("efficientnet_b5_sw_ft_imagenet", 456, 2048), ("efficientnet_lite0_ra_imagenet", 224, 1280)],
    "mobilenet": [("mobilenet_v3_small_050_imagenet", 224, 288), ("mobilenet_v3_small_100_imagenet", 224, 576),
                  ("mobilenet_v3_large_100_imagenet", 224, 960), ("mobilenet_v3_large_100_imagenet_21k", 224, 960)],
    "densenet": [("densenet_121_imagenet", 224, 1024), ("densenet_169_imagenet", 224, 1664),
                 ("densenet_201_imagenet", 224, 1920)],
}


@dataclass(frozen=True)
class HubBackbone:
    """One KerasHub preset as a base (duck-types ``pipeline.nets.backbones.Backbone``)."""

    preset: str
    family: str
    input_size: int
    width: int
    min_size: int = 32

    hub = True
    module = "hub"  # no keras.applications module: the preset's image converter preprocesses
    weights_file = ""
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return PREFIX + self.preset

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"preset": self.preset}

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def constructor(self) -> str:
        return self.spec.backbone_class

    @property
    def constructor_path(self) -> str:
        return f"keras_hub.models.{self.spec.backbone_class}.from_preset"

    @property
    def preprocessing(self) -> str:
        return f"keras_hub image converter of {self.preset}"

    @property
    def preprocess_mode(self) -> str:
        return "none"  # the converter is part of the base model

    @property
    def preprocess_input(self):
        import keras

        return lambda x: keras.ops.cast(x, "float32")

    @property
    def default_pooling(self) -> str:
        return self.spec.poolings[0]

    @property
    def feature_size(self) -> int:
        return self.feature_size_for(self.default_pooling)

    def feature_size_for(self, pooling: str) -> int:
        return 2 * self.width if pooling == "cls_mean" else self.width

    def pooling_for(self, pooling: str | None) -> str:
        """The pooling to use for ``--pooling`` (``auto``: the family's own); one line if it does not fit."""
        p = (pooling or "auto").strip().lower()
        if p == "auto":
            return self.default_pooling
        if p not in self.spec.poolings:
            raise UsageError(f"--pooling {p} does not fit {self.name} ({self.family}); use auto or "
                             f"{' | '.join(self.spec.poolings)}")
        return p

    def handle(self) -> str:
        """KerasHub's handle of the preset (``kaggle://keras/...``), or the preset name."""
        meta = keras_hub_presets().get(self.preset, {})
        return str(meta.get("kaggle_handle") or self.preset)

    def build(self, source: str | Path, input_size: int | None = None, pooling: str = "auto",
              load_weights: bool = True, depths: tuple[str, ...] | None = None):
        """The frozen base: float32 pixels ``[N, S, S, 3]`` in [0, 255] -> pooled features (``depths``: the
        pooled outputs of those pyramid levels side by side, ``build_pooled_depths``)."""
        size, pooling = input_size or self.input_size, self.pooling_for(pooling)
        if depths:
            return build_pooled_depths(self, str(source), size, depths, pooling, load_weights)
        return build_pooled(self, str(source), size, pooling, load_weights)


PRESETS: dict[str, HubBackbone] = {
    preset: HubBackbone(preset, family, size, width)
    for family, rows in _TABLE.items() for preset, size, width in rows
}


def keras_hub_available() -> bool:
    """True when ``keras_hub`` can be imported (checked without importing it)."""
    if "keras_hub" in sys.modules:
        return sys.modules["keras_hub"] is not None
    try:
        return importlib.util.find_spec("keras_hub") is not None
    except (ImportError, ValueError):
        return False


def require_keras_hub(what: str) -> None:
    if not keras_hub_available():
        raise UsageError(f"{what} needs KerasHub, which is not installed: {INSTALL}")


def keras_hub_presets() -> dict[str, dict]:
    """KerasHub's registry of backbone presets (metadata and download handle; shipped in the package)."""
    import keras_hub

    return dict(keras_hub.models.Backbone.presets)


def is_hub_name(name: str) -> bool:
    key = str(name).strip().lower()
    return key.startswith((PREFIX, "hub_", "hub-"))


def get_hub_backbone(name: str) -> HubBackbone:
    """``hub:PRESET`` (or ``hub_PRESET``, a file-name-safe spelling) -> its ``HubBackbone``."""
    key = str(name).strip().lower()
    preset = key[4:].replace("-", "_")
    require_keras_hub(f"--base {name}")
    if preset not in PRESETS:
        import difflib

        close = difflib.get_close_matches(preset, list(PRESETS), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(PREFIX + c for c in close)}? " if close else ""
        raise UsageError(f"unknown hub base '{name}'; {hint}valid hub bases: "
                         f"{', '.join(PREFIX + p for p in PRESETS)} (see 'tlpipe bases')")
    return PRESETS[preset]


def listing() -> list[HubBackbone]:
    """The listed hub bases, in table order."""
    return list(PRESETS.values())


def file_stem(name: str) -> str:
    """The file-name- and DVC-safe spelling of a base name, as output files are named: lower case, ``-`` as
    ``_`` and ``hub:dinov2_small`` as ``hub_dinov2_small`` (which ``--base`` also accepts)."""
    return name.strip().lower().replace("-", "_").replace(":", "_")


# --------------------------------------------------------------------------------------------- presets

def is_preset_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_preset_dir(folder: Path, backbone: HubBackbone) -> Path | None:
    """A preset folder for ``backbone``: ``folder`` itself (it holds ``config.json``) or ``folder/PRESET``."""
    for cand in (folder, folder / backbone.preset):
        if is_preset_dir(cand):
            return cand
    return None


def download_cache_root() -> Path:
    """kagglehub's cache, where KerasHub's ``from_preset`` puts downloaded presets."""
    env = os.environ.get("KAGGLEHUB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kagglehub"


def kaggle_model(backbone: HubBackbone) -> str:
    """The Kaggle model of the preset's handle ``kaggle://keras/MODEL/keras/PRESET/VERSION`` (tests check it
    against KerasHub's registry)."""
    if backbone.family == "resnet":
        return "resnet_vd" if "_vd_" in backbone.preset else "resnetv2" if "_v2_" in backbone.preset else "resnetv1"
    return {"mobilenet": "mobilenetv3"}.get(backbone.family, backbone.family)


def download_folder(backbone: HubBackbone) -> Path:
    """Where KerasHub's download of the preset lands (its versions are subfolders): the path of its
    handle under kagglehub's cache (known without importing KerasHub)."""
    return download_cache_root() / "models" / "keras" / kaggle_model(backbone) / "keras" / backbone.preset


def cached_download(backbone: HubBackbone) -> Path | None:
    """The preset's folder in KerasHub's download cache (the newest version), if downloaded."""
    where = download_folder(backbone)
    versions = sorted((p for p in where.glob("*") if is_preset_dir(p)),
                      key=lambda p: int(p.name) if p.name.isdigit() else -1) if where.is_dir() else []
    return versions[-1] if versions else None


def missing_message(backbone: HubBackbone, why: str) -> str:
    """One line: the preset is not downloaded, and where to put it."""
    return (f"KerasHub preset {backbone.preset} is not downloaded and could not be ({why}): download it where "
            f"there is internet (python -c \"import keras_hub; keras_hub.models.Backbone.from_preset("
            f"'{backbone.preset}')\" puts it in {download_folder(backbone)}/VERSION), or copy the preset folder "
            f"(config.json, model.weights.h5, image_converter.json) here and pass --weights DIR "
            f"(DIR or DIR/{backbone.preset}; with DVC: dvc exp run -S extract.weights=DIR)")


# --------------------------------------------------------------------------------------------- models

def load_preset(backbone: HubBackbone, source: str, input_size: int, load_weights: bool = True):
    """``(backbone model, image converter or None)`` from a preset folder or handle."""
    import keras_hub

    kwargs: dict[str, Any] = {}
    if backbone.spec.resizable and input_size != backbone.input_size:
        kwargs["image_shape"] = (input_size, input_size, 3)
    model = keras_hub.models.Backbone.from_preset(source, load_weights=load_weights, **kwargs)
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(source)
    except Exception as exc:  # noqa: BLE001 - KerasHub raises ValueError / FileNotFoundError
        raise UsageError(f"{source}: no image converter in the preset ({str(exc).splitlines()[0][:120]}); "
                         "a hub base needs its preset's preprocessing (image_converter.json)") from None
    if converter is not None and backbone.spec.resizable:
        converter.image_size = (input_size, input_size)  # tlpipe's input size (a settable property)
    return model, converter


def check_size(backbone: HubBackbone, model, input_size: int) -> None:
    """A fixed-size model (ViT, CLIP, SigLIP) must get its own input size."""
    shape = getattr(model, "image_shape", None)
    if shape is None:
        shape = getattr(getattr(model, "vision_encoder", None), "image_shape", None)
    if not backbone.spec.resizable and shape and shape[0] and int(shape[0]) != input_size:
        raise UsageError(f"{backbone.name} takes {shape[0]}-pixel inputs only, not --input-size {input_size}")


def pool_layers(backbone: HubBackbone, model, x, pooling: str, depth: str | None = None):
    """Pool the backbone's output ``x`` (tokens or a feature map) with built-in Keras layers.

    ``depth``: a pyramid level (``build_pooled_depths``): its layers' names carry it, and the last one
    is ``pool_<depth>`` (``pipeline.nets.depths.depth_layout`` reads the widths from those)."""
    import keras

    if backbone.spec.kind == "cnn":
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        # pool_* names mark pooled depths (depth_layout): the base's own pooled output is global_<pooling>
        return pool(name=f"pool_{depth}" if depth else f"global_{pooling}")(x)
    sfx = f"_{depth}" if depth else ""
    tokens = int(x.shape[1])
    prefix = 1 + int(getattr(model, "num_register_tokens", 0) or 0)  # class token, then register tokens
    cls = keras.layers.Flatten(name=f"cls_token{sfx}")(
        keras.layers.Cropping1D((0, tokens - 1), name=f"take_cls{sfx}")(x))
    if pooling == "cls":
        y = cls
    else:
        mean = keras.layers.GlobalAveragePooling1D(name=f"mean_patches{sfx}")(
            keras.layers.Cropping1D((prefix, 0), name=f"take_patches{sfx}")(x))
        y = mean if pooling == "mean" else keras.layers.Concatenate(name=f"cls_mean{sfx}")([cls, mean])
    return keras.layers.Identity(name=f"pool_{depth}")(y) if depth else y


def build_pooled(backbone: HubBackbone, source: str, input_size: int, pooling: str, load_weights: bool = True):
    """converter -> backbone -> pooling, as one frozen Keras model on float32 [0, 255] pixels."""
    import keras

    require_keras_hub(f"--base {backbone.name}")
    model, converter = load_preset(backbone, source, input_size, load_weights)
    check_size(backbone, model, input_size)
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="pixels")
    x = converter(inputs) if converter is not None else inputs
    if backbone.spec.kind == "embed":
        y = model.get_vision_embeddings(x)
    else:
        y = model({"images": x} if isinstance(model.input, dict) else x)
        y = pool_layers(backbone, model, y, pooling)
    out = keras.Model(inputs, y, name=f"hub_{backbone.preset}".replace(".", "_"))
    out.trainable = False
    return out


def build_pooled_depths(backbone: HubBackbone, source: str, input_size: int, depths: tuple[str, ...],
                        pooling: str, load_weights: bool = True):
    """converter -> backbone -> the pooled outputs of the pyramid levels ``depths`` side by side, as one
    frozen Keras model on float32 [0, 255] pixels (feature maps pooled with ``pooling`` avg / max, DINOv2
    token stages with the base's token pooling; each pooled level is the layer ``pool_<level>``).
    ``depths`` (``blocks`` or names) is resolved against the loaded backbone's pyramid (``resolve_depths``)."""
    import keras

    require_keras_hub(f"--base {backbone.name}")
    model, converter = load_preset(backbone, source, input_size, load_weights)
    check_size(backbone, model, input_size)
    pyramid = feature_pyramid(model)
    names = resolve_depths(backbone, depths, list(pyramid))
    levels = keras.Model(model.inputs, [pyramid[n] for n in names], name="pyramid")
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="pixels")
    x = converter(inputs) if converter is not None else inputs
    ys = levels({"images": x} if isinstance(model.input, dict) else x)
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    pooled = [pool_layers(backbone, model, y, pooling, depth=n) for n, y in zip(names, ys)]
    merged = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="depths_concat")(pooled)
    out = keras.Model(inputs, merged, name=f"hub_{backbone.preset}_depths".replace(".", "_"))
    out.trainable = False
    return out


def resolve_depths(backbone: HubBackbone, spec: str | tuple[str, ...], valid: list[str] | None = None
                   ) -> tuple[str, ...]:
    """The pyramid levels of ``--layers`` on a hub base (one line when the family exposes none).

    Without ``valid`` (at plan time, nothing built) ``blocks`` stays ``("blocks",)`` and names are kept
    as given; with the loaded backbone's pyramid names ``blocks`` is all of them, and an unknown name
    fails in one line listing the valid ones."""
    if not backbone.spec.pyramid:
        raise UsageError(f"{backbone.name} exposes no depths (KerasHub gives {backbone.family} no feature "
                         "pyramid); use --layers last")
    names = ("blocks",) if spec in ("blocks", ("blocks",)) else tuple(spec)
    if valid is None:
        return names
    if names == ("blocks",):
        return tuple(valid)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"unknown depth '{unknown[0]}' for {backbone.name}; its depths are: {', '.join(valid)}")
    return names


def feature_pyramid(model) -> dict[str, Any]:
    """The intermediate outputs KerasHub exposes on a loaded backbone, by name (``pyramid_outputs``:
    ResNet / EfficientNet / DenseNet ``P1``..``P5``, feature maps ``[N, H, W, C]``; DINOv2 ``stem``,
    ``stage1``..``stageN``, token sequences ``[N, 1 + registers + patches, D]``); empty for ViT, CLIP,
    SigLIP and MobileNetV3, which expose none (KerasHub 0.32).  The depths ``--layers`` can offer for a
    hub base: the values are symbolic tensors of the backbone's functional graph, so
    ``keras.Model(model.inputs, [pyramid[n] for n in names])`` computes them."""
    return dict(getattr(model, "pyramid_outputs", None) or {})
