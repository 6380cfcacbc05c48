"""Stage one's sink: the runtime's features appended to a features file, batch by batch, in order.

``write_batches`` pairs each output of the runtime with its batch (an asynchronous runtime hands
back batch i after it has started batch i+1), appends the rows through
``pipeline.store.writer.FeaturesWriter`` and, after each batch, records the progress in a ``State``:
a local run saves it as a JSON checkpoint beside its partial file and resumes from it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pipeline.core.util import atomic_write_text
from pipeline.store.writer import FeaturesWriter, salvage

log = logging.getLogger(__name__)

OnBatch = Callable[[str, int, int, int, float], None]  # (split, next_index, rows, inputs, seconds)


@dataclass
class State:
    """Progress of a run (stored as JSON beside a partial file: the checkpoint)."""

    fingerprint: str
    batch_size: int
    next_index: dict[str, int] = field(default_factory=dict)  # next item index per split
    rows: dict[str, int] = field(default_factory=dict)  # rows written per split
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # extraction time of earlier attempts


def save_state(path: Path, state: State, seconds_this_run: float) -> None:
    """Write the checkpoint (atomically)."""
    data = asdict(state)
    data["seconds"] = state.seconds + seconds_this_run
    atomic_write_text(path, json.dumps(data))


def load_state(ckpt: Path, partial: Path, fingerprint: str, batch_size: int) -> State | None:
    """A checkpoint to resume from, or None (absent, other settings, or unreadable)."""
    if not (ckpt.exists() and partial.exists()):
        return None
    try:
        state = State(**json.loads(ckpt.read_text()))
    except Exception as exc:
        log.warning("ignoring unreadable checkpoint %s (%s); starting over", ckpt, exc)
        return None
    if state.fingerprint != fingerprint or state.batch_size != batch_size:
        log.warning("checkpoint %s was made with other settings; starting over", ckpt)
        return None
    try:
        salvage(partial, state.rows)  # only the checkpointed rows, in a fresh file
    except Exception as exc:
        log.warning("partial file %s is unusable (%s); starting over", partial, exc)
        return None
    return state


class _Sink:
    """Appends one batch's rows (or only its skipped inputs) and records the progress."""

    def __init__(self, writer: FeaturesWriter, dim: int, state: State, on_batch: OnBatch | None):
        self.writer, self.dim, self.state, self.on_batch = writer, dim, state, on_batch
        self.current: str | None = None
        self.rows = 0
        self.t_write = 0.0
        self.images = 0
        self.t0 = time.perf_counter()

    def __call__(self, item: tuple, feats: np.ndarray | None) -> None:
        split, index, _, ids, labels, skipped = item
        state = self.state
        if split != self.current:
            self.current = split
            self.rows = state.rows.get(split, 0)
            self.writer.open_split(split, self.dim, self.rows)
        if feats is not None:
            t = time.perf_counter()
            self.writer.append(feats, np.asarray(labels, dtype=np.int64), ids)
            self.t_write += time.perf_counter() - t
            self.rows += len(ids)
        state.skipped.extend({"split": split, "id": i, "reason": r} for i, r in skipped)
        for i, r in skipped:
            log.warning("skipped %s: %s", i, r)
        self.writer.flush()
        state.next_index[split] = index
        state.rows[split] = self.rows
        self.images += len(ids) + len(skipped)
        if self.on_batch is not None:
            self.on_batch(split, index, self.rows, len(ids) + len(skipped), time.perf_counter() - self.t0)


def write_batches(writer: FeaturesWriter, batches: Iterable[tuple], rt: Any, state: State,
                  on_batch: OnBatch | None = None) -> tuple[float, float, int]:
    """Run ``rt`` (a ``pipeline.stage1.runtime.Runtime``) on decoded ``batches`` and append them to
    ``writer``; after each batch, flush and call ``on_batch(split, next_index, rows, n, seconds)``.

    Batches go through ``rt.map``: a runtime that runs asynchronously (OpenVINO) starts the next
    batch before this one is written, so the model is never idle while the writer works.
    Returns (seconds waiting for the model, write seconds, inputs consumed)."""
    sink = _Sink(writer, int(rt.feature_size), state, on_batch)
    waiting: deque = deque()  # batches pulled from the reader, not yet written (in order)
    pulled = [0.0]  # seconds spent pulling from the reader (not the model's)

    def feed():  # the model's input: the batches with at least one decoded image
        it = iter(batches)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            pulled[0] += time.perf_counter() - t
            if item is None:
                return
            waiting.append(item)
            if len(item[3]):
                yield item[2][: len(item[3])]

    outputs = rt.map(feed())
    t_model = 0.0
    try:
        while True:
            t, before = time.perf_counter(), pulled[0]
            feats = next(outputs, None)
            t_model += (time.perf_counter() - t) - (pulled[0] - before)
            if feats is None:
                break
            item = waiting.popleft()
            while not len(item[3]):  # batches where every input was skipped, in their place
                sink(item, None)
                item = waiting.popleft()
            sink(item, feats)
        while waiting:
            sink(waiting.popleft(), None)
    finally:
        outputs.close()
    return t_model, sink.t_write, sink.images
