"""Fault injection: SIGKILL an extraction at random points, resume, compare bit for bit.

One uninterrupted run (in this process) is the reference.  A second run of the same
settings is started in a subprocess and killed (SIGKILL) several times: once as soon as
its partial file appears (before or around the first checkpoint), then at seeded random
delays after a fresh checkpoint was written.  Every restart must resume from the last
checkpoint; the final file must hold exactly the reference datasets, and nothing may ever
sit at the final path while a run is unfinished.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_same_datasets, extract_cmd, make_folder, read_datasets, subprocess_env

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("TLPIPE_TEST_KILL_SEED", "20240611"))
SETTINGS = dict(base="mobilenet_0.25", weights="none", input_size=32, batch_size=2, progress=False,
                decode_threads=2)


def _ckpt_state(ckpt: Path) -> tuple[int, int]:
    """(inputs done, rows written) recorded in a checkpoint; (0, 0) if absent."""
    if not ckpt.exists():
        return 0, 0
    data = json.loads(ckpt.read_text())
    return sum(data["next_index"].values()), sum(data["rows"].values())


def _stat_id(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _wait(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``pred`` until true; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(0.005)
    raise AssertionError("extraction subprocess made no progress in time")


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, caplog):
    from pipeline.stage1.extract import ExtractConfig, extract

    data = make_folder(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=140)
    # A few undecodable files: the skipped list must survive the kills too.
    (data / "ant" / "ant_0050_bad.jpg").write_text("not an image")
    (data / "bee" / "bee_0100_empty.png").write_bytes(b"")
    (data / "cow" / "cow_0007_trunc.png").write_bytes((data / "cow" / "cow_0007.png").read_bytes()[:60])
    ref = extract(ExtractConfig(data=str(data), out=tmp_path / "ref" / "f.h5", **SETTINGS))
    ref_data = read_datasets(ref)
    assert sum(len(v) for k, v in ref_data.items() if k.endswith("/labels")) == 420
    ref_skipped = json.loads((tmp_path / "ref" / "f.skipped.json").read_text())
    assert len(ref_skipped) == 3

    out = tmp_path / "run" / "f.h5"
    partial = out.with_name(".f.h5.partial")
    ckpt = out.with_name(".f.h5.progress.json")
    cfg = dict(data=str(data), out=str(out), **SETTINGS)
    rng = random.Random(SEED)
    history = []  # (kill point, inputs done after the kill, resumed?)
    for attempt in range(4):
        before = _stat_id(ckpt)
        done_before, _ = _ckpt_state(ckpt)
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(extract_cmd(**cfg), env=subprocess_env(), stdout=subprocess.DEVNULL,
                                    stderr=err)
            try:
                if attempt == 0:
                    # As soon as the partial file exists: before (or just at) the first checkpoint.
                    alive = _wait(partial.exists, proc)
                    point = "partial file appeared"
                else:
                    # a random amount of progress past the last kill (not a wall-clock delay, which a
                    # fast or idle machine can outrun to the end), then a short random delay
                    target = min(400, done_before + rng.randint(8, 90))
                    alive = _wait(lambda: _stat_id(ckpt) not in (None, before)
                                  and _ckpt_state(ckpt)[0] >= target, proc)
                    delay = rng.uniform(0.0, 0.03)
                    time.sleep(delay)
                    point = f"{delay:.2f}s after {target} inputs"
                still_running = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert alive and still_running, f"attempt {attempt} finished before the kill:\n{text[-2000:]}"
        assert proc.returncode == -signal.SIGKILL
        # Killed: never anything at the final path; the partial is the hidden sibling.
        assert not out.exists(), "a partial file sits at the final output path"
        assert not out.with_name("f.skipped.json").exists()
        done_after, rows_after = _ckpt_state(ckpt)
        if attempt and done_before:
            assert "resuming" in text, f"attempt {attempt} did not resume:\n{text[-2000:]}"
            assert done_after >= done_before
        if ckpt.exists():
            with h5py.File(partial, "r") as h5:  # the partial holds at least the checkpointed rows
                have = sum(h5[s]["features"].shape[0] for s in ("train", "val", "test") if s in h5)
            assert have >= rows_after
        history.append((point, done_after, attempt and done_before and "resuming" in text))
    done, _ = _ckpt_state(ckpt)
    assert 0 < done < 423, history  # killed part-way, with progress to resume from
    assert len({h[1] for h in history}) >= 3, history  # the kills landed at different points

    # Keep the killed state for the --no-resume check below.
    saved = tmp_path / "saved"
    saved.mkdir()
    for p in (partial, ckpt):
        shutil.copy2(p, saved / p.name)

    caplog.set_level(logging.INFO, logger="pipeline")
    caplog.clear()
    final = extract(ExtractConfig(**{**cfg, "out": out}))
    assert final == out
    assert f"{done} inputs already done" in caplog.text
    assert_same_datasets(ref, out)
    assert not partial.exists() and not ckpt.exists()
    assert json.loads(out.with_name("f.skipped.json").read_text()) == ref_skipped
    with h5py.File(out, "r") as h5, h5py.File(ref, "r") as h5ref:
        for key in ("fingerprint", "counts", "class_names", "skipped"):
            assert h5.attrs[key] == h5ref.attrs[key], key

    # --no-resume starts over: tamper with the saved partial; resume=False must ignore it.
    out.unlink()
    for name in (partial.name, ckpt.name):
        shutil.copy2(saved / name, out.parent / name)
    with h5py.File(partial, "a") as h5:
        split = next(s for s in ("train", "val", "test") if s in h5 and h5[s]["features"].shape[0])
        h5[split]["features"][0] = np.full(h5[split]["features"].shape[1], 1e6, dtype=np.float32)
    caplog.clear()
    extract(ExtractConfig(**{**cfg, "out": out, "resume": False}))
    assert "already done" not in caplog.text
    assert_same_datasets(ref, out)
    print("kill points:", history)


# ----------------------------------------------------------------------------- in-process crashes


class Crash(Exception):
    """Stands in for a crash right after a checkpoint was written."""


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory):
    from pipeline.stage1.extract import ExtractConfig, extract

    tmp = tmp_path_factory.mktemp("resume_small")
    data = make_folder(tmp / "data", classes=("ant", "bee"), per_class=20)
    (data / "bee" / "bee_bad.jpg").write_text("not an image")
    ref = extract(ExtractConfig(data=str(data), out=tmp / "ref.h5", **{**SETTINGS, "batch_size": 4}))
    return data, ref


def _crash_after(monkeypatch, saves: int) -> None:
    import pipeline.stage1.local as ex

    original = ex.save_state
    count = {"n": 0}

    def save(*args, **kwargs):
        original(*args, **kwargs)
        count["n"] += 1
        if count["n"] >= saves:
            raise Crash

    monkeypatch.setattr(ex, "save_state", save)


def _crashed_run(monkeypatch, data, out, saves=3, **kw):
    from pipeline.stage1.extract import ExtractConfig, extract

    with monkeypatch.context() as m:
        _crash_after(m, saves)
        with pytest.raises(Crash):
            extract(ExtractConfig(data=str(data), out=out, **{**SETTINGS, "batch_size": 4, **kw}))
    assert not out.exists()
    ckpt = out.with_name(f".{out.name}.progress.json")
    assert _ckpt_state(ckpt)[0] == 4 * saves
    return ckpt, out.with_name(f".{out.name}.partial")


def _finish(data, out, caplog, **kw) -> str:
    from pipeline.stage1.extract import ExtractConfig, extract

    caplog.set_level(logging.INFO, logger="pipeline")
    caplog.clear()
    assert extract(ExtractConfig(data=str(data), out=out, **{**SETTINGS, "batch_size": 4, **kw})) == out
    return caplog.text


def test_crash_then_resume_in_process(small_ref, tmp_path, monkeypatch, caplog):
    data, ref = small_ref
    out = tmp_path / "f.h5"
    ckpt, partial = _crashed_run(monkeypatch, data, out)
    assert "resuming" in _finish(data, out, caplog) and "12 inputs already done" in caplog.text
    assert_same_datasets(ref, out)
    assert read_datasets(out).keys() == read_datasets(ref).keys()
    assert json.loads(out.with_name("f.skipped.json").read_text()) == json.loads(
        ref.with_name("ref.skipped.json").read_text())
    assert not ckpt.exists() and not partial.exists()


@pytest.mark.parametrize("spoil, message", [
    ("batch_size", "other settings; starting over"),
    ("garbage checkpoint", "unreadable checkpoint"),
    ("truncated partial", "unusable"),
    ("checkpoint ahead", "unusable"),
    ("no partial", None),
])
def test_unusable_checkpoints_start_over(small_ref, tmp_path, monkeypatch, caplog, spoil, message):
    data, ref = small_ref
    out = tmp_path / "f.h5"
    ckpt, partial = _crashed_run(monkeypatch, data, out)
    kw = {}
    if spoil == "batch_size":
        kw["batch_size"] = 5
    elif spoil == "garbage checkpoint":
        ckpt.write_text("{not json")
    elif spoil == "truncated partial":
        partial.write_bytes(partial.read_bytes()[:1000])
    elif spoil == "checkpoint ahead":
        state = json.loads(ckpt.read_text())
        state["rows"] = {k: v + 100 for k, v in state["rows"].items()}
        ckpt.write_text(json.dumps(state))
    elif spoil == "no partial":
        partial.unlink()
    text = _finish(data, out, caplog, **kw)
    assert "already done" not in text
    if message:
        assert message in text
    assert_same_datasets(ref, out)
    assert not ckpt.exists() and not partial.exists()


def test_changed_settings_do_not_resume_a_checkpoint(small_ref, tmp_path, monkeypatch, caplog):
    from pipeline.stage1.extract import ExtractConfig, extract

    data, _ = small_ref
    out = tmp_path / "f.h5"
    _crashed_run(monkeypatch, data, out, input_size=48)
    text = _finish(data, out, caplog)  # input size 32 now
    assert "already done" not in text and "other settings" in text
    fresh = extract(ExtractConfig(data=str(data), out=tmp_path / "fresh.h5", **{**SETTINGS, "batch_size": 4}))
    assert_same_datasets(fresh, out)


def test_an_up_to_date_run_names_an_unfinished_extraction_left_beside_it(small_ref, tmp_path, caplog):
    """A --force run with other settings interrupted, then the same settings as the file: up to date,
    and the unfinished file is named (kept for a rerun of those settings), not left silently."""
    data, ref = small_ref
    out = tmp_path / "f.h5"
    _finish(data, out, caplog)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(b"\0" * 2_000_000)  # what an interrupted run with other settings leaves
    text = _finish(data, out, caplog)
    assert "is up to date" in text and f"unfinished extraction with other settings is kept at {partial}" in text
    assert "(2.0 MB)" in text and partial.exists()


# ----------------------------------------------------------------------------- a writer killed mid-flush

KILLED = Path(__file__).parent / "golden" / "killed_mid_flush.h5.gz"  # made by tools/make_killed_partial.py


def _killed_partial(tmp_path: Path) -> tuple[Path, int]:
    import gzip

    path = tmp_path / ".f.h5.partial"
    with gzip.open(KILLED, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path, json.loads(KILLED.with_suffix(".json").read_text())["rows"]


def _append_some(path: Path, rows: int, batches: int = 40) -> None:
    from pipeline.store.writer import FeaturesWriter

    with FeaturesWriter(path, "a") as w:
        w.open_split("train", 4, rows)
        for i in range(batches):
            w.append(np.full((2, 4), i, np.float32), np.ones(2, np.int64), [f"new/{i}a", f"new/{i}b"])
            w.flush()


def test_a_partial_file_killed_mid_flush_is_salvaged_not_appended_to(tmp_path):
    """A real file left by a SIGKILL during a flush (CI met one): appending in place fails with
    "bad heap index"; salvage copies the checkpointed rows into a fresh file that takes appends."""
    from pipeline.store.writer import salvage

    path, rows = _killed_partial(tmp_path)
    with pytest.raises(OSError, match="heap"):  # the damage the fixture carries, in place
        _append_some(path, rows)
    path, rows = _killed_partial(tmp_path)
    salvage(path, {"train": rows})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no salvage file left beside it
    _append_some(path, rows)
    with h5py.File(path, "r") as h5:
        ids = list(h5["train/ids"].asstr()[:])
        feats = h5["train/features"][:]
    assert ids[:rows] == [f"c/{k:05d}.png" for k in range(rows)]
    assert ids[rows:] == [f"new/{i}{s}" for i in range(40) for s in "ab"]
    assert not feats[:rows].any() and (feats[rows:, 0] == np.repeat(np.arange(40), 2)).all()


def test_salvage_refuses_a_file_shorter_than_its_checkpoint_and_leaves_it(tmp_path):
    from pipeline.store.writer import salvage

    path, rows = _killed_partial(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="fewer rows than the checkpoint"):
        salvage(path, {"train": rows, "val": 3})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
