"""Writing features files: the only code that creates the HDF5 datasets and appends rows to them.

``FeaturesWriter`` appends rows split by split to a file (a hidden partial file, or a shard file
being written aside) and sets its attributes; ``open_datasets``/``append_rows`` are its two steps,
also used by ``tlpipe merge --copy``.  ``up_to_date`` and ``guard_existing`` decide, from an existing
file's attributes, whether a run has nothing to do or would replace a file made otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.errors import TlpipeError
from pipeline.data.sources import old_split_rule
from pipeline.store.features import read_attrs

log = logging.getLogger(__name__)

ROW_CHUNK_BYTES = 1 << 20  # ~1 MiB feature row chunks: fast sequential reads


def hidden_sibling(path: Path, suffix: str) -> Path:
    """``dir/.name<suffix>``: where partial files, checkpoints, shards and locks live."""
    path = Path(path)
    return path.with_name(f".{path.name}{suffix}")


def open_datasets(group: h5py.Group, dim: int, rows: int) -> dict[str, h5py.Dataset]:
    """Create the split's datasets, or truncate them to the checkpointed row count."""
    if "features" not in group:
        chunk_rows = max(1, min(1024, ROW_CHUNK_BYTES // (4 * dim)))
        group.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype="float32",
                             chunks=(chunk_rows, dim))
        group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        group.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                             chunks=(4096,))
    dsets = {k: group[k] for k in ("features", "labels", "ids")}
    for d in dsets.values():
        if d.shape[0] < rows:
            raise TlpipeError("checkpoint is ahead of the partial file")
        d.resize(rows, axis=0)
    return dsets


def append_rows(dsets: dict[str, h5py.Dataset], feats: np.ndarray, labels: np.ndarray, ids: list[str]) -> None:
    """Append rows (features, labels, ids) at the end of a split's datasets."""
    n0 = dsets["features"].shape[0]
    n1 = n0 + feats.shape[0]
    for key, value in (("features", feats), ("labels", labels), ("ids", np.asarray(ids, dtype=object))):
        dsets[key].resize(n1, axis=0)
        dsets[key][n0:n1] = value


class FeaturesWriter:
    """Appends rows to a features file, one split at a time: ``open_split`` (resuming at a row count),
    ``append``, ``flush`` after each batch, ``set_attrs`` at the end."""

    def __init__(self, path: Path, mode: str = "a"):
        self.path = Path(path)
        self.h5 = h5py.File(self.path, mode)
        self._dsets: dict[str, h5py.Dataset] | None = None

    def __enter__(self) -> "FeaturesWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def open_split(self, split: str, dim: int, rows: int) -> None:
        """Append to ``split`` from now on, after its first ``rows`` rows (later ones are dropped)."""
        self._dsets = open_datasets(self.h5.require_group(split), dim, rows)

    def append(self, feats: np.ndarray, labels: np.ndarray, ids: list[str]) -> None:
        assert self._dsets is not None, "open_split first"
        append_rows(self._dsets, feats, labels, ids)

    def flush(self) -> None:
        """Make the rows written so far durable (a killed run resumes after them)."""
        self.h5.flush()

    def counts(self, splits) -> dict[str, int]:
        """Rows written per split (of ``splits``, those present)."""
        return {s: int(self.h5[s]["features"].shape[0]) for s in splits if s in self.h5}

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self.h5.attrs[key] = value


SALVAGE_ROWS = 4096  # rows copied at a time when a killed run's partial file is rewritten


def salvage(partial: Path, rows: dict[str, int]) -> None:
    """Rewrite a killed run's partial file with only its first ``rows[split]`` rows of every split.

    A writer killed mid-flush can leave metadata on disk that points at blocks never written (ids
    referring to variable-length heap objects that are not there); appending to such a file in place
    fails ("bad heap index") or spreads the damage.  The checkpointed rows were flushed before the
    checkpoint was saved, so they are read back, copied into a fresh file, and that file replaces the
    partial one.  Raises ``ValueError`` (or h5py's ``OSError``) if they cannot be read."""
    partial = Path(partial)
    fresh = partial.with_name(partial.name + ".salvage")
    try:
        with h5py.File(partial, "r") as src, h5py.File(fresh, "w") as dst:
            for split, n in rows.items():
                if n:
                    _copy_rows(src, dst, split, n)
        os.replace(fresh, partial)
    finally:
        fresh.unlink(missing_ok=True)


def _copy_rows(src: h5py.File, dst: h5py.File, split: str, n: int) -> None:
    """Copy the first ``n`` rows of ``split`` from ``src`` into new datasets of ``dst``."""
    if split not in src or src[split]["features"].shape[0] < n:
        raise ValueError(f"{split} has fewer rows than the checkpoint")
    group = src[split]
    dsets = open_datasets(dst.create_group(split), int(group["features"].shape[1]), 0)
    for a in range(0, n, SALVAGE_ROWS):
        b = min(n, a + SALVAGE_ROWS)
        append_rows(dsets, group["features"][a:b], group["labels"][a:b], list(group["ids"].asstr()[a:b]))


def _shard_of(attrs: dict[str, Any]) -> tuple[int, int] | None:
    return (attrs["shard_index"], attrs["shard_count"]) if "shard_index" in attrs else None


def up_to_date(out: Path, fingerprint: str, shard: tuple[int, int] | None = None) -> bool:
    """True (and says so) when ``out`` already holds features (or that shard) with this fingerprint."""
    try:
        attrs = read_attrs(out) if out.exists() else {}
        if attrs.get("fingerprint") != fingerprint or _shard_of(attrs) != shard:
            return False
        log.info("%s is up to date (same fingerprint); use --force to extract again", out)
        partial = hidden_sibling(out, ".partial")
        if partial.exists():  # an interrupted run with other settings: kept for a rerun of those
            log.info("an unfinished extraction with other settings is kept at %s (%.1f MB): the same "
                     "command with those settings resumes it; delete it if you do not need it",
                     partial, partial.stat().st_size / 1e6)
        return True
    except Exception:  # noqa: BLE001 - an unreadable file is simply not up to date
        return False


EXPLAIN = {"source_fingerprint": "the images listed", "weights_sha256": "weights file contents",
           "split_spec": "split", "data_source": "data", "input_size": "input size",
           "tlpipe_version": "tlpipe version", "resize": "decode resize"}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between an existing file's attributes and the new settings, in words."""
    if "fingerprint" not in old:
        return ["it is not a tlpipe features file"]
    old_rule = old_split_rule(old) if old.get("split_spec") == new.get("split_spec") else ""
    changes = [old_rule] if old_rule else []
    for key, value in new.items():
        before = old.get(key, 0 if key == "limit" else None)
        if key == "fingerprint" or str(before) == str(value) or (old_rule and key in (
                "split_rule", "source_fingerprint")) or (key == "split_rule" and before is None):
            continue
        if key == "weights":
            before = "file" if str(before) not in ("imagenet", "none") else before
            if before == value:
                continue
        if key in ("source_fingerprint", "weights_sha256"):
            changes.append(f"{EXPLAIN[key]} differ")
        else:
            changes.append(f"{EXPLAIN.get(key, key)} {before} -> {value}")
    return changes or ["fingerprint differs"]


def guard_existing(out: Path, new: dict, force: bool, shard: tuple[int, int] | None = None) -> None:
    """Refuse to replace an existing file made from other settings, or another shard of them (or a
    whole features file by a shard, or the reverse), unless --force (or DVC has it)."""
    from pipeline.core.safety import check_replace

    if not out.exists():
        return
    try:
        old = read_attrs(out)
    except Exception:  # noqa: BLE001 - not HDF5 at all
        old = {}
    old_shard = _shard_of(old)
    if old.get("fingerprint") == new["fingerprint"]:
        if old_shard == shard:
            return  # same settings: re-extracting (--force) gives the same file
        what = lambda sh: f"shard {sh[0]}/{sh[1]}" if sh else "the whole features file"  # noqa: E731
        check_replace(out, "features", [f"{what(old_shard)} -> {what(shard)}"], force)
        return
    check_replace(out, "features", describe_changes(old, new), force)
