"""Shards of a features file: a deterministic partition of every split, and ``tlpipe merge``.

Shard ``I`` of ``N`` holds items ``[T*I//N, T*(I+1)//N)`` of the ``T`` items of all splits laid end to
end in split order (train, val, test): for every split a contiguous range of its item indices,
ascending with ``I``, the same on every machine.
A shard file has the layout of a features file (``/<split>/features|labels|ids`` and the
same attributes, fingerprint included) plus ``shard_index``, ``shard_count`` and
``shard_ranges`` (JSON ``{split: [start, stop]}``); its ``counts`` and ``skipped`` are
its own.  Shard files appear only when complete (written aside, then renamed).

``merge_shards`` checks that the N shards are all there, made with one fingerprint, not
overlapping and not truncated, then writes either an HDF5 virtual dataset over them (no
copy; source file names are stored relative to the merged file, so moving the folder that
holds both keeps it readable) or, with ``copy=True``, one self-contained file equal to what
the local engine writes (same datasets, row order and attributes, timings aside).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import FeaturesFileError, UsageError
from pipeline.core.safety import OutputExists
from pipeline.data.sources import SPLITS
from pipeline.store.features import read_attrs
from pipeline.store.schema import SHARD_ATTRS
from pipeline.store.writer import append_rows, open_datasets

log = logging.getLogger(__name__)

__all__ = ["SHARD_ATTRS", "parse_shard", "partition", "shard_name", "shard_info", "finished_shards", "check_shards",
           "merged_attrs", "merge_shards"]


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``; anything else is a one-line usage error."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise UsageError(f"--shard must look like I/N (e.g. 0/8, shards 0..N-1), not '{spec}'")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise UsageError(f"--shard {spec}: the shard count N must be at least 1")
    if index >= count:
        raise UsageError(f"--shard {spec}: the shard index must be 0..{count - 1}")
    return index, count


def partition(counts: dict[str, int], count: int) -> list[dict[str, tuple[int, int]]]:
    """Item ranges ``{split: (start, stop)}`` of each of ``count`` shards.

    The splits' items, laid end to end in split order, are cut into ``count`` runs of equal length
    (+-1): every split is partitioned into contiguous ranges ascending with the shard index, and
    a shard touches at most two splits' ends (few part-filled batches)."""
    total = sum(counts.values())
    shards = []
    for i in range(count):
        lo, hi = total * i // count, total * (i + 1) // count
        ranges, offset = {}, 0
        for split, c in counts.items():
            ranges[split] = (min(max(lo - offset, 0), c), min(max(hi - offset, 0), c))
            offset += c
        shards.append(ranges)
    return shards


def shard_name(stem: str, index: int, count: int) -> str:
    """``<stem>-00003-of-00008.h5``: sorts in shard order."""
    return f"{stem}-{index:05d}-of-{count:05d}.h5"


def shard_info(path: Path) -> dict[str, Any]:
    """Attributes of a complete shard file, checked against its datasets (one clear error if not)."""
    import h5py

    attrs = read_attrs(path)  # raises FeaturesFileError for a truncated or non-HDF5 file
    if not all(k in attrs for k in (*SHARD_ATTRS, "fingerprint", "counts")):
        raise UsageError(f"{path} is not a tlpipe shard file (no shard_index/shard_count/fingerprint)")
    ranges = {s: tuple(r) for s, r in json.loads(attrs["shard_ranges"]).items()}
    skipped: dict[str, int] = {}
    for s in attrs.get("skipped") or []:
        skipped[s["split"]] = skipped.get(s["split"], 0) + 1
    try:
        with h5py.File(path, "r") as h5:
            for split, (start, stop) in ranges.items():
                rows = int(h5[split]["features"].shape[0]) if split in h5 else 0
                if split in h5:
                    for key in ("labels", "ids"):
                        if h5[split][key].shape[0] != rows:
                            raise FeaturesFileError(f"{path}: {split}/{key} has {h5[split][key].shape[0]} rows, "
                                                    f"features {rows}")
                    h5[split]["features"][rows - 1:rows] if rows else None  # reads the last chunk
                if rows + skipped.get(split, 0) != stop - start:
                    raise FeaturesFileError(f"{path} is incomplete: {split} has {rows} rows + "
                                            f"{skipped.get(split, 0)} skipped for items {start}..{stop - 1}")
    except FeaturesFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or damaged HDF5
        raise FeaturesFileError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc})") from None
    attrs["shard_ranges"] = ranges
    attrs["path"] = Path(path)
    return attrs


def finished_shards(folder: Path, fingerprint: str, count: int) -> dict[int, Path]:
    """Complete shard files in ``folder`` made with ``fingerprint`` as shard ``i`` of ``count``."""
    done: dict[int, Path] = {}
    if not folder.is_dir():
        return done
    for path in sorted(folder.glob("*.h5")):
        try:
            info = shard_info(path)
        except FeaturesFileError as exc:
            log.warning("ignoring shard %s: %s", path, exc)
            continue
        if info["fingerprint"] == fingerprint and int(info["shard_count"]) == count:
            done[int(info["shard_index"])] = path
    return done


def split_order(infos: list[dict[str, Any]]) -> list[str]:
    """The splits of a set of shards in file order: train, val, test, then any view splits
    (``<split>_view<k>``, pipeline.data.views) in the order the shards list them."""
    extra = [s for s in infos[0]["shard_ranges"] if s not in SPLITS]
    return [*SPLITS, *extra]


def check_shards(paths: list[Path]) -> list[dict[str, Any]]:
    """The shards' attributes in shard order, after checking that they form one whole."""
    if not paths:
        raise UsageError("merge needs shard files")
    infos = []
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"shard file not found: {p}")
        infos.append(shard_info(Path(p)))
    first = infos[0]
    for info in infos[1:]:
        if info["fingerprint"] != first["fingerprint"]:
            raise UsageError(f"{info['path']} was made with other settings than {first['path']} "
                               "(different fingerprint): not merging shards of different extractions")
        if int(info["shard_count"]) != int(first["shard_count"]):
            raise UsageError(f"{info['path']} is one of {info['shard_count']} shards, "
                             f"{first['path']} one of {first['shard_count']}")
    count = int(first["shard_count"])
    by_index: dict[int, dict] = {}
    for info in infos:
        i = int(info["shard_index"])
        if i in by_index:
            raise UsageError(f"shard {i}/{count} given twice: {by_index[i]['path']} and {info['path']}")
        by_index[i] = info
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        have = ", ".join(str(by_index[i]["path"]) for i in sorted(by_index)[:4]) + (" ..." if len(by_index) > 4 else "")
        raise UsageError(f"{len(missing)} of {count} shards missing: shard {shown} (given: {have})")
    ordered = [by_index[i] for i in range(count)]
    for split in split_order(ordered):  # contiguous, non-overlapping ranges covering each split
        pos = 0
        for info in ordered:
            start, stop = info["shard_ranges"].get(split, (pos, pos))
            if start != pos:
                raise FeaturesFileError(f"{info['path']}: {split} items {start}..{stop - 1} overlap or leave a gap "
                                        f"(expected to start at {pos})")
            pos = stop
    return ordered


def merged_attrs(infos: list[dict[str, Any]], counts: dict[str, int], overrides: dict | None = None) -> dict:
    """Attributes of the merged file: the shards' common ones, then counts, skipped and timings."""
    attrs = {k: v for k, v in infos[0].items() if k not in (*SHARD_ATTRS, "path")}
    order = {s: i for i, s in enumerate(split_order(infos))}
    skipped = [s for info in infos for s in (info.get("skipped") or [])]
    skipped.sort(key=lambda s: order.get(s["split"], 9))  # stable: by split, then item index
    seconds = sum(float(i.get("extract_seconds") or 0) for i in infos)
    rows = sum(counts.values())
    attrs.update({
        "counts": counts, "splits": list(counts), "skipped": skipped, "skipped_count": len(skipped),
        "extract_seconds": round(seconds, 3),  # summed over shards (they may have run in parallel)
        "images_per_second": round(rows / seconds, 2) if seconds > 0 else 0.0,
        "timing": {"shards": len(infos), "shard_seconds": round(seconds, 3)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    attrs.update(overrides or {})
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in attrs.items()}


def merge_shards(paths: list[Path], out: Path, copy: bool = False, force: bool = False,
                 overrides: dict | None = None) -> Path:
    """Join shard files into the features file ``out`` (virtual dataset, or a copy); return ``out``."""
    import h5py

    out = Path(out)
    if out.exists() and not force:
        raise OutputExists(f"{out} exists; pass --force to replace it")
    infos = check_shards([Path(p) for p in paths])
    if any(Path(i["path"]).resolve() == out.resolve() for i in infos):
        raise UsageError(f"--out {out} is one of the shards")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    tmp = out.with_name(f".{out.name}.merging-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            for split in split_order(infos):
                parts = []
                for info in infos:
                    with h5py.File(info["path"], "r") as src:
                        if split in src:
                            parts.append((info["path"], int(src[split]["features"].shape[0])))
                if not parts:
                    continue
                counts[split] = sum(n for _, n in parts)
                if copy:
                    _copy_split(h5, split, parts)
                else:
                    _virtual_split(h5, split, parts, out.parent)
            if sum(counts.values()) == 0:
                raise FeaturesFileError("the shards hold no rows (every input was skipped)")
            for key, value in merged_attrs(infos, counts, overrides).items():
                h5.attrs[key] = value
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("merged %d shards into %s (%s): %s", len(infos), out, "copy" if copy else "virtual dataset",
             json.dumps(counts))
    return out


def _copy_split(h5, split: str, parts: list[tuple[Path, int]]) -> None:
    import h5py

    dsets = None
    for path, _ in parts:
        with h5py.File(path, "r") as src:
            g = src[split]
            if dsets is None:
                dsets = open_datasets(h5.require_group(split), int(g["features"].shape[1]), 0)
            step = 65536
            for a in range(0, g["features"].shape[0], step):
                append_rows(dsets, g["features"][a:a + step], g["labels"][a:a + step],
                            list(g["ids"].asstr()[a:a + step]))


def _virtual_split(h5, split: str, parts: list[tuple[Path, int]], folder: Path) -> None:
    """``split``'s datasets as virtual datasets over the shards (relative source file names)."""
    import h5py

    group = h5.require_group(split)
    total = sum(n for _, n in parts)
    for key in ("features", "labels", "ids"):
        with h5py.File(parts[0][0], "r") as src:
            d = src[split][key]
            dtype, tail = d.dtype, d.shape[1:]
        layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype, maxshape=(total, *tail))
        pos = 0
        for path, n in parts:
            if n:
                rel = os.path.relpath(Path(path).resolve(), Path(folder).resolve())
                layout[pos:pos + n] = h5py.VirtualSource(rel, f"{split}/{key}", shape=(n, *tail))
            pos += n
        group.create_virtual_dataset(key, layout)
