"""Reading, validating and fusing cached feature files (the contract between the stages).

The layout and attributes are described in ``pipeline.store.schema``; ``pipeline.store.writer``
writes them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import FeaturesFileError, FeaturesNotFound, UsageError, WrongFile
from pipeline.store.schema import JSON_ATTRS, REQUIRED_ATTRS, SCHEMA_VERSION, extraction_fingerprint

log = logging.getLogger(__name__)

__all__ = ["load_views", "load_fused_views", "split_size", "size_layout", "SCHEMA_VERSION", "REQUIRED_ATTRS",
           "JSON_ATTRS", "extraction_fingerprint", "read_attrs", "load_features", "FeatureSet", "Split", "fuse",
           "staleness", "warn_if_stale", "head_status", "resolve_features_path", "locate_head_features"]


def resolve_features_path(name: str | Path, cache_dir: str | Path = "cache") -> Path:
    """A path as given, or a bare name (``resnet50`` / ``resnet50.h5``) in ``<cache>/features/``, then in
    the DVC pipeline's ``<cache>/dvc/features/``."""
    path = Path(name)
    if path.is_file():
        return path
    folder = Path(cache_dir) / "features"
    # bare names: the CLI's own folder first, then the DVC pipeline's (cache/dvc/features)
    for where in (folder, Path(cache_dir) / "dvc" / "features"):
        for cand in (where / path.name, where / f"{path.name}.h5"):
            if cand.is_file():
                return cand
    where = [folder, Path(cache_dir) / "dvc" / "features"]
    have = sorted(str(f / p.name) for f in where if f.is_dir() for p in f.glob("*.h5"))
    hint = (f"; available: {', '.join(have)}" if have
            else f" (nothing in {where[0]} or {where[1]}; run 'tlpipe extract' or 'dvc repro' first)")
    raise FeaturesNotFound(f"features file not found: {name}{hint}")


def _head_cache_root(head_dir: Path) -> Path:
    """The cache folder a head folder lies in: the parent of its nearest ``heads/`` ancestor (``cache`` for
    ``cache/heads/X``, ``cache/dvc`` for ``cache/dvc/heads/X``), else the folder above it (an ``--out``)."""
    head_dir = Path(head_dir).absolute()
    return next((p.parent for p in head_dir.parents if p.name == "heads"), head_dir.parent)


def _head_candidates(path: Path, head_dir: str | Path | None, cache_dir: str | Path) -> list[Path]:
    """Where a recorded features path may be now, in order (see ``locate_head_features``), without repeats."""
    cache = Path(cache_dir)
    cands = [path, cache / path, cache / "features" / path.name, cache / "dvc" / "features" / path.name]
    if head_dir is not None:
        root = _head_cache_root(Path(head_dir))
        cands += [root.parent / path, root / path, root / "features" / path.name,
                  root / "dvc" / "features" / path.name]
    out: list[Path] = []
    for cand in cands:
        cand = Path(os.path.abspath(cand))
        if cand not in out:
            out.append(cand)
    return out


def locate_head_features(recorded: str | Path, head_dir: str | Path | None = None,
                         cache_dir: str | Path = "cache") -> Path:
    """The absolute path of a features file a head folder recorded (``model/head.json``'s ``features``).

    New heads record absolute paths; older ones the path as given, relative to the folder fit-head ran
    in.  Tried in order: the path itself (relative to the current folder), relative to ``cache_dir``
    (and its ``features/``, ``dvc/features/``), then relative to the head folder's cache root
    (``/p/cache`` for ``/p/cache/heads/X``: the folder above it, the root itself, its ``features/`` and
    ``dvc/features/``).  ``FeaturesNotFound`` (one line) names every place looked at."""
    cands = _head_candidates(Path(recorded), head_dir, cache_dir)
    for cand in cands:
        if cand.is_file():
            return cand
    raise FeaturesNotFound(f"features file not found: {recorded} (looked at {', '.join(map(str, cands))})")


def read_attrs(path: str | Path) -> dict[str, Any]:
    """File attributes with JSON attributes decoded."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: _plain(v) for k, v in h5.attrs.items()}
    except OSError as exc:
        raise WrongFile(not_hdf5_message(Path(path), exc)) from None
    for key in JSON_ATTRS:
        if isinstance(attrs.get(key), str):
            try:
                attrs[key] = json.loads(attrs[key])
            except ValueError:
                pass
    return attrs


def is_features_file(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file with the attributes of a features file (h5py only, no TensorFlow)."""
    import h5py

    try:
        if not Path(path).is_file() or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as h5:
            return "fingerprint" in h5.attrs and "base" in h5.attrs and "feature_size" in h5.attrs
    except OSError:
        return False


def not_hdf5_message(path: Path, exc: OSError) -> str:
    """One plain line for a file h5py cannot open: what it is when that can be told ("X is not an HDF5
    file: it is an image"), h5py's reason only for a damaged HDF5 file (truncated, ...)."""
    import h5py

    kind = _not_hdf5_kind(path)
    hint = "give a features file written by 'tlpipe extract' (.h5)"
    if kind:
        return f"{path} is not an HDF5 file: it is {kind}; {hint}"
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = True  # cannot tell: keep h5py's reason
    if not is_hdf5:
        return f"{path} is not an HDF5 file; {hint}"
    return f"{path} is not a readable HDF5 file ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})"


def _not_hdf5_kind(path: Path) -> str:
    """What a file that is not HDF5 seems to be, for the one-line error ('' when it cannot tell)."""
    import zipfile

    try:
        if path.suffix.lower() == ".keras" or zipfile.is_zipfile(path):
            return "a saved Keras model (.keras)" if path.suffix.lower() == ".keras" else "a zip archive"
    except OSError:
        return ""
    if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}:
        return "an image"
    return ""


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass
class Split:
    """One split in memory."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray


@dataclass
class FeatureSet:
    """A validated features file (or several fused) loaded in memory."""

    paths: list[Path]
    attrs: dict[str, Any]
    splits: dict[str, Split]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def base(self) -> str:
        return str(self.attrs["base"])

    @property
    def name(self) -> str:
        """Name used for head folders: the file stems, joined by '+' when fused."""
        return "+".join(p.stem for p in self.paths)


def load_features(path: str | Path, need: tuple[str, ...] = ("train", "val")) -> FeatureSet:
    """Load and validate a features file; one clear ``FeaturesFileError`` if anything is off."""
    path = Path(path)
    if not path.is_file():
        raise FeaturesNotFound(f"features file not found: {path}")
    try:
        return _load_features(path, need)
    except FeaturesFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed attributes or datasets of any kind
        raise FeaturesFileError(
            f"{path} is not a valid tlpipe features file ({type(exc).__name__}: {exc}); extract again"
        ) from None


def check_attrs(path: Path) -> dict[str, Any]:
    """The file's attributes, once the ones every stage relies on are present and sane."""
    attrs = read_attrs(path)
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise WrongFile(f"{path} is not a tlpipe features file (missing attributes: {', '.join(missing)})")
    if int(attrs["schema_version"]) != SCHEMA_VERSION:
        raise FeaturesFileError(
            f"{path} has schema version {attrs['schema_version']}, this tlpipe reads {SCHEMA_VERSION}: extract again")
    classes = attrs["class_names"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise FeaturesFileError(f"{path} has bad class_names attribute: {classes!r}")
    if "num_classes" in attrs and int(attrs["num_classes"]) != len(classes):
        raise FeaturesFileError(f"{path}: num_classes {attrs['num_classes']} but {len(classes)} class names")
    if int(attrs["feature_size"]) < 1:
        raise FeaturesFileError(f"{path} has bad feature_size attribute: {attrs['feature_size']!r}")
    return attrs


def check_split(path: Path, name: str, group: Any, attrs: dict[str, Any]) -> int:
    """Check one split's datasets by their shapes and types (nothing is read); return its rows."""
    import h5py

    dim = int(attrs["feature_size"])
    counts = attrs.get("counts") if isinstance(attrs.get("counts"), dict) else {}
    for key in ("features", "labels", "ids"):
        if key not in group:
            raise FeaturesFileError(f"{path}: split '{name}' has no '{key}' dataset")
    if h5py.check_string_dtype(group["ids"].dtype) is None:
        raise FeaturesFileError(f"{path}: {name}/ids is {group['ids'].dtype}, expected strings")
    if group["labels"].dtype.kind not in "iu":
        raise FeaturesFileError(f"{path}: {name}/labels is {group['labels'].dtype}, expected integers")
    shape, n_y, n_ids = group["features"].shape, group["labels"].shape[0], group["ids"].shape[0]
    if len(shape) != 2 or shape[1] != dim:
        raise FeaturesFileError(f"{path}: {name}/features has shape {shape}, expected [N, {dim}]")
    if not (shape[0] == n_y == n_ids):
        raise FeaturesFileError(f"{path}: {name} has {shape[0]} features, {n_y} labels, {n_ids} ids")
    if group["features"].dtype != np.float32:
        raise FeaturesFileError(f"{path}: {name}/features is {group['features'].dtype}, expected float32")
    if name in counts and int(counts[name]) != n_y:
        raise FeaturesFileError(f"{path}: {name} has {n_y} rows but the counts attribute says {counts[name]}")
    return int(n_y)


def check_labels(path: Path, name: str, y: np.ndarray, n_classes: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise FeaturesFileError(f"{path}: {name}/labels outside 0..{n_classes - 1}")


def _load_features(path: Path, need: tuple[str, ...]) -> FeatureSet:
    import h5py

    attrs = check_attrs(path)
    classes = attrs["class_names"]
    splits: dict[str, Split] = {}
    with h5py.File(path, "r") as h5:
        check_virtual_sources(path, h5)  # a merged (virtual) file whose shards are gone would read zeros
        for name in ("train", "val", "test"):
            if name not in h5:
                continue
            group = h5[name]
            if check_split(path, name, group, attrs) == 0:
                continue  # an empty split (a folder too small for test, a merge of shards) is absent, not scored
            X = group["features"][...]
            y = group["labels"][...]
            ids = group["ids"].asstr()[...]
            check_labels(path, name, y, len(classes))
            if not np.isfinite(X).all():
                raise FeaturesFileError(f"{path}: {name}/features contains NaN or infinity")
            splits[name] = Split(X, y.astype(np.int64), ids)
    for name in need:
        if name not in splits or len(splits[name].y) == 0:
            raise FeaturesFileError(f"{path} has no '{name}' rows (splits present: {', '.join(splits) or 'none'})")
    return FeatureSet([path], attrs, splits)


def load_views(path: str | Path, clean: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """``{split: [view 1 rows, view 2 rows, ...]}`` stored by ``extract --views`` (groups
    ``<split>_view<k>``, rows in the clean split's order: the same ids); ``clean``: ``{split: Split}``."""
    import h5py

    out: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as h5:
        for split, data in clean.items():
            k = 1
            while f"{split}_view{k}" in h5:
                group = h5[f"{split}_view{k}"]
                if not np.array_equal(group["ids"].asstr()[...], np.asarray(data.ids)):
                    raise FeaturesFileError(f"{path}: {split}_view{k} does not hold the rows of {split} "
                                            "(a view image failed to decode); extract again")
                out.setdefault(split, []).append(group["features"][...])
                k += 1
    return out


def load_fused_views(paths: list[Path], clean: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """The views of files fused side by side (one base at several input sizes): view k of a split is
    the files' view k, rows matched by id to the fused ``clean`` splits.  Only views every file holds
    are kept (a file without views: none)."""
    import h5py

    per_file = []
    for path in paths:
        with h5py.File(path, "r") as h5:
            own = {name: Split(np.zeros((0, 0)), np.zeros(0), h5[name]["ids"].asstr()[...])
                   for name in clean if name in h5}
        per_file.append((own, load_views(path, own)))
    out: dict[str, list[np.ndarray]] = {}
    for split, data in clean.items():
        count = min(len(views.get(split, [])) for _, views in per_file)
        if count < max(len(views.get(split, [])) for _, views in per_file):
            log.warning("%s: only the first %d views are held by every fused file; the others are left out",
                        split, count)
        for k in range(count):
            parts = []
            for own, views in per_file:
                pos = {v: i for i, v in enumerate(own[split].ids)}
                parts.append(views[split][k][np.fromiter((pos[i] for i in data.ids), np.int64, len(data.ids))])
            out.setdefault(split, []).append(np.concatenate(parts, axis=1))
    return out


def split_size(depth: str) -> tuple[str, int | None]:
    """``("conv_pw_7_relu", 320)`` for ``conv_pw_7_relu@320`` (a depth of fused files at several input
    sizes); ``(depth, None)`` for a depth of one file."""
    name, at, size = depth.rpartition("@")
    return (name, int(size)) if at and size.isdigit() else (depth, None)


def feature_precision(attrs: dict[str, Any]) -> str:
    """The precision a features file was computed in (files from before the option: f32, or fp16 when
    made with Keras mixed precision)."""
    return str(attrs.get("precision") or ("fp16" if attrs.get("mixed_precision") else "f32"))


def fuse(sets: list[FeatureSet], allow_mixed_precision: bool = False) -> FeatureSet:
    """Concatenate features of several bases, rows matched by id.

    Refused unless every file comes from the same data source, split and classes, and (unless
    ``allow_mixed_precision``) was computed in the same precision (f32 / bf16 / fp16).  Files of one
    base (same weights and pooling) at several input sizes also get a depth layout (``size_layout``:
    ``DEPTH@SIZE``) so that ``--head auto`` chooses sizes and depths together; that base at the same
    input size twice is refused.
    """
    if len(sets) == 1:
        return sets[0]
    first = sets[0]
    precisions = [feature_precision(s.attrs) for s in sets]
    if len(set(precisions)) > 1 and not allow_mixed_precision:
        odd = next(i for i, p in enumerate(precisions) if p != precisions[0])
        raise UsageError(f"cannot fuse {first.paths[0]} ({precisions[0]}) and {sets[odd].paths[0]} "
                         f"({precisions[odd]}): features of different precisions; extract them with the same "
                         "--precision, or pass --allow-mixed-precision")
    for other in sets[1:]:
        for key in ("source_fingerprint", "split_spec", "class_names"):
            if other.attrs.get(key) != first.attrs.get(key):
                if key == "source_fingerprint" and other.attrs.get("data_source") == first.attrs.get("data_source"):
                    why = (f"the same source {first.attrs.get('data_source')} listed differently "
                           f"(--limit {first.attrs.get('limit') or 'none'} vs {other.attrs.get('limit') or 'none'}, "
                           "or images added/removed between the extractions)")
                else:
                    why = f"{first.attrs.get(key) if key != 'source_fingerprint' else first.attrs.get('data_source')} vs " \
                          f"{other.attrs.get(key) if key != 'source_fingerprint' else other.attrs.get('data_source')}"
                raise WrongFile(
                    f"cannot fuse {first.paths[0]} and {other.paths[0]}: different {key.replace('_', ' ')}: {why}")
    sizes = check_sizes(sets)
    splits: dict[str, Split] = {}
    for name in first.splits:
        if not all(name in s.splits for s in sets):
            continue
        common = set(first.splits[name].ids)
        for s in sets[1:]:
            common &= set(s.splits[name].ids)
        dropped = max(len(s.splits[name].ids) for s in sets) - len(common)
        if dropped:
            log.warning("fusion: %d %s rows are missing from some files and are left out", dropped, name)
        order = [i for i in first.splits[name].ids if i in common]
        parts, y = [], None
        for s in sets:
            pos = {v: k for k, v in enumerate(s.splits[name].ids)}
            idx = np.fromiter((pos[i] for i in order), dtype=np.int64, count=len(order))
            parts.append(s.splits[name].X[idx])
            labels = s.splits[name].y[idx]
            if y is not None and not np.array_equal(y, labels):
                raise WrongFile("cannot fuse: the same ids carry different labels")
            y = labels
        splits[name] = Split(np.concatenate(parts, axis=1), y, np.asarray(order, dtype=object))
    attrs = dict(first.attrs)
    attrs["base"] = "+".join(s.base for s in sets)
    attrs["feature_size"] = sum(int(s.attrs["feature_size"]) for s in sets)
    attrs["fused_from"] = [str(s.paths[0]) for s in sets]
    if sizes:  # one base at several input sizes: every (depth, size) is a depth of its own
        attrs.update(size_layout(sets))
    return FeatureSet([p for s in sets for p in s.paths], attrs, splits)


def same_base(sets: list[FeatureSet]) -> bool:
    """Whether every file holds the same base with the same weights, pooling and precision (then they
    differ, if at all, in input size and stored depths); other precisions fuse as other bases do."""
    def key(s: FeatureSet) -> tuple:  # the weights by their sha256 (one file named by two paths), else label
        return (s.attrs.get("base"), s.attrs.get("pooling"), s.attrs.get("weights_sha256") or s.attrs.get("weights"),
                s.attrs.get("precision", "f32"))

    return all(key(s) == key(sets[0]) for s in sets[1:])


def check_sizes(sets: list[FeatureSet]) -> list[int]:
    """The input sizes of files of one base (``[]`` for files of different bases or weights: plain
    fusion); the same base at the same input size twice is refused in one line."""
    if not same_base(sets):
        return []
    sizes = [int(s.attrs.get("input_size") or 0) for s in sets]
    for i, size in enumerate(sizes):
        if size in sizes[:i]:
            raise WrongFile(f"cannot fuse {sets[sizes.index(size)].paths[0]} and {sets[i].paths[0]}: the same base "
                            f"({sets[0].base}) with the same weights at the same input size ({size}) twice; give "
                            "one file per input size (extract --input-size N --layers blocks)")
    return sizes


def size_layout(sets: list[FeatureSet]) -> dict[str, Any]:
    """Attributes of files of one base at several input sizes, fused: each stored depth of each file
    named ``DEPTH@SIZE`` (``last@224`` for a file of the last layer only), in the files' order."""
    from pipeline.nets.depths import depths_of

    names, dims = [], []
    for s in sets:
        for name, dim in depths_of(s.attrs):
            names.append(f"{name}@{int(s.attrs['input_size'])}")
            dims.append(dim)
    return {"depths": names, "depth_dims": dims, "input_sizes": [int(s.attrs["input_size"]) for s in sets]}


def staleness(path: str | Path) -> tuple[bool, str]:
    """Re-list the file's data source and compare with what was extracted."""
    from pipeline.data.sources import old_split_rule, open_source

    attrs = read_attrs(path)
    old_rule = old_split_rule(attrs)
    if old_rule:
        return True, old_rule
    source = attrs.get("data_source", "")
    if attrs.get("data_kind") == "tfds":
        name = source.split(":")[1] if source.count(":") >= 1 else source
        spec = f"tfds:{name}"
    else:
        spec = source
    split = attrs.get("split_spec", "80/10/10")
    data_log = logging.getLogger("pipeline.data.sources")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # the listing's own warnings were given at extraction
    try:
        current = open_source(spec, "80/10/10" if split == "as-given" else split,
                              limit=int(attrs.get("limit") or 0) or None)
    except (UsageError, Exception) as exc:  # noqa: BLE001 - any failure means we cannot confirm
        return True, f"cannot re-read the data source {spec}: {exc}"
    finally:
        data_log.setLevel(level)
    if current.fingerprint != attrs.get("source_fingerprint"):
        return True, f"the images under {spec} changed since extraction (files added, removed or resized)"
    return False, "inputs unchanged"


def warn_if_stale(paths: list[Path]) -> list[str]:
    """Log a warning for each features file whose image folder changed since extraction (folder
    sources only: re-listing a tfds dataset is not cheap); return the warnings."""
    out = []
    for path in paths:
        try:
            if read_attrs(path).get("data_kind") != "folder":
                continue
        except FeaturesFileError:
            continue
        stale, why = staleness(path)
        if stale:
            out.append(f"{path} is stale: {why}; extract again with --force to refresh it")
            log.warning(out[-1])
    return out


def head_status(head_dir: str | Path, cache_dir: str | Path = "cache") -> tuple[str, str, list[dict[str, Any]]]:
    """("ok" | "stale" | "features missing" | "unknown", why, attributes of its features files) for a
    fitted head folder: the fingerprints recorded at fit time against the features files now (found by
    ``locate_head_features``)."""
    meta_path = Path(head_dir) / "model" / "head.json"
    if not meta_path.is_file():
        return "unknown", "no model/head.json", []
    meta = json.loads(meta_path.read_text())
    status, why, found = "ok", "features unchanged since the fit", []
    for path, fingerprint in zip(meta.get("features", []), meta.get("fingerprints", [])):
        try:
            path = locate_head_features(path, head_dir, cache_dir)
        except FeaturesNotFound as exc:
            return "features missing", str(exc), found
        try:
            attrs = read_attrs(path)
        except Exception:  # noqa: BLE001 - an unreadable file
            return "features missing", f"{path} is unreadable", found
        found.append(attrs)
        if attrs.get("fingerprint") != fingerprint and status == "ok":
            status, why = "stale", f"{path} was extracted again (other settings or data) after this head was fitted"
    return status, why, found


def check_virtual_sources(path: Path, h5) -> None:
    """Refuse a virtual features file whose shard files are gone (HDF5 would read zeros)."""
    missing = set()
    for split in h5:  # train, val, test and any view splits
        if "features" not in h5[split] or not h5[split]["features"].is_virtual:
            continue
        for vs in h5[split]["features"].virtual_sources():
            src = Path(vs.file_name)
            if vs.file_name != "." and not (src if src.is_absolute() else Path(path).parent / src).is_file():
                missing.add(vs.file_name)
    if missing:
        raise FeaturesFileError(f"{path} is a merged (virtual) file whose shard files are missing: "
                                f"{', '.join(sorted(missing)[:3])} (keep the shards beside it, or merge with --copy)")

