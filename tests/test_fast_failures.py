"""Fast, true failures: offline downloads fail at once with the way out, a mistake is one line on
stderr (no TensorFlow start-up lines), exit codes hold, messages say what happened."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, make_folder, make_presplit
from pipeline.cli import cli


def _run(args):
    return CliRunner().invoke(cli, args)


def _cli_subprocess(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    env["PYTHONPATH"] = str(REPO)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))


class _OfflineBuilder:
    """A tfds builder whose data is not prepared and whose download host does not resolve."""

    url_infos = {"https://tlpipe-test-host.invalid/cats.zip": None}
    version = "1.0.0"

    def is_prepared(self):
        return False

    def download_and_prepare(self, *a, **kw):  # pragma: no cover - must not be reached
        raise AssertionError("download_and_prepare was called: tfds would retry for minutes")


def test_tfds_offline_fails_at_once_naming_both_routes(monkeypatch):
    import tensorflow_datasets as tfds

    from pipeline.data.sources import open_source
    from pipeline.core.errors import DataError

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _OfflineBuilder())
    with pytest.raises(DataError) as err:
        open_source("tfds:cats_vs_dogs", "80/10/10")
    msg = str(err.value)
    assert "tlpipe-test-host.invalid" in msg and "cannot be downloaded" in msg
    assert "--data PATH" in msg and "dvc exp run -S data.source=PATH" in msg
    assert "ImageNet weights come next" in msg and "-S extract.weights=PATH" in msg


def test_imagenet_weights_offline_fail_before_keras_downloads(monkeypatch, tmp_path, capfd):
    import pipeline.nets.weights as w
    from pipeline.nets.backbones import get_backbone
    from pipeline.core.errors import WeightsUnavailable

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(w, "unreachable", lambda url, timeout=3.0: "storage.test: name lookup failed")
    with pytest.raises(WeightsUnavailable) as err:
        w.build_with_weights(get_backbone("mobilenet_0.25"), "imagenet", 32)
    msg = str(err.value)
    assert "name lookup failed" in msg and "--weights PATH" in msg and "dvc exp run -S extract.weights=PATH" in msg
    out, _ = capfd.readouterr()
    assert "Downloading data from" not in out


def test_a_mistake_is_one_line_on_stderr_without_tensorflow_lines(tmp_path):
    not_a_head = tmp_path / "not_a_head"
    not_a_head.mkdir()
    # export imports TensorFlow before it finds the mistake
    r = _cli_subprocess("export", "--head", str(not_a_head), "--out", str(tmp_path / "m.keras"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("tlpipe: error: ") and "not a fitted head folder" in r.stderr
    # predict with a missing model: one line, and TensorFlow is not even imported
    r = _cli_subprocess("predict", "--model", str(tmp_path / "nothere.keras"), str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "model file not found" in r.stderr


def test_exit_codes_and_messages_say_what_happened(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()

    r = _run(["predict", "--model", str(a_file), str(tmp_path / "missing.jpg")])
    assert r.exit_code == 2 and "no such file or folder" in r.output
    r = _run(["predict", "--model", str(tmp_path), str(data)])
    assert r.exit_code == 2 and "SavedModel folder" in r.output and "not found" not in r.output
    r = _run(["predict", "--model", str(a_file), str(empty)])
    assert r.exit_code == 2 and "no image files in folder" in r.output
    r = _run(["extract", "--base", "vgg16", "--data", str(a_file), "--weights", "none"])
    assert r.exit_code == 2 and "not a file" in r.output
    r = _run(["manifest", "--data", str(data), "--split", "-10/60/50", "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "cannot be negative" in r.output and "sum" not in r.output
    r = _run(["manifest", "--data", str(data), "--split", "60/30/20", "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "must sum to 100, not 110" in r.output


def test_split_warnings(tmp_path, caplog):
    from pipeline.data.sources import open_source

    pre = make_presplit(tmp_path / "pre", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        open_source(str(pre), "70/15/15")
    assert "--split 70/15/15 is not used" in caplog.text
    # the small-split hint names what applies: the split folder, not --split; or --limit
    assert "only 4 images" in caplog.text and "add images to its subfolder" in caplog.text
    assert "larger share with --split" not in caplog.text
    caplog.clear()
    data = make_folder(tmp_path / "data", per_class=300)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        src = open_source(str(data), "98/1/1")
    assert src.counts["val"] == 5  # per-file buckets: about 1 % of 600 (binomial), not exactly 6
    assert "val split" in caplog.text and "only 5 images" in caplog.text and "larger share with --split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        open_source(str(data), "80/10/10", None, 10)
    assert "only 10 images" in caplog.text and "--limit 10 keeps at most 10 images per split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        open_source(str(data), "70/15/15")  # 87 val, 75 test images (80/10/10 gives 59 val, 46 test)
    assert "only" not in caplog.text


def test_global_flags_after_the_command(tmp_path):
    r = _run(["fit-head", "--features", str(tmp_path / "none.h5"), "--debug"])
    assert isinstance(r.exception, Exception) and "features file not found" in str(r.exception)  # traceback mode
    r = _run(["fit-head", "--features", str(tmp_path / "none.h5"), "-q"])
    assert r.exit_code == 2 and "features file not found" in r.output


def test_fit_head_and_export_warn_about_stale_inputs(tmp_path, caplog):
    from conftest import write_image
    from pipeline.stage1.extract import ExtractConfig, extract

    data = make_folder(tmp_path / "data", per_class=8)
    cache = tmp_path / "cache"
    extract(ExtractConfig(base="mobilenet_0.25", data=str(data), weights="none", input_size=32, batch_size=8,
                          cache_dir=cache, progress=False))
    assert _run(["fit-head", "--features", "mobilenet_0.25", "--cache-dir", str(cache)]).exit_code == 0
    write_image(data / "dog" / "dog_extra.png", 777)  # the images change after extraction
    r = _run(["fit-head", "--features", "mobilenet_0.25", "--cache-dir", str(cache), "--head", "knn"])
    assert r.exit_code == 0
    assert "is stale" in r.output and "--force" in r.output

    # the features are extracted again (other settings): the head fitted before is stale
    extract(ExtractConfig(base="mobilenet_0.25", data=str(data), weights="none", input_size=40, batch_size=8,
                          cache_dir=cache, progress=False, force=True))
    r = _run(["export", "--head", str(cache / "heads" / "mobilenet_0.25-logistic"), "--out",
              str(tmp_path / "m.keras")])
    assert "is stale" in r.output and "fit it again" in r.output


def test_a_file_of_the_wrong_kind_is_a_usage_error(tmp_path):
    """Handing a command the wrong kind of file is the user's mistake: one line, exit 2 (not 1)."""
    from PIL import Image

    from pipeline.stage1.extract import ExtractConfig, extract

    data = make_folder(tmp_path / "data", per_class=6)
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    r = _run(["info", str(notes)])
    assert r.exit_code == 2 and "not a readable HDF5 file" in r.output
    r = _run(["predict", "--model", str(notes), str(photo)])
    assert r.exit_code == 2 and "could not load" in r.output and "as a Keras model" in r.output
    r = _run(["report", "--cache-dir", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no fitted heads" in r.output
    settings = dict(base="mobilenet_0.25", weights="none", input_size=32, batch_size=4, progress=False)
    a = extract(ExtractConfig(data=str(data), out=tmp_path / "a.h5", **settings))
    b = extract(ExtractConfig(data=str(data), limit=4, out=tmp_path / "b.h5", **settings))
    r = _run(["fit-head", "--features", str(a), "--features", str(b), "--head", "logistic",
              "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "cannot fuse" in r.output and "--limit" in r.output
    assert not (tmp_path / "h").exists()


def test_ctrl_c_says_resume_only_where_a_command_resumes(monkeypatch, tmp_path):
    import pipeline.reporting.report

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.reporting.report, "report", interrupted)
    r = _run(["report", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 130 and "no output was replaced" in r.output and "resume" not in r.output


def test_a_missing_keras_backend_package_is_one_line(tmp_path):
    """KERAS_BACKEND naming a backend whose package is not installed: one line naming the fix, exit 2."""
    import importlib.util

    backend = next((b for b in ("jax", "torch") if importlib.util.find_spec(b) is None), None)
    if backend is None:
        pytest.skip("jax and torch are both installed")
    data = make_folder(tmp_path / "data", per_class=2)
    r = _cli_subprocess("extract", "--base", "mobilenet_0.25", "--data", str(data), "--weights", "none",
                        "--out", str(tmp_path / "f.h5"), env_extra={"KERAS_BACKEND": backend})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"KERAS_BACKEND={backend} but the {backend} package is not installed" in lines[0]
