"""Stage one's runner: one partition (item ranges) -> reader -> runtime -> sink, timing each step.

Every distributor (local, ``--shard I/N``, Ray actors) calls a ``Runner`` on its partitions; the
runner knows nothing of where it runs.  The runtime is built once by the caller and warmed up on the
first partition while the reader already decodes its first batches.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.stage1.reader import (BatchReader, Items, Segment, decode_nice, default_decode_threads,
                                    lower_thread_priority)
from pipeline.stage1.sink import OnBatch, State, write_batches
from pipeline.store.writer import FeaturesWriter


class Runner:
    """Turns partitions into rows with one runtime (a ``pipeline.stage1.runtime.Runtime``).

    ``decode_threads`` 0: ``default_decode_threads`` for the runtime; ``prefetch`` 0: 2 per thread + 2;
    ``nice`` None: ``decode_nice``'s choice."""

    def __init__(self, rt: Any, size: int, batch_size: int, decode_threads: int = 0, prefetch: int = 0,
                 nice: int | None = None):
        self.rt = rt
        self.size = size
        self.batch_size = batch_size
        self.threads = decode_threads or default_decode_threads(rt.name)
        self.prefetch = prefetch or 2 * self.threads + 2
        self.nice = decode_nice(nice, rt.name)
        self._warm = False

    def __call__(self, items: Items, segments: list[Segment], writer: FeaturesWriter, state: State,
                 on_batch: OnBatch | None = None) -> tuple[dict[str, Any], int]:
        """Decode, run and append ``segments`` of ``items`` to ``writer``, recording progress in ``state``;
        return (timing, inputs consumed).  Timing: the extraction loop after compiling (``seconds``),
        and where it went in this thread: ``forward``, ``decode_wait`` (waiting for the reader), ``write``."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode", initializer=lower_thread_priority,
                                initargs=(self.nice,)) as pool:
            # decoding starts before the forward pass is compiled, so the first batches are ready when
            # it is; one reader spans every split (no refill bubble between splits)
            reader = BatchReader(items, segments, self.batch_size, self.size, pool, self.prefetch)
            if not self._warm:
                self.rt.warmup()
                self._warm = True
            t0 = time.perf_counter()
            t_forward, t_write, images = write_batches(writer, reader, self.rt, state, on_batch)
            seconds = time.perf_counter() - t0
        timing = {"seconds": round(seconds, 3), "forward": round(t_forward, 3),
                  "decode_wait": round(reader.wait_seconds, 3), "write": round(t_write, 3),
                  "decode_threads": self.threads, "prefetch": self.prefetch, "decode_nice": self.nice}
        return timing, images
