"""The local distributor: this process runs the plan's whole range (or its ``--shard I/N`` range) through
one ``Runner``, into a hidden partial file with a JSON checkpoint after each batch, so a killed run
resumes from its last completed batch.  On completion the file gets its attributes and is renamed
to the final path (a shard file is joined with the others by ``tlpipe merge``)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.util import atomic_write_text, progress_bar
from pipeline.stage1.plan import Plan
from pipeline.stage1.runner import Runner
from pipeline.stage1.runtime import build
from pipeline.stage1.sink import State, load_state, save_state
from pipeline.store import schema
from pipeline.store.writer import FeaturesWriter, hidden_sibling

log = logging.getLogger(__name__)


class NothingExtracted(DataError):
    """Every input of the run was skipped."""


def settle(p: Plan) -> tuple[str | None, Any]:
    """(fingerprint, built runtime), or (None, None) when the output is up to date.  The runtime is
    built only when there is work: an up-to-date check does not even import TensorFlow."""
    known = p.weights_id
    fingerprint = p.prepare(known, p.runtime_id) if known is not None else None
    if known is not None and fingerprint is None:
        return None, None
    rt = build(p.spec())
    built = ((rt.weights.kind, rt.weights.sha256), (rt.name, rt.precision))
    if built != (known, p.runtime_id):
        # ImageNet weights: known only now; or auto fell back to keras (OpenVINO could not convert the base)
        fingerprint = p.prepare(*built)
    return fingerprint, (rt if fingerprint is not None else None)


def start_or_resume(p: Plan, partial: Path, ckpt: Path, fingerprint: str) -> State:
    """The checkpointed progress of an interrupted run with these settings, or a fresh start."""
    state = load_state(ckpt, partial, fingerprint, p.cfg.batch_size) if p.cfg.resume else None
    if state is None:
        for path in (partial, ckpt):
            path.unlink(missing_ok=True)
        return State(fingerprint=fingerprint, batch_size=p.cfg.batch_size)
    log.info("resuming %s: %d inputs already done", p.out, sum(state.next_index.values()))
    return state


def extract_local(p: Plan) -> Path:
    """Run the plan in this process; return the features (or shard) file."""
    fingerprint, rt = settle(p)
    if fingerprint is None:
        return p.out
    partial, ckpt = hidden_sibling(p.out, ".partial"), hidden_sibling(p.out, ".progress.json")
    state = start_or_resume(p, partial, ckpt, fingerprint)
    segments = [(s, state.next_index.get(s, start), stop) for s, (start, stop) in p.ranges.items()
                if state.next_index.get(s, start) < stop]
    total = sum(stop - start for start, stop in p.ranges.values())
    bar = progress_bar(total=total, initial=total - sum(b - a for _, a, b in segments),
                       desc=f"extract {p.backbone.name}", enabled=p.cfg.progress)

    def on_batch(split: str, index: int, rows: int, n: int, seconds: float) -> None:
        save_state(ckpt, state, seconds)
        bar.set_postfix_str(split, refresh=False)
        bar.update(n)

    runner = Runner(rt, p.size, p.cfg.batch_size, p.cfg.decode_threads, p.cfg.prefetch, p.cfg.decode_nice)
    t0 = time.perf_counter()
    try:
        with FeaturesWriter(partial, "a") as writer:
            timing, images = runner(p.source, segments, writer, state, on_batch)
            counts = writer.counts(p.source.splits)
            _check_rows(p, counts, state)
            writer.set_attrs({**p.static_attrs(fingerprint), **schema.runtime_attrs(rt),
                              **schema.shard_attrs(p.shard, p.ranges),
                              **schema.result_attrs(counts, state.skipped, state.seconds + timing["seconds"], timing)})
    except NothingExtracted:
        for path in (partial, ckpt):  # nothing to resume: leave no hidden leftovers
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    _finish(p, partial, ckpt, state)
    rate = images / (time.perf_counter() - t0) if images else 0.0
    log.info("wrote %s: %s rows, %d skipped, %.1f images/s", p.out, json.dumps(counts), len(state.skipped), rate)
    return p.out


def _check_rows(p: Plan, counts: dict[str, int], state: State) -> None:
    """Refuse a whole features file without a single row."""
    if sum(counts.values()) or p.shard is not None:
        return
    if state.skipped:
        first = state.skipped[0]
        raise NothingExtracted(f"every input was skipped ({len(state.skipped)} files could not be decoded); "
                               f"first: {first['id']}: {first['reason']}")
    raise NothingExtracted(f"no images in {p.cfg.data}")


def _finish(p: Plan, partial: Path, ckpt: Path, state: State) -> None:
    """The skipped inputs beside a whole features file; the partial file renamed into place."""
    if p.shard is None:
        skipped_path = p.out.with_name(p.out.stem + ".skipped.json")
        atomic_write_text(skipped_path, json.dumps(state.skipped, indent=1) + "\n")
    os.replace(partial, p.out)
    ckpt.unlink(missing_ok=True)
