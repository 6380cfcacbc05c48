"""The Ray distributor: model actors run the same ``Runner`` as the local engine, one shard at a time.

    driver: plan -> shard ranges (pipeline.store.shards.partition) -> for each pending shard, when an
            actor is free: a descriptor (index, ranges and, for a folder, the shard's file paths)
    actor (``ShardWorker``, runtime built once): reader (decode threads) -> runtime -> sink, into a
            shard file written aside and renamed (a shard file exists only when complete)
    driver: merges the shards into one self-contained features file (pipeline.store.shards)

No pixels travel: actors decode their shard themselves (a tfds source is opened by each actor from
``Plan.reopen_args``).  The distributor knows nothing of the data: depths are the runtime's, and views
(``--views K``) are splits of the plan like the others (``SPLIT_viewK``), partitioned and merged alike.
The driver holds the source listing and at most two descriptors per actor, so its memory does not grow
with the images beyond that.  Finished shards are kept in ``.<out>.shards/`` until the
merge: a rerun after a crash or a killed driver extracts only the missing ones.  A lost actor is
restarted and its shards retried (``MAX_RESTARTS``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import TlpipeError
from pipeline.core.util import atomic_write_text, progress_bar
from pipeline.stage1 import cluster
from pipeline.stage1.plan import Plan, reopen_source
from pipeline.stage1.reader import Items, ListedItems
from pipeline.stage1.runner import Runner
from pipeline.stage1.runtime import RuntimeSpec, build
from pipeline.stage1.sink import State
from pipeline.store import schema
from pipeline.store.features import read_attrs
from pipeline.store.shards import finished_shards, merge_shards, partition, shard_name
from pipeline.store.writer import FeaturesWriter, hidden_sibling

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # restarts of a lost model actor, and retries of its shard
IN_FLIGHT_PER_ACTOR = 2  # shards queued on an actor: the next one starts as soon as one finishes


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class ShardWorker:
    """Ray actor: holds the runtime (built once) and writes whole shard files with a ``Runner``."""

    def __init__(self, spec: RuntimeSpec, attrs: dict[str, Any], folder: str, decode_threads: int,
                 tfds: tuple | None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        rt = build(spec)
        self.runner = Runner(rt, spec.size, spec.batch_size, decode_threads)
        self.attrs = {**attrs, **schema.runtime_attrs(rt)}
        self.folder = Path(folder)
        self.tfds = tfds  # a tfds source: what reopens it here (pipeline.stage1.plan.reopen_source), else None

    def run(self, work: dict[str, Any]) -> dict[str, float]:
        """Write shard ``work["index"]`` of ``work["count"]``; return its inputs, seconds and memory."""
        items: Items = work["items"] if work["items"] is not None else reopen_source(*self.tfds)
        ranges = {s: tuple(r) for s, r in work["ranges"].items()}
        final = self.folder / work["name"]
        tmp = self.folder / f".{work['name']}.partial-{os.getpid()}"
        state = State(fingerprint=self.attrs["fingerprint"], batch_size=int(self.attrs["batch_size"]))
        segments = [(s, a, b) for s, (a, b) in ranges.items() if b > a]
        try:
            with FeaturesWriter(tmp, "w") as writer:
                timing, _ = self.runner(items, segments, writer, state)
                counts = writer.counts(ranges)
                writer.set_attrs({**self.attrs, **schema.shard_attrs((work["index"], work["count"]), ranges),
                                  **schema.result_attrs(counts, state.skipped, timing["seconds"],
                                                        {"seconds": timing["seconds"]})})
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return {"images": sum(b - a for a, b in ranges.values()), "seconds": timing["seconds"],
                "decode_wait": timing["decode_wait"], "peak_rss_mb": peak_rss_mb()}


class ShardProgress:
    """What the driver learns from finished shards: the progress bar, busy seconds, actor memory."""

    def __init__(self, bar):
        self.bar = bar
        self.busy = self.decode_wait = self.actor_rss = 0.0

    def done(self, result: dict[str, float]) -> None:
        self.bar.update(int(result["images"]))
        self.busy += result["seconds"]
        self.decode_wait += result["decode_wait"]
        self.actor_rss = max(self.actor_rss, result["peak_rss_mb"])


def extract_ray(p: Plan) -> Path:
    """Stage one on Ray; returns the features file (the same one the local engine writes)."""
    # The driver decides the runtime and precision (they are part of the fingerprint); the actors build
    # exactly that one (a conversion failure in an actor is then an error naming --runtime keras).
    spec = p.spec(strict=True)
    known = p.weights_id
    if known is None:  # ImageNet weights not cached yet: fetch them here, once, to learn their identity
        rt = build(spec)
        known = (rt.weights.kind, rt.weights.sha256)
    fingerprint = p.prepare(known, p.runtime_id)
    if fingerprint is None:
        return p.out
    total = sum(b - a for a, b in p.ranges.values())
    actors = max(1, p.cfg.actors or 1)
    n = max(actors, math.ceil(total / max(1, p.cfg.shard_size)))
    ranges = partition({s: b for s, (_, b) in p.ranges.items()}, n)
    folder = hidden_sibling(p.out, ".shards")
    done = _reusable_shards(folder, fingerprint, n, p.cfg.resume)
    pending = [i for i in range(n) if i not in done]
    if done:
        log.info("resuming %s: %d of %d shards already done", p.out, len(done), n)
    t0 = time.perf_counter()
    bar = progress_bar(total=total, initial=sum(b - a for i in done for a, b in ranges[i].values()),
                       desc=f"extract {spec.base} (ray, {actors} actors)", enabled=p.cfg.progress)
    progress = ShardProgress(bar)
    try:
        if pending:
            _run(p, spec, [(i, ranges[i]) for i in pending], n, folder, p.static_attrs(fingerprint), progress)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    rows_done = sum(b - a for i in pending for a, b in ranges[i].values())
    timing = {"engine": "ray", "seconds": round(wall, 3), "actors": actors, "shards": n,
              "shards_reused": len(done), "gpus_per_worker": p.cfg.gpus_per_worker,
              "actor_seconds": round(progress.busy, 3),  # summed over actors: decode + forward + write
              "decode_wait": round(progress.decode_wait, 3),  # summed over actors: waiting for their reader
              "actor_peak_rss_mb": progress.actor_rss, "driver_peak_rss_mb": peak_rss_mb()}
    overrides = {"timing": timing, "extract_seconds": round(wall, 3),
                 "images_per_second": round(rows_done / wall, 2) if wall > 0 and rows_done else 0.0}
    _merge(p, [folder / shard_name(p.out.stem, i, n) for i in range(n)], overrides)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("wrote %s with the ray engine: %d shards (%d reused), %.1f s", p.out, n, len(done), wall)
    return p.out


def _reusable_shards(folder: Path, fingerprint: str, n: int, resume: bool) -> dict[int, Path]:
    """Finished shards of these settings; everything else in ``folder`` (partial files, shards of other
    settings or another shard count) is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = finished_shards(folder, fingerprint, n) if resume else {}
    for path in folder.iterdir():
        if path not in done.values():
            path.unlink(missing_ok=True)
    return done


def _merge(p: Plan, files: list[Path], overrides: dict[str, Any]) -> None:
    """The shards copied into one self-contained features file, the skipped inputs beside it."""
    partial = hidden_sibling(p.out, ".partial")
    partial.unlink(missing_ok=True)
    merge_shards(files, partial, copy=True, overrides=overrides)
    skipped = read_attrs(partial).get("skipped") or []
    atomic_write_text(p.out.with_name(p.out.stem + ".skipped.json"), json.dumps(skipped, indent=1) + "\n")
    os.replace(partial, p.out)


def shard_descriptor(p: Plan, index: int, count: int, ranges: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What an actor needs for one shard: never pixels; a folder's file paths, or nothing for tfds."""
    items = ListedItems.of(p.source, ranges) if p.source.kind == "folder" else None
    return {"index": index, "count": count, "name": shard_name(p.out.stem, index, count),
            "ranges": {s: list(r) for s, r in ranges.items()}, "items": items}


def _run(p: Plan, spec: RuntimeSpec, pending: list, n: int, folder: Path, attrs: dict, progress: ShardProgress) -> None:
    """Run the pending shards on the actors (the driver only hands out descriptors and watches)."""
    import ray

    if not log.isEnabledFor(logging.DEBUG):  # Ray's own progress lines stay off stderr (-vv shows them)
        logging.getLogger("ray").setLevel(logging.ERROR)
    started = cluster.init_ray(p.cfg.ray_address)
    try:
        workers = _start_actors(p, spec, attrs, folder, min(max(1, p.cfg.actors or 1), len(pending)))
        queue = iter(pending)
        in_flight: dict[Any, Any] = {}

        def submit(actor) -> None:
            nxt = next(queue, None)
            if nxt is not None:
                in_flight[actor.run.remote(shard_descriptor(p, nxt[0], n, nxt[1]))] = actor

        for actor in workers:
            for _ in range(IN_FLIGHT_PER_ACTOR):
                submit(actor)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ref)
            progress.done(_result(ray, ref))
            submit(actor)
    finally:
        if started:
            ray.shutdown()


def _start_actors(p: Plan, spec: RuntimeSpec, attrs: dict, folder: Path, count: int) -> list:
    import ray

    gpus = float(p.cfg.gpus_per_worker or 0)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    actor_cpus = 1.0 if gpus > 0 else max(0.01, min(1.0, cpus / count))
    tfds = p.reopen_args()
    cls = ray.remote(ShardWorker).options(num_cpus=actor_cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                          max_task_retries=MAX_RESTARTS)
    return [cls.remote(spec, attrs, str(folder), p.cfg.decode_threads, tfds) for _ in range(count)]


def _result(ray, ref) -> dict[str, float]:
    """A finished shard's result; a failed actor or task is one line."""
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, TlpipeError):
            raise type(cause)(str(cause)) from None
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise TlpipeError(f"ray engine failed: {type(cause).__name__}: {text[:300]}") from None
