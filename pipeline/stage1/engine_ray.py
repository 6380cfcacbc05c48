"""The Ray engine of stage one: the same reader, runtime and writer as the local engine, on Ray Data.

    items (listed by the driver, as today, grouped into shards; see pipeline.store.shards)
      -> map_batches(decode_shard)            CPU tasks: extract.iter_chunks + extract.decode_batch
      -> map_batches(ShardWriter, concurrency=N, num_gpus=G)
             actors holding the runtime from extract.build_runtime; each writes whole shard
             files with extract.write_batches (written aside, then renamed: a shard file exists
             only when complete)
      -> the driver merges the shards into one self-contained features file (pipeline.store.shards).

Finished shards are kept in ``.<out>.shards/`` until the merge: a rerun after a crash or a killed
driver extracts only the missing ones. Worker loss during a run is Ray's business: actors restart
(``max_restarts``) and their tasks are retried (``max_task_retries``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import TlpipeError, UsageError

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # restarts of a lost model actor, and retries of its shard
PROBE_SECONDS = 3.0
FAULT_ENV = "TLPIPE_FAULT"  # testing only: "POINT:MARKER" kills this process once at POINT if MARKER exists


def _fault(point: str) -> None:
    """Fault injection for the tests: SIGKILL this process at ``point``, once (claims the marker)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(point + ":"):
        return
    marker = spec[len(point) + 1:]
    try:
        os.remove(marker)  # only one process wins the marker
    except OSError:
        return
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def check_address(address: str | None) -> None:
    """Refuse an unreachable ``--ray-address`` in seconds (Ray itself retries for a long time)."""
    if address in (None, "", "local", "auto"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, not '{address}'")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS) as conn:
            # Ray's GCS (and its client server) speak gRPC: an HTTP/2 server answers the connection
            # preface with a SETTINGS frame. Anything else on that port would make ray.init retry for
            # many minutes, so it is refused here.
            conn.sendall(_H2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        why = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or str(exc))
        raise TlpipeError(f"cannot reach the Ray cluster at {address} ({why}); start one with "
                          f"'ray start --head' or fix --ray-address") from None
    if len(reply) < 9 or reply[3] != 0x04:
        raise TlpipeError(f"{address} answers, but not as a Ray cluster (no gRPC); give the address that "
                          f"'ray start --head' printed, or fix --ray-address")


# HTTP/2 connection preface + an empty SETTINGS frame (RFC 9113, 3.4)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (so it shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": log.isEnabledFor(logging.DEBUG), "configure_logging": False}
    try:
        if address not in (None, "", "local"):
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TlpipeError(f"cannot start or join Ray ({address or 'local'}): {text}") from None
    return True


def decode_shard(batch: dict[str, np.ndarray], size: int, batch_size: int) -> dict[str, np.ndarray]:
    """CPU task: decode the items of whole shards into the batches the writer consumes."""
    from pipeline.stage1.extract import decode_batch, iter_chunks

    out = []
    for blob in batch["items"]:
        t0 = time.perf_counter()
        work = pickle.loads(blob)
        source = _ListedItems(work["items"])
        segments = [(s, start, stop) for s, (start, stop) in work["ranges"].items() if stop > start]
        decoded = [(split, index, *decode_batch(chunk, size))
                   for split, index, chunk in iter_chunks(source, segments, batch_size)]
        out.append(pickle.dumps({**{k: v for k, v in work.items() if k != "items"}, "batches": decoded,
                                 "decode_seconds": time.perf_counter() - t0}, protocol=5))
    return {"shard": batch["shard"], "decoded": np.asarray(out, dtype=object)}


class _ListedItems:
    """The items of one shard, looked up as ``Source.iter_items(split, start)`` does."""

    def __init__(self, items: dict[str, tuple[int, list]]):
        self._items = items

    def iter_items(self, split: str, start: int = 0):
        first, items = self._items[split]
        yield from items[start - first:]


class ShardWriter:
    """Ray actor: holds the runtime (built once) and writes whole shard files."""

    def __init__(self, spec, attrs: dict[str, Any], folder: str):
        from pipeline.stage1.extract import build_runtime

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.rt = build_runtime(spec)
        self.rt.forward.warmup()
        self.attrs = {**attrs, **self.rt.attrs()}
        self.folder = Path(folder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        works = [pickle.loads(blob) for blob in batch["decoded"]]
        done = [self._write(work) for work in works]
        return {"shard": batch["shard"], "images": np.asarray([d[0] for d in done], dtype=np.int64),
                "seconds": np.asarray([d[1] for d in done], dtype=np.float64),
                "decode_seconds": np.asarray([w["decode_seconds"] for w in works], dtype=np.float64)}

    def _write(self, work: dict[str, Any]) -> tuple[int, float]:
        import h5py

        from pipeline.stage1.extract import _State, result_attrs, write_batches

        final = self.folder / work["name"]
        tmp = self.folder / f".{work['name']}.partial-{os.getpid()}"
        state = _State(fingerprint=self.attrs["fingerprint"], batch_size=int(self.attrs["batch_size"]))
        t0 = time.perf_counter()
        try:
            with h5py.File(tmp, "w") as h5:
                def checkpoint(*_args) -> None:
                    _fault("actor")  # the tests kill one actor here, mid-shard
                write_batches(h5, iter(work["batches"]), self.rt, state, checkpoint)
                seconds = time.perf_counter() - t0
                counts = {s: int(h5[s]["features"].shape[0]) for s in work["ranges"] if s in h5}
                attrs = {**self.attrs, "shard_index": work["index"], "shard_count": work["count"],
                         "shard_ranges": json.dumps(work["ranges"]),
                         **result_attrs(counts, state.skipped, seconds, {"seconds": round(seconds, 3)})}
                for key, value in attrs.items():
                    h5.attrs[key] = value
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return sum(stop - start for start, stop in work["ranges"].values()), seconds


def extract_ray(cfg, job) -> Path:
    """Stage one on Ray; returns the features file (the same one the local engine writes)."""
    from pipeline.stage1.extract import build_runtime, hidden_sibling, prepare, runtime_spec, static_attrs
    from pipeline.store.shards import finished_shards, merge_shards, partition, shard_name
    from pipeline.core.util import atomic_write_text, progress_bar
    from pipeline.nets.weights import known_weights

    from pipeline.stage1.runtime import resolve

    out, source = job.out, job.source
    # The driver decides the runtime and precision (they are part of the fingerprint); the actors build
    # exactly that one (auto: Keras for GPU actors, else as on this machine; a conversion failure in an
    # actor is then an error naming --runtime keras, not a silent fallback).
    planned = resolve(cfg.runtime, cfg.precision, cfg.mixed_precision,
                      **({"accelerator": "gpu"} if cfg.gpus_per_worker > 0 else {}))
    spec = runtime_spec(cfg, job, *planned)
    known = known_weights(job.backbone, job.weights)
    if known is None:  # ImageNet weights not cached yet: fetch them here, once, to learn their identity
        rt = build_runtime(spec)
        known = (rt.winfo.kind, rt.winfo.sha256)
    fingerprint = prepare(cfg, job, known, planned)
    if fingerprint is None:
        return out

    counts = {s: source.counts[s] for s in source.splits}
    total = sum(counts.values())
    workers = max(1, cfg.workers or 1)
    n = max(workers, math.ceil(total / max(1, cfg.shard_size)))
    ranges = partition(counts, n)
    folder = hidden_sibling(out, ".shards")
    folder.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    done = finished_shards(folder, fingerprint, n) if cfg.resume else {}
    for p in folder.iterdir():  # partial files, and shards of other settings or another shard count
        if p not in done.values():
            p.unlink(missing_ok=True)
    pending = [i for i in range(n) if i not in done]
    if done:
        log.info("resuming %s: %d of %d shards already done", out, len(done), n)

    t0 = time.perf_counter()
    busy = decode = 0.0
    if pending:
        busy, decode = _run(cfg, spec, pending, ranges, n, stem, folder, source,
                            static_attrs(cfg, job, fingerprint), progress_bar, total, done)
    wall = time.perf_counter() - t0
    files = [folder / shard_name(stem, i, n) for i in range(n)]
    rows_done = sum(hi - lo for i in pending for lo, hi in ranges[i].values())
    timing = {"engine": "ray", "seconds": round(wall, 3), "workers": workers, "shards": n,
              "shards_reused": len(done), "gpus_per_worker": cfg.gpus_per_worker,
              "actor_seconds": round(busy, 3),  # summed over actors: forward + write of their shards
              "decode_seconds": round(decode, 3)}  # summed over decode tasks
    overrides = {"timing": timing, "extract_seconds": round(wall, 3),
                 "images_per_second": round(rows_done / wall, 2) if wall > 0 and rows_done else 0.0}
    partial = hidden_sibling(out, ".partial")
    partial.unlink(missing_ok=True)
    merge_shards(files, partial, copy=True, overrides=overrides)
    from pipeline.store.features import read_attrs

    skipped = read_attrs(partial).get("skipped") or []
    atomic_write_text(out.with_name(out.stem + ".skipped.json"), json.dumps(skipped, indent=1) + "\n")
    os.replace(partial, out)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("wrote %s with the ray engine: %d shards (%d reused), %.1f s", out, n, len(done), wall)
    return out


def _run(cfg, spec, pending, ranges, n, stem, folder, source, attrs, progress_bar, total, done) -> tuple[float, float]:
    """Run the Ray Data pipeline over the pending shards (the driver only lists and watches);
    return the actors' busy seconds (forward + write) and the decode tasks' seconds, summed."""
    import ray
    import ray.data

    from pipeline.store.shards import shard_name

    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's own progress lines stay off stderr (-vv shows them)
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    started = _init_ray(cfg.ray_address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        rows = []
        for i in pending:
            items = {}
            for split, (start, stop) in ranges[i].items():
                if stop > start:
                    from itertools import islice

                    items[split] = (start, list(islice(source.iter_items(split, start), stop - start)))
            work = {"index": i, "count": n, "name": shard_name(stem, i, n),
                    "ranges": {s: list(r) for s, r in ranges[i].items()}, "items": items}
            rows.append({"shard": i, "items": pickle.dumps(work, protocol=5)})
        workers = max(1, cfg.workers or 1)
        gpus = float(cfg.gpus_per_worker or 0)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        # on CPUs, leave at least one CPU to the decode tasks (else the pipeline cannot progress)
        actor_cpus = 1.0 if gpus > 0 else max(0.01, min(1.0, (cpus - 1) / workers))
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(decode_shard, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"size": spec.size, "batch_size": spec.batch_size})
        with warnings.catch_warnings():
            # bounded retries (Ray Data's default, -1, would restart an actor that dies on every shard
            # forever); Ray 2.60 has no named parameter for them yet and warns about ray_remote_args
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(ShardWriter, batch_size=1, batch_format="numpy", concurrency=workers,
                                num_gpus=gpus, num_cpus=actor_cpus if gpus == 0 else 1.0,
                                fn_constructor_kwargs={"spec": spec, "attrs": attrs, "folder": str(folder)},
                                max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        bar = progress_bar(total=total, initial=sum(hi - lo for i in done for lo, hi in ranges[i].values()),
                           desc=f"extract {spec.base} (ray, {workers} workers)", enabled=cfg.progress)
        busy = decode = 0.0
        try:
            for row in ds.iter_rows():
                bar.update(int(row["images"]))
                busy += float(row["seconds"])
                decode += float(row["decode_seconds"])
                _fault("driver")  # the tests kill the driver here, after its first finished shard
        except Exception as exc:  # noqa: BLE001 - a failed task/actor is one line
            cause = getattr(exc, "cause", None) or exc
            text = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
            if isinstance(cause, TlpipeError):
                raise type(cause)(str(cause)) from None
            raise TlpipeError(f"ray engine failed: {type(cause).__name__}: {text[:300]}") from None
        finally:
            bar.close()
        return busy, decode
    finally:
        if started:
            ray.shutdown()
