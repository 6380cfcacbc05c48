"""Stage one's reader: the items of a partition, decoded into fixed-size uint8 batches on CPU threads.

Batch boundaries are fixed (``batch_size`` items from each segment's start, the last one short),
whatever the number of threads, so features and checkpoints are deterministic.  ``BatchReader``
decodes ahead in a thread pool (Pillow and OpenCV release the GIL), at most ``prefetch`` batches
at a time (flat memory).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Iterable, Iterator, Protocol

import numpy as np

from pipeline.data.images import DecodeError
from pipeline.data.sources import Item, decode_item
from pipeline.data.views import apply_view, parse_view_split
from pipeline.stage1 import runtime as runtimes

DECODE_NICE_CPU = 10  # decode threads yield to the forward pass when the model runs on the CPU

Segment = tuple[str, int, int]  # (split, start, stop): item indices of one split
Batch = tuple[str, int, np.ndarray, list, list, list]  # split, next index, pixels, ids, labels, skipped


class Items(Protocol):
    """Where the reader gets items: a ``pipeline.data.sources.Source``, or one partition's ``ListedItems``."""

    def iter_items(self, split: str, start: int = 0) -> Iterator[Item]: ...


class ListedItems:
    """The items of one partition, listed (file paths, never pixels), looked up as
    ``Source.iter_items(split, start)`` does."""

    def __init__(self, items: dict[str, tuple[int, list[Item]]]):
        self.items = items  # {split: (index of the first item, items)}

    @classmethod
    def of(cls, source: Items, ranges: dict[str, tuple[int, int]]) -> "ListedItems":
        return cls({s: (a, list(islice(source.iter_items(s, a), b - a))) for s, (a, b) in ranges.items() if b > a})

    def iter_items(self, split: str, start: int = 0) -> Iterator[Item]:
        first, items = self.items[split]
        yield from items[start - first:]


def default_decode_threads(runtime: str = "keras") -> int:
    """Decode threads when none are asked for.

    With the model on an accelerator, decoding is the bottleneck: one thread per core.
    With the Keras model on the CPU, the forward pass needs the cores and decoding costs ~10x
    less per image, so a quarter of the cores (at least one) keeps the model fed without
    stealing CPU from it.  With OpenVINO the forward pass is 2-6x cheaper and decoding can cost
    more than it (photos shrunk to the input size: 1.6 ms against bf16's 1.4 ms per image), so
    one thread per core; threads beyond the need wait on the prefetch bound (measured in
    benchmarks/bench_extract.py: +20% bf16 images/s on trashnet, no change on 180-px photos).
    """
    cores = os.cpu_count() or 1
    if runtime == "keras" and runtimes.detect_accelerator() is not None:
        return max(1, cores)
    if runtime == "openvino":
        return max(1, cores)
    return max(1, cores // 4)


def decode_nice(requested: int | None, runtime: str = "keras") -> int:
    """Niceness for decode threads.  With the Keras model on the CPU, decoding yields to the forward
    pass (a decode thread preempting one of TensorFlow's threads stalls the whole parallel op).
    OpenVINO keeps the next batch queued behind the running one, so decoding at normal priority
    costs it nothing and keeps it fed; with an accelerator, decoding is the bottleneck.
    (Measured in benchmarks/bench_extract.py, RESULTS.md "CPU runtime".)"""
    if requested is not None:
        return int(requested)
    return DECODE_NICE_CPU if runtime == "keras" and runtimes.detect_accelerator() is None else 0


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's niceness by ``nice`` (Linux threads are tasks; elsewhere a no-op)."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        pass


def decode_batch(items: list[Item], size: int, view: int = 0):
    """Decode a batch into one uint8 array; failed inputs are returned with their reason.
    ``view``: the augmented view to store (pipeline.data.views; 0: the image itself)."""
    batch = np.empty((len(items), size, size, 3), dtype=np.uint8)
    ids, labels, skipped = [], [], []
    for item in items:
        try:
            batch[len(ids)] = apply_view(decode_item(item, size), view)
        except DecodeError as exc:
            skipped.append((item.id, str(exc)))
            continue
        ids.append(item.id)
        labels.append(item.label)
    return batch, ids, labels, skipped


def iter_chunks(source: Items, segments: Iterable[Segment], batch_size: int):
    """``(split, next_index, items)`` for ``segments`` of ``(split, start, stop)``: ``batch_size`` items
    from each segment's start (the last batch short): fixed boundaries, deterministic features."""
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


class BatchReader:
    """Decode batches ahead in ``pool``; iterate ``(split, next_index, batch, ids, labels, skipped)``.

    Work is submitted on construction, so decoding overlaps whatever the caller does next
    (compiling the model)."""

    def __init__(self, source: Items, segments: list[Segment], batch_size: int, size: int,
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
        view = parse_view_split(split)[1]  # SPLIT_viewK: view K of SPLIT's images
        self._pending.append((split, index, self._pool.submit(decode_batch, chunk, self._size, view)))
        return True

    def __iter__(self) -> Iterator[Batch]:
        while self._pending:
            split, index, fut = self._pending.popleft()
            t = time.perf_counter()
            batch, ids, labels, skipped = fut.result()
            self.wait_seconds += time.perf_counter() - t
            self._submit()
            yield split, index, batch, ids, labels, skipped
