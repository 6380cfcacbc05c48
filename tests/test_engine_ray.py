"""The Ray engine on a local Ray cluster (``ray.init(num_cpus=2)``, shared by this module), 2 actors:
its file equals the local engine's, even when a model actor is SIGKILLed mid-shard; a rerun after
the driver was killed resumes from the finished shards.  Faults are injected by tests/ray_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray  # in the test extra (pyproject): a missing Ray fails here, never skips

from conftest import REPO, make_folder, subprocess_env
from pipeline.stage1.extract import ExtractConfig, extract, hidden_sibling
from pipeline.store.features import read_attrs
from ray_faults import ACTOR_ENV
from test_shards import SETTINGS, assert_equal_files

pytestmark = pytest.mark.slow

RAY = dict(engine="ray", actors=2, shard_size=5)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU local Ray cluster whose model actors die once, mid-shard, when the marker file exists
    (``ray_faults.arm_actors`` as the workers' setup hook); (marker, GCS address)."""
    marker = tmp_path_factory.mktemp("fault") / "kill-one-actor"
    saved = {k: os.environ.get(k) for k in (ACTOR_ENV, "PYTHONPATH")}
    os.environ[ACTOR_ENV] = str(marker)  # inherited by the workers Ray starts
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": "ray_faults.arm_actors"})
    try:
        yield marker, ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    data = make_folder(root / "data", per_class=12, size=(40, 30))
    (data / "dog" / "dog_0099.png").write_bytes(b"not an image")  # one skipped input
    return data, extract(ExtractConfig(data=str(data), out=root / "local.h5", **SETTINGS))


def test_ray_equals_local_even_when_an_actor_dies(cluster, local, tmp_path):
    marker, _ = cluster
    data, reference = local
    marker.touch()  # arm: the first actor to reach the fault point is SIGKILLed, mid-shard
    out = extract(ExtractConfig(data=str(data), out=tmp_path / "ray.h5", **SETTINGS, **RAY))
    assert not marker.exists(), "no actor reached the fault point"
    assert_equal_files(reference, out, atol=1e-5)
    timing = json.loads(read_attrs(out)["timing"])
    assert timing["engine"] == "ray" and timing["shards"] == 5 and timing["shards_reused"] == 0
    assert not hidden_sibling(out, ".shards").exists()  # shards removed once merged
    skipped = json.loads((tmp_path / "ray.skipped.json").read_text())
    assert len(skipped) == 1 and skipped == read_attrs(reference)["skipped"]


def test_rerun_after_killed_driver_resumes_from_finished_shards(cluster, local, tmp_path):
    _, address = cluster
    data, reference = local
    out = tmp_path / "ray.h5"
    driver_marker = tmp_path / "kill-driver"
    driver_marker.touch()
    env = subprocess_env()
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env["PYTHONPATH"]
    # the driver is killed after its first finished shard (ray_faults.arm_driver)
    code = ("import sys, ray_faults; ray_faults.arm_driver(sys.argv[1]); from pipeline.cli import main; "
            "sys.argv = ['tlpipe'] + sys.argv[2:]; main()")
    cmd = [sys.executable, "-c", code, str(driver_marker), "extract", "--base", SETTINGS["base"], "--weights", "none",
           "--input-size", "32", "--batch-size", "4", "--no-progress", "--data", str(data), "--out", str(out),
           "--engine", "ray", "--ray-address", address, "--workers", "1", "--shard-size", "5"]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL
    assert not out.exists()
    kept = sorted(hidden_sibling(out, ".shards").glob("*.h5"))
    assert kept, "no finished shard was kept"
    result = extract(ExtractConfig(data=str(data), out=out, **SETTINGS, **RAY))
    timing = json.loads(read_attrs(result)["timing"])
    assert timing["shards_reused"] >= len(kept) >= 1
    assert_equal_files(reference, result, atol=1e-5)


def test_ray_carries_the_depths(cluster, local, tmp_path):
    """extract --layers on Ray actors: the same depths (attributes and columns) as the local engine."""
    data, _ = local
    depths = {**SETTINGS, "layers": "conv_pw_7,conv_pw_13"}
    reference = extract(ExtractConfig(data=str(data), out=tmp_path / "local.h5", **depths))
    out = extract(ExtractConfig(data=str(data), out=tmp_path / "ray.h5", **depths, **RAY))
    assert read_attrs(out)["depths"] == ["conv_pw_7_relu", "conv_pw_13_relu"]
    assert_equal_files(reference, out, atol=1e-5)


def test_ray_carries_the_views(cluster, local, tmp_path):
    """extract --views K on Ray actors: the same rows, view splits and file as the local engine."""
    data, _ = local
    views = {**SETTINGS, "layers": "conv_pw_13", "views": 2}
    reference = extract(ExtractConfig(data=str(data), out=tmp_path / "local.h5", **views))
    out = extract(ExtractConfig(data=str(data), out=tmp_path / "ray.h5", **views, **RAY))
    splits = read_attrs(out)["splits"]
    assert {"train_view1", "train_view2", "val_view1", "test_view1"} <= set(splits)
    assert read_attrs(out)["views"] == 2 and json.loads(read_attrs(out)["timing"])["engine"] == "ray"
    assert_equal_files(reference, out, atol=1e-5)


def test_a_tfds_source_reopened_by_an_actor_has_the_view_splits(tmp_path):
    """Ray actors open a tfds source themselves (``Plan.reopen_args``): with the plan's view splits and items."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from pipeline.stage1.plan import plan, reopen_source

    with tfds.testing.mock_data(num_examples=12):
        p = plan(ExtractConfig(data="tfds:cats_vs_dogs", out=tmp_path / "f.h5", views=2, **SETTINGS))
        source = reopen_source(*p.reopen_args())
        assert source.splits == p.source.splits and "train_view2" in source.splits
        for split in source.splits:
            assert [i.id for i in source.iter_items(split)] == [i.id for i in p.source.iter_items(split)]
