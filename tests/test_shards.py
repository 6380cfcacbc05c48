"""Shards without Ray: ``extract --shard I/N`` files merge (virtual or --copy) into the local file;
``merge`` refuses missing, duplicated, foreign and truncated shards and an existing output;
bad ``--shard`` specs and an unreachable ``--ray-address`` fail in one line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_folder, read_datasets
from pipeline.cli import cli
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store.features import read_attrs
from pipeline.store.shards import parse_shard, partition

SETTINGS = dict(base="mobilenet_0.25", weights="none", input_size=32, batch_size=4, progress=False)
TIMING = {"created", "extract_seconds", "images_per_second", "timing"}


def assert_equal_files(a: Path, b: Path, atol: float = 0.0) -> None:
    """Same datasets (ids, labels exactly; features within ``atol``) and attributes, timings aside."""
    da, db = read_datasets(a), read_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype and da[name].shape == db[name].shape, name
        if da[name].dtype.kind == "f":
            assert np.abs(da[name] - db[name]).max(initial=0) <= atol, name
        else:
            assert np.array_equal(da[name], db[name]), name
    aa, ab = read_attrs(a), read_attrs(b)
    assert set(aa) == set(ab)
    assert {k for k in aa if aa[k] != ab[k]} <= TIMING


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(local file, [shard files]) from one small folder: 3 shards, some without val/test rows."""
    root = tmp_path_factory.mktemp("shards")
    data = make_folder(root / "data", per_class=12, size=(40, 30))
    (data / "dog" / "dog_0099.png").write_bytes(b"not an image")  # one skipped input
    local = extract(ExtractConfig(data=str(data), out=root / "local.h5", **SETTINGS))
    files = [extract(ExtractConfig(data=str(data), out=root / "sh" / f"part{i}.h5", shard=f"{i}/3", **SETTINGS))
             for i in range(3)]
    return root, local, files


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, code: int | None = None) -> str:
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.output)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tlpipe: error:"), r.output
    return lines[0]


def test_partition_is_contiguous_and_complete():
    parts = partition({"train": 10, "val": 3}, 4)
    assert [p["train"] for p in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [p["val"] for p in parts] == [(0, 0), (0, 0), (0, 0), (0, 3)]
    for n in (1, 2, 5, 20):  # every item of every split in exactly one shard, in order
        for split, c in {"train": 10, "val": 3}.items():
            got = [i for p in partition({"train": 10, "val": 3}, n) for i in range(*p[split])]
            assert got == list(range(c))
    assert parse_shard("2/5") == (2, 5)


@pytest.mark.parametrize("spec", ["3/2", "0/0", "2/2", "x", "-1/3"])
def test_bad_shard_spec_is_one_line(spec, tmp_path):
    r = run("extract", "--base", "mobilenet_0.25", "--data", tmp_path, "--shard", spec)
    assert "--shard" in one_line_error(r, 2)


def test_shard_files_merge_into_the_local_file(shards, tmp_path):
    root, local, files = shards
    attrs = [read_attrs(f) for f in files]
    assert [(a["shard_index"], a["shard_count"]) for a in attrs] == [(0, 3), (1, 3), (2, 3)]
    assert len({a["fingerprint"] for a in attrs}) == 1
    virtual, copy = root / "merged.h5", tmp_path / "copy.h5"
    assert run("merge", *reversed(files), "--out", virtual).exit_code == 0  # any order
    assert run("merge", *files, "--out", copy, "--copy").exit_code == 0
    assert_equal_files(local, virtual)
    assert_equal_files(local, copy)
    assert virtual.stat().st_size < local.stat().st_size / 10  # no copy of the features
    # the virtual file names its shards relative to itself: moving the folder keeps it readable
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, ignore=shutil.ignore_patterns("data"))
    assert_equal_files(local, moved / "merged.h5")
    r = run("info", moved / "merged.h5", "--no-check")
    assert r.exit_code == 0 and "mobilenet_0.25" in r.output
    out = moved / "cache" / "heads" / "merged-knn"
    r = run("fit-head", "--features", moved / "merged.h5", "--head", "knn", "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file()
    r = run("report", "--cache-dir", moved / "cache")
    assert r.exit_code == 0 and "knn" in r.output, r.output
    shutil.rmtree(moved / "sh")  # shards gone: refused in one line, never zeros
    assert "shard files are missing" in one_line_error(run("info", moved / "merged.h5", "--no-check"))


def test_merge_refusals(shards, tmp_path):
    root, local, files = shards
    out = tmp_path / "m.h5"
    line = one_line_error(run("merge", files[0], files[2], "--out", out), 2)
    assert "1 of 3 shards missing: shard 1/3" in line and files[0].name in line
    assert "given twice" in one_line_error(run("merge", files[0], files[1], files[1], files[2], "--out", out), 2)
    # a shard of other settings (max pooling): same index and count, other fingerprint
    data = root / "data"
    foreign = extract(ExtractConfig(data=str(data), out=tmp_path / "foreign.h5", shard="1/3",
                                    **{**SETTINGS, "pooling": "max"}))
    assert "different fingerprint" in one_line_error(run("merge", files[0], foreign, files[2], "--out", out), 2)
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2])
    line = one_line_error(run("merge", files[0], truncated, files[2], "--out", out))
    assert "trunc.h5" in line
    assert "not a tlpipe shard" in one_line_error(run("merge", local, "--out", out), 2)
    assert run("merge", *files, "--out", out).exit_code == 0
    assert "--force" in one_line_error(run("merge", *files, "--out", out))
    assert run("merge", *files, "--out", out, "--force", "--copy").exit_code == 0
    assert_equal_files(local, out)


def test_shard_rerun_is_up_to_date(shards):
    root, _, files = shards
    before = files[0].stat().st_mtime_ns
    extract(ExtractConfig(data=str(root / "data"), out=files[0], shard="0/3", **SETTINGS))
    assert files[0].stat().st_mtime_ns == before


def test_engine_ray_without_ray_installed_names_the_extra(tmp_path, monkeypatch):
    """Ray is an extra: without it, --engine ray is one line naming it (exit 2), before anything runs."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    data = make_folder(tmp_path / "data", per_class=4)
    r = run("extract", "--base", "mobilenet_0.25", "--weights", "none", "--data", data, "--engine", "ray",
            "--out", tmp_path / "f.h5")
    assert 'pip install "tlpipe[ray]"' in one_line_error(r, 2)
    assert not (tmp_path / "f.h5").exists()


def test_unreachable_ray_address_fails_fast(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nobody listens on
    t = time.monotonic()
    r = run("extract", "--base", "mobilenet_0.25", "--data", tmp_path, "--engine", "ray",
            "--ray-address", f"127.0.0.1:{port}")
    assert "cannot reach the Ray cluster" in one_line_error(r, 1)
    assert time.monotonic() - t < 10
    assert "--ray-address" in one_line_error(run("extract", "--base", "mobilenet_0.25", "--data", tmp_path,
                                                  "--engine", "ray", "--ray-address", "nonsense"), 2)


def test_a_port_that_is_not_ray_fails_fast(tmp_path):
    """Something else listening there (here: an HTTP/1 server) is refused in one line, in seconds
    (ray.init would retry for many minutes)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    t = time.monotonic()
    r = run("extract", "--base", "mobilenet_0.25", "--data", tmp_path, "--engine", "ray",
            "--ray-address", f"127.0.0.1:{port}")
    server.close()
    assert "not as a Ray cluster" in one_line_error(r, 1)
    assert time.monotonic() - t < 10


def test_shard_never_replaces_another_shard_or_the_whole_file(shards):
    """Same settings, other shard (or a shard over the whole file): refused without --force, bytes kept."""
    root, local, files = shards
    data = str(root / "data")
    for target, spec in ((files[0], "1/3"), (local, "2/3")):
        before = target.read_bytes()
        r = run("extract", "--base", SETTINGS["base"], "--weights", "none", "--input-size", "32", "--batch-size", "4",
                "--data", data, "--shard", spec, "--out", target, "--no-progress")
        assert r.exit_code == 2, r.output  # (the tiny folder's split warnings come first)
        assert r.output.strip().splitlines()[-1].startswith("tlpipe: error:") and "--force" in r.output
        assert target.read_bytes() == before
        assert not list(target.parent.glob(".*.lock"))  # a refused run leaves no lock file behind


def test_ray_shard_descriptors_carry_file_paths_never_pixels(tmp_path):
    """What the Ray driver hands an actor: a folder shard's file paths (no decoded arrays), and for a
    tfds source no items at all (the actor opens the source itself)."""
    import dataclasses
    import pickle

    from pipeline.stage1.distribute_ray import shard_descriptor
    from pipeline.stage1.plan import plan

    data = make_folder(tmp_path / "data", per_class=6)
    p = plan(ExtractConfig(data=str(data), out=tmp_path / "f.h5", **SETTINGS))
    ranges = partition({s: stop for s, (_, stop) in p.ranges.items()}, 3)[1]
    work = shard_descriptor(p, 1, 3, ranges)
    items = [item for _, listed in work["items"].items.values() for item in listed]
    assert len(items) == sum(b - a for a, b in ranges.values()) > 0
    assert all(item.path is not None and item.array is None for item in items)
    assert len(pickle.dumps(work)) < 1000 + 300 * len(items)  # paths and labels, no pixels
    tfds = dataclasses.replace(p, source=dataclasses.replace(p.source, kind="tfds"))
    assert shard_descriptor(tfds, 1, 3, ranges)["items"] is None
