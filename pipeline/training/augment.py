"""Augmentation: the ``--augment`` spec and the Keras layers it gives (fine-tune, baseline, views)."""

from __future__ import annotations

from pipeline.core.errors import UsageError

DEFAULT_AUGMENT = "flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1"
AUGMENT_DEFAULTS = {"flip": None, "rotate": 0.1, "zoom": 0.2, "shift": 0.1, "contrast": 0.1}


def parse_augment(spec: str | None) -> dict[str, float | None]:
    """``flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1`` -> ``{name: factor}``; ``none`` -> {}."""
    text = (spec or "none").strip().lower()
    if text in ("", "none", "off", "no"):
        return {}
    out: dict[str, float | None] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip()
        if name not in AUGMENT_DEFAULTS:
            raise UsageError(f"--augment: unknown transform '{name}'; valid: {', '.join(AUGMENT_DEFAULTS)} "
                             "(e.g. flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1), or none")
        if name == "flip":
            if value:
                raise UsageError("--augment: flip takes no value (horizontal flips)")
            out[name] = None
            continue
        try:
            factor = float(value) if value else float(AUGMENT_DEFAULTS[name])
        except ValueError:
            raise UsageError(f"--augment: {name}={value} is not a number") from None
        if not 0 < factor < 1:
            raise UsageError(f"--augment: {name}={value} must be between 0 and 1")
        out[name] = factor
    return out


def normalise_augment(spec: str | None) -> str:
    parsed = parse_augment(spec)
    return ",".join(k if v is None else f"{k}={v:g}" for k, v in parsed.items()) or "none"


def augmentation_layers(spec: str | None, seed: int = 0) -> list:
    """Keras preprocessing layers for ``spec``; active only in training (identity in inference)."""
    import keras

    layers = []
    for i, (name, f) in enumerate(parse_augment(spec).items()):
        s = seed + i
        if name == "flip":
            layers.append(keras.layers.RandomFlip("horizontal", seed=s, name="aug_flip"))
        elif name == "rotate":
            layers.append(keras.layers.RandomRotation(f, fill_mode="reflect", seed=s, name="aug_rotate"))
        elif name == "zoom":
            layers.append(keras.layers.RandomZoom(f, f, fill_mode="reflect", seed=s, name="aug_zoom"))
        elif name == "shift":
            layers.append(keras.layers.RandomTranslation(f, f, fill_mode="reflect", seed=s, name="aug_shift"))
        elif name == "contrast":
            layers.append(keras.layers.RandomContrast(f, value_range=(0, 255), seed=s, name="aug_contrast"))
    return layers
