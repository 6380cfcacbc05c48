"""Resolve ``--weights`` (imagenet | none | PATH) and build a base with them.

``imagenet`` goes through Keras' own download-and-cache (``~/.keras/models`` or
``$KERAS_HOME/models``).  When that download is impossible we raise one clear
error naming the file Keras wanted, where to put it, and ``--weights PATH``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import UsageError, WeightsNotFound, WeightsUnavailable
from pipeline.core.util import sha256_file, unreachable
from pipeline.nets import hub
from pipeline.nets.backbones import BACKBONES, Backbone

log = logging.getLogger(__name__)

_PATCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded: ``imagenet``, ``none`` or a file, with its sha256."""

    kind: str  # "imagenet" | "none" | "file"
    path: str = ""
    sha256: str = ""

    @property
    def label(self) -> str:
        return self.path if self.kind == "file" else self.kind


KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"  # keras.applications' downloads


def keras_cache_dir() -> Path:
    """Folder where Keras caches downloaded application weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def cached_weights_path(backbone: Backbone) -> Path | None:
    """Path of the base's ImageNet no-top weights in the Keras cache, if present."""
    path = keras_cache_dir() / backbone.weights_file
    return path if path.is_file() and path.stat().st_size > 0 else None


@contextlib.contextmanager
def seeded_init() -> Iterator[None]:
    """Python's ``random`` seeded with 0 while a base is built, then restored: the one seeding that
    makes ``--weights none`` reproducible (Keras draws its initial weights from it).  Extraction,
    export and fine-tune build their bases under it; if it changed, exported models would stop
    matching their features."""
    state = random.getstate()
    random.seed(0)
    try:
        yield
    finally:
        random.setstate(state)


def known_weights(backbone: Backbone, weights: str | Path | None) -> tuple[str, str] | None:
    """``(kind, sha256)`` of parsed weights as ``build_with_weights`` will record them, when that
    is known without building the model (None: ImageNet weights not cached yet)."""
    if weights is None:
        return "none", ""
    if isinstance(weights, Path):
        return "file", sha256_file(weights)
    if backbone.hub:
        folder = hub.cached_download(backbone)
        return ("imagenet", sha256_file(folder)) if folder is not None else None
    cached = cached_weights_path(backbone)
    return ("imagenet", sha256_file(cached)) if cached is not None else None


def weights_owner(filename: str) -> str | None:
    """The base whose longest name or alias prefixes a weights file's name (``mobilenet_0.75_224_...`` is
    mobilenet_0.75's, not mobilenet's), or whose Keras cache file name it is; None if none does."""
    from pipeline.nets.backbones import BACKBONES

    low = filename.lower()
    for b in BACKBONES.values():
        if b.weights_file and low == b.weights_file.lower():
            return b.name
    every = sorted(((n, b.name) for b in BACKBONES.values() for n in (b.name, *b.aliases)),
                   key=lambda pair: -len(pair[0]))
    return next((base for n, base in every if low.startswith(n.lower() + "_")), None)


def find_weights_in_dir(folder: Path, backbone: Backbone) -> Path | None:
    """A no-top weights file for ``backbone`` in ``folder``: Keras' cache name, or
    ``<name>*notop*.h5`` / ``<name>*no_top*.h5`` (e.g. ``mobilenet_0.75_224_imagenet_notop.weights.h5``)."""
    exact = folder / backbone.weights_file
    if exact.is_file():
        return exact
    hits = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.endswith(".h5") and weights_owner(p.name) == backbone.name
        and ("notop" in p.name.lower() or "no_top" in p.name.lower())
    )
    return hits[0] if hits else None


def bases_with_weights(folder: Path) -> list[str]:
    """The keras.applications bases that ``folder`` holds a no-top weights file for."""
    return [b.name for b in BACKBONES.values() if not b.hub and find_weights_in_dir(folder, b) is not None]


def _no_weights_message(path: Path, backbone: Backbone) -> str:
    """One line: what was expected, which bases the folder does have weights for, how to pick them
    (``-S 'extract.bases=[...]'`` in a DVC stage, ``--base`` by hand)."""
    have = bases_with_weights(path)
    text = (f"no weights for {backbone.name} in {path}: expected {backbone.weights_file} "
            f"or {backbone.name}_*notop*.h5 there")
    listed = f"; it has weights for {', '.join(have)}"
    if have and os.environ.get("DVC_STAGE"):
        return text + f"{listed}: dvc exp run -S 'extract.bases=[{','.join(have)}]' ..."
    if have:
        return text + f"{listed} (--base {have[0]}), or pass --weights FILE / imagenet / none"
    return text + " (it holds none for any base; pass --weights FILE / imagenet / none)"


def weights_of_features(attrs: dict[str, Any], weights: str | None) -> tuple[Backbone, str | Path | None]:
    """``(backbone, resolved weights)`` for rebuilding the base of a features file: ``weights`` (default:
    the file's) parsed and compared with the ones the features were extracted with, in one line (no
    TensorFlow).  Shared by export, fine-tune and their checks."""
    from pipeline.nets.backbones import get_backbone

    backbone = get_backbone(attrs["base"])
    recorded = str(attrs.get("weights", "imagenet"))
    spec = weights if weights is not None else recorded
    resolved = parse_weights(spec, backbone)
    want = str(attrs.get("weights_sha256") or "")
    if isinstance(resolved, Path) and want and sha256_file(resolved) != want:
        raise UsageError(f"weights {resolved} differ from the ones the {backbone.name} features were extracted "
                         f"with (sha256 {want[:12]}...); the head would see different features")
    if (resolved is None) != (recorded == "none"):
        raise UsageError(f"--weights {spec} does not match the features file, extracted with weights {recorded}")
    return backbone, resolved


def parse_weights(spec: str | None, backbone: Backbone | None = None) -> str | Path | None:
    """Normalise a ``--weights`` value: "imagenet", None (for none) or an existing Path.

    A folder is searched for the base's no-top weights file (see ``find_weights_in_dir``).
    """
    if spec is None:
        return None
    text = str(spec).strip()
    if text.lower() in {"none", "null", "random", ""}:
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if backbone is not None and backbone.hub:
        return _parse_hub_weights(path, text, backbone)
    if path.is_dir() and backbone is not None:
        found = find_weights_in_dir(path, backbone)
        if found is None:  # a usage error, like a --weights path that does not exist (exit 2)
            raise WeightsNotFound(_no_weights_message(path, backbone))
        return found
    if not path.is_file():
        raise UsageError(
            f"weights not found: {text} (use --weights imagenet, --weights none, a .h5 / .weights.h5 file, "
            "or a folder holding the base's Keras weights file)"
        )
    check_weights_file(path, text)
    if backbone is not None:
        check_weight_arrays(path, backbone)  # another base's file, or one with the top: one line, no TensorFlow
    return path


def check_weights_file(path: Path, text: str) -> None:
    """Refuse (exit 2) a ``--weights`` file that is not a weights file: a saved model (``.keras`` zip),
    an image or anything else that is not HDF5.  Cheap: reads the first bytes only."""
    import zipfile

    import h5py

    if path.suffix == ".keras" or zipfile.is_zipfile(path):
        raise UsageError(f"--weights {text} is a saved Keras model (.keras), not a weights file: give the base's "
                         "weights (.h5 / .weights.h5), a folder holding them, imagenet or none")
    if not h5py.is_hdf5(path):
        raise UsageError(f"--weights {text} is not a weights file (not HDF5): give a .h5 / .weights.h5 file, "
                         "a folder holding the base's weights, imagenet or none")
    with h5py.File(path, "r") as h5:
        features = all(k in h5.attrs for k in ("fingerprint", "base", "feature_size"))
    if features:
        raise UsageError(f"--weights {text}: this is a tlpipe features file, not weights: give the base's weights "
                         "(.h5 / .weights.h5), a folder holding them, imagenet or none")
    if not path.name.endswith(".h5"):
        raise UsageError(f"weights file must be a .h5 or .weights.h5 file: {text}")


def file_weight_shapes(path: str | Path) -> list[tuple[int, ...]]:
    """The shapes of every array in an HDF5 weights file (Keras 3 ``.weights.h5`` or legacy ``.h5``)."""
    import h5py

    shapes: list[tuple[int, ...]] = []

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset) and obj.shape:
            shapes.append(tuple(int(d) for d in obj.shape))

    with h5py.File(path, "r") as h5:
        root = h5["model_weights"] if "model_weights" in h5 else h5  # a whole legacy model file
        root.visititems(visit)
    return sorted(shapes)


def check_weight_arrays(path: Path, backbone: Backbone) -> None:
    """Refuse (``WeightsMismatch``, exit 2) before TensorFlow is imported a weights file whose arrays (count
    and values, read with h5py) are not ``backbone``'s without its top (``WEIGHT_ARRAYS``), naming the base
    they are when one is, or saying that the file has the classification top. ``check_weights_fit`` compares
    every shape once the model is built."""
    from pipeline.core.errors import WeightsMismatch
    from pipeline.nets.weight_table import WEIGHT_ARRAYS

    want = WEIGHT_ARRAYS.get(backbone.name)
    if want is None:
        return
    shapes = file_weight_shapes(path)
    have = (len(shapes), sum(_size(x) for x in shapes))
    if have == want:
        return
    owners = [n for n, sig in WEIGHT_ARRAYS.items() if sig == have]
    named = weights_owner(path.name)
    owner = named if named in owners else owners[0] if owners else None
    hint = (f"; it fits {owner}: use --base {owner}" if owner else
            " (it has more arrays: a file with the classification top? give the no-top file, *notop*.h5)"
            if have[0] > want[0] else
            f"; give {backbone.name}'s own no-top weights ({backbone.weights_file}) or --weights imagenet / none")
    raise WeightsMismatch(f"--weights {path} does not fit {backbone.name}: {have[0]} arrays ({have[1]:,} values) "
                          f"in the file, {backbone.name} without its top has {want[0]} ({want[1]:,}){hint}")


def model_weight_shapes(model) -> list[tuple[int, ...]]:
    return sorted(tuple(int(d) for d in w.shape) for w in model.weights if len(w.shape))


def check_weights_fit(path: Path, backbone: Backbone, model) -> None:
    """Refuse (``WeightsMismatch``, exit 2) a weights file whose arrays are not ``model``'s (the base built
    without weights), naming the base it fits when its file name says which and the shapes agree;
    Keras would otherwise print a warning per layer and fail half-way."""
    from pipeline.core.errors import WeightsMismatch

    have = file_weight_shapes(path)
    want = model_weight_shapes(model)
    if have == want:
        return
    owner = weights_owner(path.name)
    fits = ""
    if owner and owner != backbone.name:
        from pipeline.nets.backbones import get_backbone

        try:
            if model_weight_shapes(get_backbone(owner).build(None, None, "avg")) == have:
                fits = f"; it fits {owner}: use --base {owner}"
        except Exception:  # noqa: BLE001 - naming the owner is a courtesy
            pass
    extra = len(have) - len(want)
    hint = fits or (" (it has more arrays: a file with the classification top? give the no-top file, *notop*.h5)"
                    if extra > 0 and all(have.count(x) >= want.count(x) for x in set(want)) else
                    f"; give {backbone.name}'s own no-top weights ({backbone.weights_file}) or --weights imagenet / none")
    raise WeightsMismatch(f"--weights {path} does not fit {backbone.name}: {len(have)} arrays "
                          f"({sum(_size(x) for x in have):,} values) in the file, {backbone.name} without its top has "
                          f"{len(want)} ({sum(_size(x) for x in want):,}){hint}")


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _parse_hub_weights(path: Path, text: str, backbone) -> Path:
    """A hub base's ``--weights DIR``: a KerasHub preset folder (DIR or DIR/PRESET)."""
    found = hub.find_preset_dir(path, backbone) if path.is_dir() else None
    if found is None:
        raise WeightsNotFound(
            f"no KerasHub preset for {backbone.name} at {text}: --weights takes a preset folder (config.json, "
            f"model.weights.h5, image_converter.json) as DIR or DIR/{backbone.preset}, imagenet (the preset's "
            "own weights, downloaded by KerasHub) or none (random, with the architecture of a downloaded preset)")
    return found


def _build_hub(backbone, weights, size: int, pooling: str, depths: tuple[str, ...] | None = None):
    """A hub base with resolved weights: a preset folder, the preset's download (imagenet), or none (random
    weights on the architecture of the downloaded preset); a missing download fails in one line."""
    if isinstance(weights, Path):
        folder, info = weights, WeightsInfo("file", str(weights.resolve()), sha256_file(weights))
    else:
        folder = hub.cached_download(backbone)
        if folder is None and weights is not None:
            why = unreachable("https://www.kaggle.com")
            if why:
                raise WeightsNotFound(hub.missing_message(backbone, why))
            folder = backbone.handle()  # KerasHub downloads it
        elif folder is None:
            raise WeightsNotFound(hub.missing_message(backbone, "--weights none takes the architecture from it"))
    try:
        model = backbone.build(folder, size, pooling, load_weights=weights is not None, depths=depths)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - KerasHub / kagglehub errors of any kind
        raise WeightsUnavailable(f"could not load KerasHub preset {folder} as {backbone.name}: {_first_line(exc)}") from exc
    if weights is None:
        return model, WeightsInfo("none")
    if not isinstance(weights, Path):
        done = hub.cached_download(backbone)
        info = WeightsInfo("imagenet", str(done or folder), sha256_file(done) if done else "")
    return model, info


@contextlib.contextmanager
def _recording_get_file(record: dict[str, Any]) -> Iterator[None]:
    """Temporarily wrap Keras' ``get_file`` to learn which file it fetched or wanted."""
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def wrapper(fname=None, origin=None, *args, **kwargs):
        record["fname"] = fname
        record["origin"] = origin
        record["cache_subdir"] = kwargs.get("cache_subdir", "datasets")
        if fname and origin and not (keras_cache_dir() / fname).exists():
            why = unreachable(origin)  # fail now, not after Keras' own download attempt
            if why:
                raise WeightsUnavailable(why)
        result = original(fname, origin, *args, **kwargs)
        record["path"] = result
        return result

    with _PATCH_LOCK:
        file_utils.get_file = wrapper
        try:
            yield
        finally:
            file_utils.get_file = original


def build_with_weights(
    backbone: Backbone,
    weights: str | Path | None,
    input_size: int | None = None,
    pooling: str = "avg",
    depths: tuple[str, ...] | None = None,
):
    """Build ``backbone`` with resolved weights; return ``(model, WeightsInfo)``.  ``depths``: a hub base's
    pyramid levels, pooled side by side (``pipeline.nets.hub.build_pooled_depths``; hub bases only)."""
    if backbone.hub:
        return _build_hub(backbone, weights, input_size or backbone.input_size, pooling, depths)
    if pooling not in {"avg", "max"}:
        raise UsageError(f"pooling must be 'avg' or 'max', not '{pooling}'")
    size = input_size or backbone.input_size
    if size < backbone.min_size:
        raise UsageError(f"{backbone.name} needs inputs of at least {backbone.min_size} pixels, not {size}")
    if weights is None:
        return backbone.build(None, size, pooling), WeightsInfo("none")
    if isinstance(weights, Path):
        model = backbone.build(None, size, pooling)
        check_weights_fit(weights, backbone, model)  # one line, exit 2, before Keras warns per layer
        try:
            model.load_weights(str(weights))  # what keras.applications does with a weights path
        except Exception as exc:  # Keras raises ValueError / KeyError on mismatched files
            raise WeightsUnavailable(
                f"could not load weights {weights} into {backbone.name}"
                f" (input {size}, include_top=False): {_first_line(exc)}"
            ) from exc
        return model, WeightsInfo("file", str(weights.resolve()), sha256_file(weights))

    record: dict[str, Any] = {}
    try:
        with _recording_get_file(record):
            model = backbone.build("imagenet", size, pooling)
    except ValueError as exc:
        raise UsageError(f"{backbone.name} with ImageNet weights: {_first_line(exc)}") from exc
    except Exception as exc:
        raise WeightsUnavailable(_not_cached(backbone, record.get("fname") or backbone.weights_file,
                                             _first_line(exc))) from exc
    path = record.get("path") or ""
    digest = sha256_file(path) if path and os.path.isfile(path) else ""
    return model, WeightsInfo("imagenet", str(path), digest)


def _not_cached(backbone: Backbone, fname: str, why: str) -> str:
    return (f"ImageNet weights for {backbone.name} are not cached and could not be downloaded ({why}): put {fname} "
            f"in {keras_cache_dir()}/ or pass --weights PATH (or --weights none; with DVC: dvc exp run -S "
            "extract.weights=PATH)")


def check_imagenet_reachable(backbone: Backbone, weights: str | Path | None) -> None:
    """Before TensorFlow is imported: ImageNet weights of a keras.applications base that are neither in the
    Keras cache nor downloadable (``KERAS_WEIGHTS_URL`` unreachable) end in one line now, not after the
    import and Keras' own download attempt."""
    if weights != "imagenet" or backbone.hub or cached_weights_path(backbone) is not None:
        return
    why = unreachable(KERAS_WEIGHTS_URL)
    if why:
        raise WeightsUnavailable(_not_cached(backbone, backbone.weights_file, why))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
