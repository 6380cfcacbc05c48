"""Data sources: a folder of images, or a tensorflow-datasets image-classification dataset.

``open_source(spec, split)`` returns a ``Source`` whose splits (train / val / test)
are deterministic, stable across runs and machines, and cheap to list.

Folder layouts:
  * ``ROOT/<class>/<image>``: split by ``--split`` (e.g. ``80/10/10``), each file placed by
    its own bucket, the sha1 of its relative path modulo 10,000 (``SPLIT_RULE``): the split
    never depends on listing order, machine or run, and adding or removing other files never
    moves a file (a class's counts per split are binomial around the shares, see ``assign_class``);
  * ``ROOT/{train,val|validation,test}/<class>/<image>``: splits used as given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.errors import DataError, DataLayoutError, DataNotFound, UsageError
from pipeline.core.util import unreachable
from pipeline.data.images import IMAGE_EXTENSIONS, DecodeError, decode_image, resize_array

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "80/10/10"
PER_CLASS_HINT = "images must sit in one subfolder per class"
SPLIT_BUCKETS = 10_000
# How a folder of class subfolders is split; stored in features files (attribute ``split_rule``) and in
# the source fingerprint. Files without the attribute were made with OLD_SPLIT_RULE.
SPLIT_RULE = "sha1-bucket-10000"  # each file by its own sha1 bucket: adding files moves no other file
OLD_SPLIT_RULE = "sha1-rank"  # files ranked by sha1 and cut by counts: adding files moved others
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Item:
    """One input: an id (relative path or tfds id), its label and, for files, its path."""

    id: str
    label: int
    path: Path | None = None
    array: np.ndarray | None = None


@dataclass
class Source:
    """A listed data source."""

    spec: str  # canonical description, stored in the features file
    kind: str  # "folder" | "tfds"
    class_names: list[str]
    split_spec: str
    counts: dict[str, int]  # images per split (before decoding)
    fingerprint: str  # sha256 of what was listed (ids, sizes, labels, classes, split, split rule)
    split_rule: str = ""  # SPLIT_RULE for a folder split by hash; "as-given" / "tfds-slices" otherwise
    _items: dict[str, list[Item]] = field(default_factory=dict, repr=False)
    _tfds: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if self.counts.get(s, 0) > 0]

    def iter_items(self, split: str, start: int = 0) -> Iterator[Item]:
        """Items of ``split`` in their fixed order, from index ``start``."""
        if self.kind == "folder":
            yield from self._items[split][start:]
        else:
            yield from _iter_tfds(self._tfds, split, start)

    def manifest(self) -> dict[str, Any]:
        """A JSON-able summary (for ``cache/manifest.json`` and ``tlpipe info``)."""
        return {
            "source": self.spec,
            "kind": self.kind,
            "split": self.split_spec,
            "class_names": self.class_names,
            "counts": self.counts,
            "fingerprint": self.fingerprint,
            "split_rule": self.split_rule,
        }


def decode_item(item: Item, size: int) -> np.ndarray:
    """``uint8[size, size, 3]`` of one item, as extraction decodes it (a file, or a tfds array);
    ``DecodeError`` when it cannot be decoded."""
    if item.path is not None:
        return decode_image(item.path, size)
    if item.array is None:
        raise DecodeError("no image data")
    try:
        return resize_array(item.array, size)
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def is_manifest(path: Path) -> bool:
    """True for a JSON file that ``tlpipe manifest`` wrote."""
    data = json.loads(Path(path).read_text())
    return isinstance(data, dict) and {"source", "kind", "split", "class_names", "counts", "fingerprint"} <= set(data)


def split_rule_of(attrs: dict[str, Any]) -> str:
    """The split rule a features file (its attributes) was made with: its ``split_rule``, else
    OLD_SPLIT_RULE for a folder split by hash (files from before the attribute), else ``""``."""
    if attrs.get("split_rule"):
        return str(attrs["split_rule"])
    if attrs.get("data_kind", "folder") == "folder" and attrs.get("split_spec") not in (None, "as-given"):
        return OLD_SPLIT_RULE
    return ""


def old_split_rule(attrs: dict[str, Any]) -> str:
    """``""``, or one line saying that the file was made with another rule than SPLIT_RULE."""
    rule = split_rule_of(attrs)
    if not rule or rule in (SPLIT_RULE, "as-given", "tfds-slices"):
        return ""
    return (f"made with the old split rule ({rule}: files ranked by sha1, so adding images moved others "
            f"across train/val/test), re-extract to use the per-file split ({SPLIT_RULE})")


def parse_split(spec: str) -> tuple[float, float, float]:
    """Parse ``80/10/10`` (or ``80/20``) into train/val/test percentages summing to 100."""
    try:
        parts = [float(p) for p in str(spec).replace(",", "/").split("/")]
    except ValueError:
        raise UsageError(f"--split must look like 80/10/10, not '{spec}'") from None
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3:
        raise UsageError(f"--split must be two or three percentages (train/val[/test]), not '{spec}'")
    if any(p < 0 for p in parts):
        raise UsageError(f"--split percentages cannot be negative: '{spec}'")
    if abs(sum(parts) - 100) > 1e-6:
        raise UsageError(f"--split percentages must sum to 100, not {sum(parts):g}: '{spec}'")
    if parts[0] <= 0:
        raise UsageError(f"--split needs a training share above 0, not '{spec}'")
    if parts[1] <= 0:
        raise UsageError(f"--split needs a validation share (heads are scored on it; they are tuned inside train), not '{spec}'")
    return parts[0], parts[1], parts[2]


def open_source(spec: str, split: str = "80/10/10", tfds_data_dir: str | None = None,
                limit: int | None = None) -> Source:
    """Open ``tfds:NAME`` or a folder path; ``limit`` caps images per split (quick runs)."""
    spec = str(spec).strip()
    if spec.startswith("tfds:"):
        return _open_tfds(spec[5:], split, tfds_data_dir, limit)
    return _open_folder(Path(spec).expanduser(), split, limit)


# ----------------------------------------------------------------------------- folders


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _rel_id(path: Path, root: Path) -> str:
    """The item id: the path relative to ``root``, always valid UTF-8 (HDF5 strings, hashes).

    A file name that is not UTF-8 (undecodable bytes) gets them as ``\\xNN`` escapes."""
    rel = str(path.relative_to(root))
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_size(path: Path) -> int:
    """Size for the fingerprint; -1 when unreadable (e.g. a dangling link: skipped at decode)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def loose_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not in a class subfolder)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (links followed, hidden names skipped), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if _is_image(Path(f)))
    return sorted(files)


def class_dirs(folder: Path) -> list[Path]:
    """The visible subfolders of ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _open_folder(root: Path, split: str, limit: int | None) -> Source:
    if not root.exists():
        raise DataNotFound(f"data folder not found: {root} (use --data PATH or --data tfds:NAME)")
    if not root.is_dir():
        raise DataNotFound(f"--data must be a folder of class subfolders, not a file: {root}")
    subdirs = class_dirs(root)
    split_dirs = {p.name.lower(): p for p in subdirs if p.name.lower() in SPLIT_DIRS}
    if "train" in split_dirs:
        items, class_names, spec_used = _presplit(root, split_dirs)
        rule = "as-given"
        if str(split).strip() not in ("", DEFAULT_SPLIT, spec_used):
            log.warning("--split %s is not used: %s has train/ and val/ subfolders, which are used as given",
                        split, root)
    else:
        items, class_names = _split_by_hash(root, subdirs, parse_split(split))
        spec_used, rule = split, SPLIT_RULE
    if limit:
        items = {s: _take_balanced(v, limit) for s, v in items.items()}
    counts = {s: len(items.get(s, [])) for s in SPLITS if items.get(s)}
    if limit:
        fix = f"--limit {limit} keeps at most {limit} images per split"
    elif "train" in split_dirs:
        fix = f"add images to its subfolder of {root}; --split does not apply to a split folder"
    else:
        fix = "give it a larger share with --split"
    _warn_small_splits(counts, root, fix)
    digest = hashlib.sha256()
    listing: dict[str, Any] = {"classes": class_names, "split": spec_used}
    if rule == SPLIT_RULE:  # split folders (as given) keep their fingerprint: their split did not change
        listing["split_rule"] = rule
    digest.update(json.dumps(listing).encode())
    for s in SPLITS:
        for it in items.get(s, []):
            size = _file_size(it.path) if it.path else 0
            digest.update(f"{s}\t{it.id}\t{it.label}\t{size}\n".encode())
    return Source(
        spec=str(root.resolve()), kind="folder", class_names=class_names, split_spec=spec_used,
        counts=counts, fingerprint=digest.hexdigest(), split_rule=rule, _items=items,
    )


SMALL_SPLIT = 50  # fewer evaluation images than this and accuracy moves in steps of over 2 points


def _warn_small_splits(counts: dict[str, int], root: Path, fix: str) -> None:
    for split in ("val", "test"):
        n = counts.get(split, 0)
        if 0 < n < SMALL_SPLIT:
            log.warning("the %s split of %s has only %d images: its accuracy moves in steps of %.1f points "
                        "(%s)", split, root, n, 100 / n, fix)


def _take_balanced(items: list[Item], limit: int) -> list[Item]:
    """The first ``limit`` items taken round-robin over classes (keeps every class present)."""
    by_class: dict[int, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it)
    out: list[Item] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return sorted(out, key=lambda it: it.id)


def _presplit(root: Path, split_dirs: dict[str, Path]) -> tuple[dict[str, list[Item]], list[str], str]:
    per_split: dict[str, dict[str, list[Path]]] = {}
    for dirname, path in split_dirs.items():
        split = SPLIT_DIRS[dirname]
        if split in per_split:
            raise DataError(f"{root} has both val/ and validation/; keep one")
        per_split[split] = {c.name: list_images(c) for c in class_dirs(path)}
    train = per_split["train"]
    class_names = sorted(c for c, files in train.items() if files)
    if not class_names:
        raise DataLayoutError(f"no images found under {root / 'train'} (expected train/<class>/<image>)")
    if len(class_names) < 2:
        raise DataLayoutError(f"only one class ('{class_names[0]}') under {root / 'train'}: need at least two")
    if "val" not in per_split:
        raise DataLayoutError(f"{root} has train/ but no val/ (or validation/) folder: heads are tuned on it")
    index = {c: i for i, c in enumerate(class_names)}
    items: dict[str, list[Item]] = {}
    for split, classes in per_split.items():
        unknown = sorted(c for c, files in classes.items() if files and c not in index)
        if unknown:
            raise DataError(f"classes in {split}/ but not in train/: {', '.join(unknown)}")
        missing = [c for c in class_names if not classes.get(c)]
        if missing and split != "train":
            log.warning("classes with no %s images: %s", split, ", ".join(missing))
        items[split] = [
            Item(_rel_id(p, root), index[c], p)
            for c, files in sorted(classes.items()) for p in files
        ]
        if not items[split]:
            raise DataError(f"no images found under {root / split}")
    return items, class_names, "as-given"


def split_bucket(rel_id: str) -> int:
    """The file's own bucket in ``0 .. SPLIT_BUCKETS - 1``: sha1 of its relative path (its id)."""
    return int(hashlib.sha1(rel_id.encode()).hexdigest(), 16) % SPLIT_BUCKETS


def bucket_split(bucket: int, shares: tuple[float, float, float]) -> str:
    """``train`` below the train share of the buckets, ``val`` below train + val, else ``test``."""
    train_end = round(shares[0] * SPLIT_BUCKETS / 100)
    val_end = round((shares[0] + shares[1]) * SPLIT_BUCKETS / 100)
    return "train" if bucket < train_end else "val" if bucket < val_end or shares[2] <= 0 else "test"


def assign_class(rel: list[str], shares: tuple[float, float, float]) -> list[str]:
    """The split of each file of one class: its bucket decides (``bucket_split``), so adding or
    removing other files never moves it.  Two guarantees override the bucket, only while a class
    lacks them: a class gets one train image (the file of lowest bucket), and a class of two or more
    images one val image (the non-train file of lowest bucket, else the train file of highest)."""
    buckets = [split_bucket(r) for r in rel]
    out = [bucket_split(b, shares) for b in buckets]
    if rel and "train" not in out:
        out[min(range(len(rel)), key=lambda i: buckets[i])] = "train"
    if len(rel) >= 2 and "val" not in out:
        rest = [i for i in range(len(rel)) if out[i] != "train"]
        pick = min(rest, key=lambda i: buckets[i]) if rest else max(range(len(rel)), key=lambda i: buckets[i])
        out[pick] = "val"
    return out


def _split_by_hash(root: Path, folders: list[Path],
                   shares: tuple[float, float, float]) -> tuple[dict[str, list[Item]], list[str]]:
    listed = {c.name: list_images(c) for c in folders}
    class_names = sorted(c for c, files in listed.items() if files)
    if not class_names:
        loose = loose_images(root)
        found = f"; {len(loose)} image(s) sit directly in it" if loose else ""
        raise DataLayoutError(f"no images found in class subfolders of {root}{found} "
                              f"({PER_CLASS_HINT}, e.g. {root}/cat/1.jpg)")
    if len(class_names) < 2:
        raise DataLayoutError(f"only one class ('{class_names[0]}') in {root}: need at least two class subfolders")
    empty = sorted(set(listed) - set(class_names))
    if empty:
        log.warning("ignoring empty class folders: %s", ", ".join(empty))
    items: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for label, cname in enumerate(class_names):
        files = listed[cname]
        rel = [_rel_id(p, root) for p in files]
        for r, path, split in zip(rel, files, assign_class(rel, shares)):
            items[split].append(Item(r, label, path))
    for split in SPLITS:
        items[split].sort(key=lambda it: it.id)
    if not items["val"]:
        raise DataError(f"too few images in {root} to make a validation split")
    return {s: v for s, v in items.items() if v}, class_names


# ----------------------------------------------------------------------------- tfds


def _tfds_split_strings(offered: list[str], shares: tuple[float, float, float]) -> dict[str, str]:
    """Percent slices of every split the dataset offers, e.g. train[:80%]+test[:80%]."""
    bounds = {"train": (0, shares[0]), "val": (shares[0], shares[0] + shares[1]),
              "test": (shares[0] + shares[1], 100)}
    out = {}
    for split, (lo, hi) in bounds.items():
        if hi - lo <= 0:
            continue
        lo_s, hi_s = f"{lo:g}%", f"{hi:g}%"
        out[split] = "+".join(f"{name}[{lo_s}:{hi_s}]" for name in offered)
    return out


def _open_tfds(name: str, split: str, data_dir: str | None, limit: int | None) -> Source:
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:  # pragma: no cover
        raise DataError("tfds data needs tensorflow-datasets: pip install tensorflow-datasets") from exc
    shares = parse_split(split)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as exc:
        raise UsageError(f"unknown tfds dataset '{name}': {str(exc).splitlines()[0]}") from exc
    if not _tfds_is_prepared(builder):
        _check_download_hosts(builder, name, data_dir)
    try:
        builder.download_and_prepare()
    except Exception as exc:
        where = data_dir or "~/tensorflow_datasets"
        raise DataError(
            f"could not download or prepare tfds:{name} ({_short(exc)}): "
            f"prepare it once on a machine with network into {where} (or --tfds-data-dir DIR), "
            "or use --data PATH with a local image folder"
        ) from exc
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) < 2:
        raise DataError(f"tfds:{name} has no (image, label) supervised keys")
    image_key, label_key = keys[0], keys[1]
    label_feature = info.features[label_key]
    class_names = list(getattr(label_feature, "names", []) or [])
    if not class_names:
        raise DataError(f"tfds:{name} label '{label_key}' has no class names")
    offered = sorted(info.splits.keys()) or ["train"]
    split_strings = _tfds_split_strings(offered, shares)
    counts = {}
    for s, text in split_strings.items():
        try:
            counts[s] = int(info.splits[text].num_examples)
        except Exception:
            counts[s] = 0
        if counts[s] <= 0:  # split sizes unknown to the metadata (e.g. under tfds mocks): ask the data
            ds = builder.as_dataset(split=text, shuffle_files=False)
            n = int(ds.cardinality())
            counts[s] = n if n >= 0 else sum(1 for _ in ds)
        if limit:
            counts[s] = min(counts[s], limit)
    counts = {s: c for s, c in counts.items() if c > 0}
    fingerprint = hashlib.sha256(json.dumps({
        "name": name, "version": str(builder.version), "splits": split_strings,
        "counts": counts, "classes": class_names,
    }, sort_keys=True).encode()).hexdigest()
    return Source(
        spec=f"tfds:{name}:{builder.version}", kind="tfds", class_names=class_names,
        split_spec=split, counts=counts, fingerprint=fingerprint, split_rule="tfds-slices",
        _tfds={"builder": builder, "splits": split_strings, "image_key": image_key,
               "label_key": label_key, "counts": counts},
    )


def _tfds_is_prepared(builder) -> bool:
    """True when the data is on disk (or ``tfds.testing.mock_data`` fakes it: nothing to download)."""
    method = getattr(type(builder), "download_and_prepare", None)
    if str(getattr(method, "__module__", "")).startswith("tensorflow_datasets.testing"):
        return True
    try:
        return bool(builder.is_prepared())
    except Exception:  # noqa: BLE001 - older tfds: let download_and_prepare decide
        return True


OFFLINE_HINT = ("use local images instead: tlpipe ... --data PATH (a folder of class subfolders), or with DVC: "
                "dvc exp run -S data.source=PATH; the ImageNet weights come next and need the network too "
                "(--weights PATH, or -S extract.weights=PATH; see 'tlpipe bases')")


def _check_download_hosts(builder, name: str, data_dir: str | None) -> None:
    """Fail in seconds, not after minutes of retries, when the dataset's download host is unreachable."""
    try:
        urls = list(builder.url_infos or {})
    except Exception:  # noqa: BLE001 - no recorded URLs (manual downloads): nothing to probe
        urls = []
    for url in urls[:3]:
        why = unreachable(url)
        if why:
            where = data_dir or "~/tensorflow_datasets"
            raise DataError(f"tfds:{name} is not prepared in {where} and cannot be downloaded ({why}): {OFFLINE_HINT}")


def _iter_tfds(state: dict[str, Any], split: str, start: int) -> Iterator[Item]:
    import tensorflow_datasets as tfds

    builder = state["builder"]
    read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=0)
    ds = builder.as_dataset(split=state["splits"][split], shuffle_files=False, read_config=read_config)
    total = state["counts"][split]
    ds = ds.take(total)
    if start:
        ds = ds.skip(start)
    for i, ex in enumerate(tfds.as_numpy(ds), start=start):
        tid = ex.get("tfds_id")
        if isinstance(tid, bytes):
            tid = tid.decode()
        yield Item(str(tid) if tid is not None else f"{split}/{i}", int(ex[state["label_key"]]),
                   array=ex[state["image_key"]])


def _short(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception, shortened at a word boundary."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"
