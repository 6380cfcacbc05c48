"""Concurrency: one writer per output (the second refuses at once), readers never blocked."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import assert_same_datasets, extract_cmd, make_folder, subprocess_env
from pipeline.core.errors import LockedError

SETTINGS = dict(base="mobilenet_0.25", weights="none", input_size=32, progress=False)


def _extract(**kw) -> Path:
    from pipeline.stage1.extract import ExtractConfig, extract

    return extract(ExtractConfig(**{**SETTINGS, **kw}))


def test_held_lock_refuses_without_touching_anything(tmp_path):
    from filelock import FileLock

    data = make_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out" / "f.h5"
    out.parent.mkdir()
    (out.parent / ".f.h5.partial").write_bytes(b"someone else's partial")
    (out.parent / ".f.h5.progress.json").write_text("{}")
    lock = FileLock(str(out.parent / ".f.h5.lock"))
    with lock:
        for extra in ({}, {"force": True}, {"resume": False}):
            t0 = time.perf_counter()
            with pytest.raises(LockedError, match=r"another tlpipe extract is writing .*f\.h5"):
                _extract(data=str(data), out=out, batch_size=4, **extra)
            assert time.perf_counter() - t0 < 5
    # The other writer's files were left alone, and nothing appeared at the output.
    assert (out.parent / ".f.h5.partial").read_bytes() == b"someone else's partial"
    assert (out.parent / ".f.h5.progress.json").read_text() == "{}"
    assert not out.exists()
    # Once released, the output can be written (the stale partial is not resumed: no valid checkpoint).
    assert _extract(data=str(data), out=out, batch_size=4) == out


def test_second_writer_refused_while_first_runs_and_readers_are_not_blocked(tmp_path):
    from pipeline.store.features import load_features, read_attrs, staleness

    data = make_folder(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=100)
    small = make_folder(tmp_path / "small", per_class=6)
    finished = _extract(data=str(small), out=tmp_path / "out" / "finished.h5", batch_size=4)

    out = tmp_path / "out" / "busy.h5"
    ckpt = out.with_name(".busy.h5.progress.json")
    log = tmp_path / "first.log"
    cfg = dict(data=str(data), out=str(out), batch_size=1, decode_threads=1, **SETTINGS)
    with open(log, "w") as err:
        proc = subprocess.Popen(extract_cmd(**cfg), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "first extraction never checkpointed"
            time.sleep(0.01)

        # Second writer of the same output: refused at once (before building any model).
        t0 = time.perf_counter()
        with pytest.raises(LockedError, match="another tlpipe extract is writing"):
            _extract(data=str(data), out=out, batch_size=1)
        refused_after = time.perf_counter() - t0
        assert refused_after < 5
        assert proc.poll() is None, "the first extraction ended before the second was refused"

        # Readers of another features file are not blocked by the running writer.
        fs = load_features(finished)
        assert sum(len(s.y) for s in fs.splits.values()) == 12
        assert read_attrs(finished)["counts"]
        assert staleness(finished) == (False, "inputs unchanged")
        with h5py.File(finished, "r") as h5:
            assert h5["train/features"].shape[0] > 0
        # ... nor is another writer of another output in the same folder.
        other = _extract(data=str(small), out=tmp_path / "out" / "other.h5", batch_size=4)
        assert_same_datasets(finished, other)
        still_running = proc.poll() is None
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, log.read_text()[-3000:]
    assert still_running, "first extraction finished before the concurrent reads (make it longer)"
    # The first run was not disturbed: complete, valid, no leftovers.
    fs = load_features(out)
    assert sum(len(s.y) for s in fs.splits.values()) == 300
    assert json.loads(out.with_name("busy.skipped.json").read_text()) == []
    assert not ckpt.exists() and not out.with_name(".busy.h5.partial").exists()
    # And a later run with the same settings finds it up to date.
    before = out.stat().st_mtime_ns
    assert _extract(data=str(data), out=out, batch_size=1) == out
    assert out.stat().st_mtime_ns == before
