"""Stage one: run a frozen base once over every split and cache pooled features in HDF5.

Reader → model → writer:
  * reader: a thread pool decodes/resizes whole batches ahead of the model (Pillow
    releases the GIL), keeping at most ``prefetch`` batches in memory;
  * model: one compiled forward pass on fixed-size uint8 batches (no retracing);
  * writer: appends each batch to a hidden temporary HDF5 file in row chunks, and
    after each batch records a checkpoint (rows done) in a small JSON sidecar, so a
    killed run resumes from the last completed batch.  On completion the file gets
    its provenance attributes and is renamed to the final path.

An exclusive lock (``.<name>.lock``) stops two runs writing the same output.

The engine only decides where these three run: ``local`` (this process, as above) or ``ray``
(pipeline.stage1.engine_ray: decode tasks and model actors on a Ray cluster, writing shard files).  Both
use ``iter_chunks``/``decode_batch`` (reader), ``build_runtime`` (the one model factory) and
``write_batches`` (writer).  ``shard="I/N"`` makes the local engine write shard I of N only
(pipeline.store.shards; joined by ``tlpipe merge``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from pipeline import __version__
from pipeline.nets.backbones import get_backbone
from pipeline.data.sources import Item, Source, old_split_rule, open_source
from pipeline.core.errors import DataError, LockedError, TlpipeError, UsageError
from pipeline.store.features import SCHEMA_VERSION, extraction_fingerprint, read_attrs
from pipeline.data.images import RESIZE_METHOD, DecodeError, decode_image, resize_array
from pipeline.core.safety import check_out_path
from pipeline.core.util import atomic_write_text, progress_bar

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Everything ``extract`` needs; the CLI and DVC fill it from options / params."""

    base: str
    data: str = "tfds:cats_vs_dogs"
    split: str = "80/10/10"
    weights: str = "imagenet"
    out: Path | None = None  # default: <cache_dir>/features/<base>.h5
    cache_dir: Path = Path("cache")
    input_size: int | None = None  # default: the base's own
    pooling: str = "avg"
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = auto (see default_workers)
    prefetch: int = 0  # batches decoded ahead; 0 = 2 * workers + 2
    decode_nice: int | None = None  # niceness of decode threads (Linux); None = auto (see _decode_nice)
    limit: int | None = None  # cap images per split (quick runs)
    resume: bool = True
    force: bool = False
    tfds_data_dir: str | None = None
    progress: bool = True
    mixed_precision: str = "auto"  # auto (on for GPUs) | on | off
    engine: str = "local"  # local | ray (where reader, runtime and writer run)
    ray_address: str | None = None  # ray engine: a running cluster (host:port, ray://host:port, auto); None: start one
    gpus_per_worker: float = 0.0  # ray engine: GPUs per model actor
    shard_size: int = 1000  # ray engine: images per shard (the unit of work and of resume)
    shard: str | None = None  # "I/N": write shard I of N (local engine; merge with `tlpipe merge`)
    runtime: str = "auto"  # auto | keras | openvino (pipeline.stage1.runtime)
    precision: str = "auto"  # auto | f32 | bf16 | fp16 (pipeline.stage1.runtime)

    def output_path(self, shard: tuple[int, int] | None = None) -> Path:
        """The output file: --out, else CACHE/features/BASE.h5 (a shard: CACHE/features/BASE.shards/...)."""
        if self.out:
            return Path(self.out)
        name = self.base.strip().lower().replace("-", "_")
        if shard is not None:
            from pipeline.store.shards import shard_name

            return Path(self.cache_dir) / "features" / f"{name}.shards" / shard_name(name, *shard)
        return Path(self.cache_dir) / "features" / f"{name}.h5"


@dataclass
class _State:
    """Checkpoint of a run in progress (stored as JSON beside the partial file)."""

    fingerprint: str
    batch_size: int
    next_index: dict[str, int] = field(default_factory=dict)  # next item index per split
    rows: dict[str, int] = field(default_factory=dict)  # rows written per split
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # extraction time of earlier attempts


def default_workers(runtime: str = "keras") -> int:
    """Decode threads when ``workers=0``.

    With the model on an accelerator, decoding is the bottleneck: one thread per core.
    With the Keras model on the CPU, the forward pass needs the cores and decoding costs ~10x
    less per image, so a quarter of the cores (at least one) keeps the model fed without
    stealing CPU from it.  With OpenVINO the forward pass is 2-6x cheaper and decoding can cost
    more than it (photos shrunk to the input size: 1.6 ms against bf16's 1.4 ms per image), so
    one thread per core; threads beyond the need wait on the prefetch bound (measured in
    benchmarks/bench_extract.py: +20% bf16 images/s on trashnet, no change on 180-px photos).
    """
    from pipeline.stage1.runtime import _accelerator

    cores = os.cpu_count() or 1
    if runtime == "keras" and _accelerator() is not None:
        return max(1, cores)
    if runtime == "openvino":
        return max(1, cores)
    return max(1, cores // 4)


def _decode_nice(requested: int | None, runtime: str = "keras") -> int:
    """Niceness for decode threads.  With the Keras model on the CPU, decoding yields to the forward
    pass (a decode thread preempting one of TensorFlow's threads stalls the whole parallel op).
    OpenVINO keeps the next batch queued behind the running one, so decoding at normal priority
    costs it nothing and keeps it fed; with an accelerator, decoding is the bottleneck.
    (Measured in benchmarks/bench_extract.py, RESULTS.md "CPU runtime".)"""
    if requested is not None:
        return int(requested)
    from pipeline.stage1.runtime import _accelerator

    return DECODE_NICE_CPU if runtime == "keras" and _accelerator() is None else 0


DECODE_NICE_CPU = 10  # decode threads yield to the forward pass when the model runs on the CPU


def _lower_thread_priority(nice: int) -> None:
    """Raise this thread's niceness by ``nice`` (Linux threads are tasks; elsewhere a no-op)."""
    if nice <= 0:
        return
    try:
        import threading

        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        pass


def hidden_sibling(path: Path, suffix: str) -> Path:
    """``dir/.name<suffix>``: where partial files, checkpoints and locks live."""
    return path.with_name(f".{path.name}{suffix}")


def extract(cfg: ExtractConfig) -> Path:
    """Extract features for every split of ``cfg.data`` with ``cfg.base``; return the HDF5 path.

    ``cfg.shard = "I/N"`` writes shard I of N instead (a shard file, see pipeline.store.shards);
    ``cfg.engine = "ray"`` runs the same reader, runtime and writer on a Ray cluster."""
    from pipeline.store.shards import parse_shard
    from pipeline.nets.weights import parse_weights

    backbone = get_backbone(cfg.base)
    if cfg.batch_size < 1:
        raise TlpipeError("--batch-size must be at least 1")
    if cfg.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, not '{cfg.engine}'")
    shard = parse_shard(cfg.shard) if cfg.shard else None
    if shard and cfg.engine == "ray":
        raise UsageError("--shard is for the local engine (one shard per job); the ray engine shards by itself")
    if cfg.engine == "ray":
        from pipeline.stage1.engine_ray import check_address

        check_address(cfg.ray_address)  # an unreachable cluster fails in seconds, before any listing
    weights = parse_weights(cfg.weights, backbone)
    from pipeline.stage1.runtime import resolve

    resolve(cfg.runtime, cfg.precision, cfg.mixed_precision)  # a bad --runtime/--precision: one line, before the data
    size = cfg.input_size or backbone.input_size
    out = cfg.output_path(shard)
    check_out_path(out, "file")  # a folder or a path under a file: one line, before the data is listed
    source = open_source(cfg.data, cfg.split, cfg.tfds_data_dir, cfg.limit)
    if not source.splits:
        raise DataError(f"no images in {cfg.data}")
    out.parent.mkdir(parents=True, exist_ok=True)
    job = Job(backbone, weights, size, source, out, shard)

    from filelock import FileLock, Timeout

    lock = FileLock(str(hidden_sibling(out, ".lock")), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another tlpipe extract is writing {out} (lock {hidden_sibling(out, '.lock')})") from None
    try:
        if cfg.engine == "ray":
            from pipeline.stage1.engine_ray import extract_ray

            return extract_ray(cfg, job)
        return _extract_locked(cfg, job)
    finally:
        # remove the lock file while still holding it (no empty .NAME.lock left beside the output);
        # another run that opened it meanwhile fails at once (timeout 0) rather than writing too
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


@dataclass
class Job:
    """One extraction: what to read (the whole source, or one shard of it) and where to write."""

    backbone: Any
    weights: Any  # parsed --weights (see pipeline.nets.weights.parse_weights)
    size: int
    source: Source
    out: Path
    shard: tuple[int, int] | None = None  # (index, count) for a shard file

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Item ranges ``{split: (start, stop)}`` this job covers."""
        from pipeline.store.shards import partition

        counts = {s: self.source.counts[s] for s in self.source.splits}
        if self.shard is None:
            return {s: (0, c) for s, c in counts.items()}
        return partition(counts, self.shard[1])[self.shard[0]]

    def shard_attrs(self) -> dict[str, Any]:
        if self.shard is None:
            return {}
        return {"shard_index": self.shard[0], "shard_count": self.shard[1], "shard_ranges": json.dumps(self.ranges())}


@dataclass
class RuntimeSpec:
    """What building the runtime needs (picklable: Ray actors build their own from it)."""

    base: str
    weights: Any
    size: int
    pooling: str
    batch_size: int
    mixed_precision: str = "auto"
    runtime: str = "auto"  # auto | keras | openvino (pipeline.stage1.runtime.resolve)
    precision: str = "auto"  # auto | f32 | bf16 | fp16


@dataclass
class Runtime:
    """The object turning uint8 batches into features (a ``pipeline.stage1.runtime.Runtime``), and what it
    is made of."""

    forward: Any  # pipeline.stage1.runtime.Runtime: uint8[B, S, S, 3] -> float32[B, D]; .warmup()
    winfo: Any  # pipeline.nets.weights.WeightsInfo
    dim: int
    name: str  # keras | openvino
    precision: str  # f32 | bf16 | fp16

    def attrs(self) -> dict[str, Any]:
        """The features-file attributes that depend on the runtime (where it runs)."""
        import keras

        return {"weights": self.winfo.label, "weights_sha256": self.winfo.sha256, "feature_size": self.dim,
                "mixed_precision": self.precision == "fp16", "runtime": self.name, "precision": self.precision,
                "openvino_version": _ov_version() if self.name == "openvino" else "",
                "keras_version": keras.__version__, "keras_backend": keras.backend.backend(),
                "tensorflow_version": _tf_version(), "h5py_version": h5py.__version__}


def build_runtime(spec: RuntimeSpec) -> Runtime:
    """THE model factory of stage one: every engine builds its runtime here (and only here), through
    ``pipeline.stage1.runtime.build_runtime`` (Keras or OpenVINO; it seeds Keras' initializers so that
    ``--weights none`` gives the same random base in every run and every worker)."""
    from pipeline.stage1 import runtime

    rt = runtime.build_runtime(get_backbone(spec.base), spec.weights, spec.size, spec.pooling, runtime=spec.runtime,
                               precision=spec.precision, batch_size=spec.batch_size,
                               mixed_precision=spec.mixed_precision)
    return Runtime(rt, rt.weights, int(rt.feature_size), rt.name, rt.precision)


def runtime_spec(cfg: ExtractConfig, job: Job, runtime: str | None = None, precision: str | None = None) -> RuntimeSpec:
    return RuntimeSpec(job.backbone.name, job.weights, job.size, cfg.pooling, cfg.batch_size, cfg.mixed_precision,
                       runtime or cfg.runtime, precision or cfg.precision)


def prepare(cfg: ExtractConfig, job: Job, weights_id: tuple[str, str], runtime_id: tuple[str, str]) -> str | None:
    """The job's fingerprint, or None when ``job.out`` is already up to date; refuses (before any
    work) to replace a file made from other settings."""
    kind, sha = weights_id
    fingerprint = _fingerprint(job.backbone, kind, sha, job.size, cfg.pooling, job.source, *runtime_id)
    if not cfg.force and _up_to_date(job.out, fingerprint, job.shard):
        return None
    _guard_existing(job.out, _settings(job.backbone, kind, sha, job.size, cfg, job.source, fingerprint, *runtime_id),
                    cfg.force, job.shard)
    return fingerprint


def _extract_locked(cfg: ExtractConfig, job: Job) -> Path:
    from pipeline.stage1.runtime import resolve
    from pipeline.nets.weights import known_weights

    out, source = job.out, job.source
    # the runtime and precision this run will use (one line, exit 2, when impossible here)
    planned = resolve(cfg.runtime, cfg.precision, cfg.mixed_precision)
    known = known_weights(job.backbone, job.weights)  # identity of the weights without building the model
    fingerprint = prepare(cfg, job, known, planned) if known is not None else None
    if known is not None and fingerprint is None:
        return out  # nothing to do: not even TensorFlow is imported
    rt = build_runtime(runtime_spec(cfg, job))
    built = ((rt.winfo.kind, rt.winfo.sha256), (rt.name, rt.precision))
    if built != (known, planned):
        # ImageNet weights: known only now; or auto fell back to keras (OpenVINO could not convert the base)
        fingerprint = prepare(cfg, job, *built)
        if fingerprint is None:
            return out

    partial = hidden_sibling(out, ".partial")
    ckpt = hidden_sibling(out, ".progress.json")
    state = _load_state(ckpt, partial, fingerprint, cfg.batch_size) if cfg.resume else None
    if state is None:
        for p in (partial, ckpt):
            p.unlink(missing_ok=True)
        state = _State(fingerprint=fingerprint, batch_size=cfg.batch_size)
    else:
        done = sum(state.next_index.values())
        log.info("resuming %s: %d inputs already done", out, done)

    workers = cfg.workers or default_workers(rt.name)
    prefetch = cfg.prefetch or 2 * workers + 2
    ranges = job.ranges()
    total = sum(stop - start for start, stop in ranges.values())
    segments = [(s, state.next_index.get(s, start), stop) for s, (start, stop) in ranges.items()
                if state.next_index.get(s, start) < stop]
    already = total - sum(stop - start for _, start, stop in segments)
    bar = progress_bar(total=total, initial=already, desc=f"extract {job.backbone.name}", enabled=cfg.progress)

    def checkpoint(split: str, index: int, rows: int, n: int, seconds: float) -> None:
        _save_state(ckpt, state, seconds)
        bar.update(n)
        bar.set_postfix_str(split)

    try:
        nice = _decode_nice(cfg.decode_nice, rt.name)
        with h5py.File(partial, "a") as h5, ThreadPoolExecutor(
                workers, thread_name_prefix="decode", initializer=_lower_thread_priority, initargs=(nice,)) as pool:
            # Start decoding before the forward pass is compiled, so the first batches are
            # ready when it is; one reader spans every split (no refill bubble between splits).
            reader = _BatchReader(source, segments, cfg.batch_size, job.size, pool, prefetch)
            rt.forward.warmup()
            t0 = time.perf_counter()  # extraction time: decode + forward + write, after compile
            t_forward, t_write, images = write_batches(h5, reader, rt, state, checkpoint)
            elapsed = state.seconds + (time.perf_counter() - t0)
            # Where this run's extraction time went (main thread): forward pass, waiting for
            # the decoder, writing; benchmarks/bench_extract.py reads it.
            timing = {"seconds": round(time.perf_counter() - t0, 3), "forward": round(t_forward, 3),
                      "decode_wait": round(reader.wait_seconds, 3), "write": round(t_write, 3),
                      "workers": workers, "prefetch": prefetch, "decode_nice": nice}
            counts = {s: int(h5[s]["features"].shape[0]) for s in source.splits if s in h5}
            if sum(counts.values()) == 0 and job.shard is None:
                raise _NothingExtracted(
                    f"every input was skipped ({len(state.skipped)} files could not be decoded); "
                    f"first: {state.skipped[0]['id']}: {state.skipped[0]['reason']}" if state.skipped
                    else f"no images in {cfg.data}"
                )
            attrs = {**static_attrs(cfg, job, fingerprint), **rt.attrs(), **job.shard_attrs(),
                     **result_attrs(counts, state.skipped, elapsed, timing)}
            for key, value in attrs.items():
                h5.attrs[key] = value
    except _NothingExtracted:
        for p in (partial, ckpt):  # nothing to resume: leave no hidden leftovers
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if job.shard is None:
        skipped_path = out.with_name(out.stem + ".skipped.json")
        atomic_write_text(skipped_path, json.dumps(state.skipped, indent=1) + "\n")
    os.replace(partial, out)
    ckpt.unlink(missing_ok=True)
    rate = images / (time.perf_counter() - t0) if images else 0.0
    log.info("wrote %s: %s rows, %d skipped, %.1f images/s", out,
             json.dumps(counts), len(state.skipped), rate)
    return out


def write_batches(h5: h5py.File, batches, rt: Runtime, state: _State, checkpoint=None) -> tuple[float, float, int]:
    """The writer: run ``rt`` on decoded ``batches`` and append them to ``h5`` (split groups);
    after each batch, flush and call ``checkpoint(split, next_index, rows, n, seconds)``.

    Batches go through ``rt.forward.map``: a runtime that runs asynchronously (OpenVINO) starts
    the next batch before this one is written, so the model is never idle while the writer works.
    Returns (seconds waiting for the model, write seconds, inputs consumed)."""
    dsets, rows, current = None, 0, None
    t_write = t_pull = 0.0
    images = 0
    t0 = time.perf_counter()
    waiting: deque = deque()  # batches pulled from the reader, not yet written (in order)

    def feed():  # the model's input: the batches with at least one decoded image
        nonlocal t_pull
        it = iter(batches)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            t_pull += time.perf_counter() - t
            if item is None:
                return
            waiting.append(item)
            if len(item[3]):
                yield item[2][: len(item[3])]

    def write(item, feats) -> None:
        nonlocal dsets, rows, current, t_write, images
        split, index, _, ids, labels, skipped = item
        if split != current:
            current = split
            rows = state.rows.get(split, 0)
            dsets = open_datasets(h5.require_group(split), rt.dim, rows)
        if feats is not None:
            t = time.perf_counter()
            append_rows(dsets, feats, np.asarray(labels, dtype=np.int64), ids)
            t_write += time.perf_counter() - t
            rows += len(ids)
        state.skipped.extend({"split": split, "id": i, "reason": r} for i, r in skipped)
        for i, r in skipped:
            log.warning("skipped %s: %s", i, r)
        h5.flush()
        state.next_index[split] = index
        state.rows[split] = rows
        images += len(ids) + len(skipped)
        if checkpoint is not None:
            checkpoint(split, index, rows, len(ids) + len(skipped), time.perf_counter() - t0)

    outputs = rt.forward.map(feed())
    t_model = 0.0
    try:
        while True:
            t, pulled = time.perf_counter(), t_pull
            feats = next(outputs, None)
            t_model += (time.perf_counter() - t) - (t_pull - pulled)
            if feats is None:
                break
            item = waiting.popleft()
            while not len(item[3]):  # batches where every input was skipped, in their place
                write(item, None)
                item = waiting.popleft()
            write(item, feats)
        while waiting:
            write(waiting.popleft(), None)
    finally:
        outputs.close()
    return t_model, t_write, images


def static_attrs(cfg: ExtractConfig, job: Job, fingerprint: str) -> dict[str, Any]:
    """The features-file attributes fixed by the settings and the listed data."""
    backbone, source = job.backbone, job.source
    return {
        "schema_version": SCHEMA_VERSION,
        "base": backbone.name,
        "base_requested": cfg.base,
        "constructor": f"keras.applications.{backbone.constructor}",
        "constructor_kwargs": json.dumps(backbone.kwargs),
        "input_size": job.size,
        "pooling": cfg.pooling,
        "preprocessing": f"keras.applications.{backbone.module}.preprocess_input",
        "resize": RESIZE_METHOD,
        "data_source": source.spec,
        "data_kind": source.kind,
        "split_spec": source.split_spec,
        "source_fingerprint": source.fingerprint,
        "split_rule": source.split_rule,
        "fingerprint": fingerprint,
        "class_names": json.dumps(source.class_names),
        "num_classes": len(source.class_names),
        "limit": cfg.limit or 0,
        "batch_size": cfg.batch_size,
        "tlpipe_version": __version__,
    }


def result_attrs(counts: dict[str, int], skipped: list[dict], elapsed: float, timing: dict) -> dict[str, Any]:
    """The features-file attributes of what a run produced: rows, skipped inputs, timings."""
    return {
        "splits": json.dumps(list(counts)),
        "counts": json.dumps(counts),
        "skipped_count": len(skipped),
        "skipped": json.dumps(skipped),
        "extract_seconds": round(elapsed, 3),
        "images_per_second": round(sum(counts.values()) / elapsed, 2) if elapsed > 0 else 0.0,
        "timing": json.dumps(timing),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fingerprint(backbone, weights_kind: str, weights_sha256: str, size: int, pooling: str,
                 source: Source, runtime: str = "keras", precision: str = "f32") -> str:
    """What determines the features: base, weights, input size, pooling, preprocessing, data, and the
    runtime and precision that computed them (a bf16 cache is never taken for an f32 one)."""
    return extraction_fingerprint(
        base=backbone.name, weights=weights_kind, weights_sha256=weights_sha256, input_size=size,
        pooling=pooling, preprocessing=f"keras.applications.{backbone.module}.preprocess_input",
        source_fingerprint=source.fingerprint, split=source.split_spec, version=__version__,
        resize=RESIZE_METHOD, runtime=runtime, precision=precision,
    )


def _settings(backbone, weights_kind: str, weights_sha256: str, size: int, cfg: ExtractConfig, source: Source,
              fingerprint: str, runtime: str = "keras", precision: str = "f32") -> dict:
    """What a features file records about how it was made (compared with an existing file)."""
    return {"base": backbone.name, "weights": weights_kind, "weights_sha256": weights_sha256,
            "input_size": size, "pooling": cfg.pooling, "data_source": source.spec,
            "split_spec": source.split_spec, "split_rule": source.split_rule,
            "source_fingerprint": source.fingerprint, "limit": cfg.limit or 0, "tlpipe_version": __version__, "resize": RESIZE_METHOD,
            "runtime": runtime, "precision": precision, "fingerprint": fingerprint}


_EXPLAIN = {"source_fingerprint": "the images listed", "weights_sha256": "weights file contents",
            "split_spec": "split", "data_source": "data", "input_size": "input size",
            "tlpipe_version": "tlpipe version", "resize": "decode resize"}


def _guard_existing(out: Path, new: dict, force: bool, shard: tuple[int, int] | None = None) -> None:
    """Refuse to replace an existing file made from other settings, or another shard of them (or a
    whole features file by a shard, or the reverse), unless --force (or DVC has it)."""
    from pipeline.core.safety import check_replace

    if not out.exists():
        return
    try:
        old = read_attrs(out)
    except Exception:  # noqa: BLE001 - not HDF5 at all
        old = {}
    old_shard = (old["shard_index"], old["shard_count"]) if "shard_index" in old else None
    if old.get("fingerprint") == new["fingerprint"] and old_shard == shard:
        return  # same settings: re-extracting (--force) gives the same file
    if old.get("fingerprint") == new["fingerprint"]:
        what = lambda sh: f"shard {sh[0]}/{sh[1]}" if sh else "the whole features file"  # noqa: E731
        check_replace(out, "features", [f"{what(old_shard)} -> {what(shard)}"], force)
        return
    if "fingerprint" not in old:
        changes = ["it is not a tlpipe features file"]
    else:
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
                changes.append(f"{_EXPLAIN[key]} differ")
            else:
                changes.append(f"{_EXPLAIN.get(key, key)} {before} -> {value}")
        changes = changes or ["fingerprint differs"]
    check_replace(out, "features", changes, force)


def _up_to_date(out: Path, fingerprint: str, shard: tuple[int, int] | None = None) -> bool:
    """True (and says so) when ``out`` already holds features (or that shard) with this fingerprint."""
    try:
        attrs = read_attrs(out) if out.exists() else {}
        same_shard = shard is None or (attrs.get("shard_index"), attrs.get("shard_count")) == shard
        if attrs.get("fingerprint") == fingerprint and same_shard and ("shard_index" in attrs) == (shard is not None):
            log.info("%s is up to date (same fingerprint); use --force to extract again", out)
            partial = hidden_sibling(out, ".partial")
            if partial.exists():  # an interrupted run with other settings: kept for a rerun of those
                log.info("an unfinished extraction with other settings is kept at %s (%.1f MB): the same "
                         "command with those settings resumes it; delete it if you do not need it",
                         partial, partial.stat().st_size / 1e6)
            return True
    except Exception:  # noqa: BLE001 - an unreadable file is simply not up to date
        pass
    return False


class _NothingExtracted(DataError):
    """Every input of the run was skipped."""


def _ov_version() -> str:
    try:
        import openvino

        return openvino.__version__
    except Exception:  # pragma: no cover
        return ""


def _tf_version() -> str:
    try:
        import tensorflow as tf

        return tf.__version__
    except Exception:  # pragma: no cover - e.g. KERAS_BACKEND=jax without TF
        return ""


def open_datasets(group: h5py.Group, dim: int, rows: int) -> dict[str, h5py.Dataset]:
    """Create the split's datasets, or truncate them to the checkpointed row count."""
    if "features" not in group:
        chunk_rows = max(1, min(1024, (1 << 20) // (4 * dim)))  # ~1 MiB row chunks: fast sequential reads
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
    n0 = dsets["features"].shape[0]
    n1 = n0 + feats.shape[0]
    for key, value in (("features", feats), ("labels", labels), ("ids", np.asarray(ids, dtype=object))):
        dsets[key].resize(n1, axis=0)
        dsets[key][n0:n1] = value


def _save_state(path: Path, state: _State, seconds_this_run: float) -> None:
    data = asdict(state)
    data["seconds"] = state.seconds + seconds_this_run
    atomic_write_text(path, json.dumps(data))


def _load_state(ckpt: Path, partial: Path, fingerprint: str, batch_size: int) -> _State | None:
    """A checkpoint to resume from, or None (absent, other settings, or unreadable)."""
    if not (ckpt.exists() and partial.exists()):
        return None
    try:
        data = json.loads(ckpt.read_text())
        state = _State(**data)
    except Exception as exc:
        log.warning("ignoring unreadable checkpoint %s (%s); starting over", ckpt, exc)
        return None
    if state.fingerprint != fingerprint or state.batch_size != batch_size:
        log.warning("checkpoint %s was made with other settings; starting over", ckpt)
        return None
    try:
        with h5py.File(partial, "r") as h5:
            for split, rows in state.rows.items():
                if rows and (split not in h5 or h5[split]["features"].shape[0] < rows):
                    raise ValueError(f"{split} has fewer rows than the checkpoint")
    except Exception as exc:
        log.warning("partial file %s is unusable (%s); starting over", partial, exc)
        return None
    return state


def _decode_one(item: Item, size: int) -> np.ndarray:
    if item.path is not None:
        return decode_image(item.path, size)
    if item.array is None:
        raise DecodeError("no image data")
    try:
        return resize_array(item.array, size)
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def decode_batch(items: list[Item], size: int):
    """Decode a batch into one uint8 array; failed inputs are returned with their reason."""
    batch = np.empty((len(items), size, size, 3), dtype=np.uint8)
    ids, labels, skipped = [], [], []
    for item in items:
        try:
            batch[len(ids)] = _decode_one(item, size)
        except DecodeError as exc:
            skipped.append((item.id, str(exc)))
            continue
        ids.append(item.id)
        labels.append(item.label)
    return batch, ids, labels, skipped


def iter_chunks(source: Source, segments, batch_size: int):
    """``(split, next_index, items)`` for ``segments`` of ``(split, start, stop)``: ``batch_size`` items
    from each segment's start (the last batch short): fixed boundaries, deterministic features."""
    from itertools import islice

    for split, start, stop in segments:
        index = start
        chunk: list[Item] = []
        for item in islice(source.iter_items(split, start), stop - start):
            chunk.append(item)
            if len(chunk) == batch_size:
                index += len(chunk)
                yield split, index, chunk
                chunk = []
        if chunk:
            yield split, index + len(chunk), chunk


class _BatchReader:
    """Decode batches ahead in ``pool``; iterate ``(split, next_index, batch, ids, labels, skipped)``.

    Batch boundaries are fixed (``batch_size`` items from each segment's start, the last one
    short), whatever the number of threads, so features and checkpoints are deterministic.
    At most ``prefetch`` batches are decoded or in flight at any time (flat memory).
    Work is submitted on construction, so decoding overlaps whatever the caller does next.
    """

    def __init__(self, source: Source, segments: list[tuple[str, int]], batch_size: int, size: int,
                 pool: ThreadPoolExecutor, prefetch: int):
        self._chunks = iter_chunks(source, segments, batch_size)
        self._size = size
        self._pool = pool
        self._pending: deque = deque()
        self.wait_seconds = 0.0  # time the consumer spent waiting for a decoded batch
        while len(self._pending) < max(1, prefetch) and self._submit():
            pass

    def _submit(self) -> bool:
        nxt = next(self._chunks, None)
        if nxt is None:
            return False
        split, index, chunk = nxt
        self._pending.append((split, index, self._pool.submit(decode_batch, chunk, self._size)))
        return True

    def __iter__(self) -> Iterator[tuple[str, int, np.ndarray, list, list, list]]:
        while self._pending:
            split, index, fut = self._pending.popleft()
            t = time.perf_counter()
            batch, ids, labels, skipped = fut.result()
            self.wait_seconds += time.perf_counter() - t
            self._submit()
            yield split, index, batch, ids, labels, skipped
