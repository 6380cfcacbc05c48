"""Fast, true failures: offline downloads fail at once with the way out, a mistake is one line on
stderr (no TensorFlow start-up lines), exit codes hold, messages say what happened."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert r.exit_code == 2 and f"{notes} is not an HDF5 file; give a features file" in r.output
    assert "signature" not in r.output and len(r.output.strip().splitlines()) == 1
    r = _run(["predict", "--model", str(notes), str(photo)])
    assert r.exit_code == 2 and "is not a model written by 'tlpipe export'" in r.output
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


# ----------------------------------------------------------------------------- issue 20: fail before the work

def _imported(stderr: str) -> set[str]:
    """Top-level modules named by ``python -X importtime`` on stderr."""
    import re

    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", stderr, re.M)}


def test_usage_errors_end_before_tensorflow_is_imported(tmp_path):
    """A usage error (bad path, unknown base, bad --split, missing or wrong --features, missing head or
    model) is one line and exit 2 without importing TensorFlow or Keras (their import alone takes seconds)."""
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    data = make_folder(tmp_path / "data", per_class=2)
    cases = [
        ("extract", "--base", "vgg16", "--data", str(tmp_path / "nope")),
        ("extract", "--base", "no_such_base", "--data", str(data)),
        ("extract", "--base", "vgg16", "--data", str(data), "--split", "50/60/10"),
        ("extract", "--base", "googlenet", "--data", str(data), "--input-size", "22"),  # min 75 px
        ("extract", "--base", "vgg16", "--data", str(data), "--weights", str(photo)),
        ("fit-head", "--features", str(tmp_path / "missing.h5")),
        ("fit-head", "--features", str(photo)),
        ("learning-curve", "--features", str(photo)),
        ("fine-tune", "--head", str(tmp_path / "nope")),
        ("baseline", "--data", str(tmp_path / "nope")),
        ("export", "--head", str(data), "--out", str(tmp_path / "m.keras")),
        ("predict", "--model", str(tmp_path / "m.keras"), str(photo)),
        ("manifest", "--data", str(data), "--out", str(photo / "m.json")),
    ]
    for args in cases:
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args], env=env,
                           capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("tlpipe: error: "), (args, r.stderr[-2000:])
        assert not {"tensorflow", "keras"} & _imported(r.stderr), (args, lines)


def _usage_error_before_tensorflow(args, cwd: Path) -> str:
    """Run the CLI with ``-X importtime``: assert one line, exit 2, no TensorFlow or Keras imported; the line."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=str(cwd))
    lines = [ln for ln in r.stderr.splitlines()
             if not ln.startswith(("import time:", "WARNING pipeline.data"))]  # tiny splits are warned about
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("tlpipe: error: "), (args, r.stderr[-2000:])
    assert not {"tensorflow", "keras"} & _imported(r.stderr), (args, lines)
    return lines[0]


def _head_folder(folder: Path, head: str) -> Path:
    """The least a head folder holds for the checks made before TensorFlow: model/head.json."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "head.json").write_text(json.dumps({"head": head, "classes": ["a", "b"]}))
    return folder


def test_export_refusals_end_before_tensorflow_is_imported(tmp_path):
    """An existing --out, and --format tflite for a custom-layer head, are refused before TensorFlow starts."""
    svm = _head_folder(tmp_path / "svm", "svm")
    existing = tmp_path / "m.keras"
    existing.write_text("the user's file")
    line = _usage_error_before_tensorflow(["export", "--head", svm, "--out", existing], tmp_path)
    assert "exists; pass --force" in line
    line = _usage_error_before_tensorflow(["export", "--head", svm, "--out", tmp_path / "m.tflite",
                                           "--format", "tflite"], tmp_path)
    assert "--format tflite supports the logistic and dense heads, not svm" in line


class _ReadOnly:
    """Make a folder unwritable for this process: chmod 555, or (as root, who ignores modes) the
    immutable attribute; ``ok`` is False where neither works (the test then skips that part)."""

    def __init__(self, folder: Path):
        self.folder, self.ok, self.how = folder, False, None

    def __enter__(self):
        if os.geteuid() != 0:
            self.folder.chmod(0o555)
            self.how = "chmod"
        elif subprocess.run(["chattr", "+i", str(self.folder)], capture_output=True).returncode == 0:
            self.how = "chattr"
        probe = self.folder / ".probe"
        try:
            probe.write_text("x")
            probe.unlink()
        except OSError:
            self.ok = True
        return self

    def __exit__(self, *exc):
        if self.how == "chmod":
            self.folder.chmod(0o755)
        elif self.how == "chattr":
            subprocess.run(["chattr", "-i", str(self.folder)], capture_output=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny features file, a logistic head on it and its exported model."""
    from pipeline.deploy.export import ExportConfig, export_model
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.fit_head import FitConfig, fit_head

    root = tmp_path_factory.mktemp("fitted")
    data = make_folder(root / "data", per_class=8)
    feats = extract(ExtractConfig(base="mobilenet_0.25", data=str(data), split="60/20/20", weights="none", input_size=32,
                                  batch_size=8, out=root / "f.h5", progress=False))
    head = fit_head(FitConfig(features=[str(feats)], head="logistic", out=root / "head"))
    model = export_model(ExportConfig(head=head, out=root / "m.keras"))
    return {"data": data, "features": feats, "head": head, "model": model, "root": root}


def test_wrong_files_and_folders_are_refused_before_tensorflow_is_imported(fitted, tmp_path):
    """A features file given as --model or --weights, another file as --model, class folders that are
    not the model's, and a fine-tune --out the user made: one line, exit 2, TensorFlow never imported."""
    f, h, m = fitted["features"], fitted["head"], fitted["model"]
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    shutil.copy(next(Path(fitted["data"]).rglob("*.png")), photo_dir / "a.png")
    notes = tmp_path / "notes.keras"
    notes.write_text("not a model")
    line = _usage_error_before_tensorflow(["predict", "--model", f, photo_dir], tmp_path)
    assert "is a tlpipe features file; export a head first: tlpipe export --head" in line
    line = _usage_error_before_tensorflow(["predict", "--model", notes, photo_dir], tmp_path)
    assert "is not a model written by 'tlpipe export'" in line
    other = make_folder(tmp_path / "other", per_class=2, classes=("ant", "bee"))
    line = _usage_error_before_tensorflow(["evaluate", "--model", m, "--data", other], tmp_path)
    assert "are not the model's classes" in line and "ant" in line
    line = _usage_error_before_tensorflow(["extract", "--base", "mobilenet_0.25", "--data", fitted["data"],
                                           "--weights", f, "--out", tmp_path / "g.h5"], tmp_path)
    assert "this is a tlpipe features file, not weights" in line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    line = _usage_error_before_tensorflow(["fine-tune", "--head", h, "--out", mine], tmp_path)
    assert "--force" in line and "not a tlpipe head folder" in line
    assert (mine / "notes.txt").read_text() == "a user's folder"


def test_an_unwritable_output_is_one_line_exit_2_before_the_work(fitted, tmp_path, monkeypatch):
    """Every command that writes checks first that it can: an --out under a file, or in a folder it
    cannot write in, is one line naming the path, exit 2, and nothing is computed."""
    import pipeline.stage2.learning_curve as lc

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    cache = tmp_path / "cache"
    (cache / "heads").mkdir(parents=True)
    shutil.copytree(fitted["head"], cache / "heads" / "mobilenet_0.25-logistic")
    f, h, m, d = (str(fitted[k]) for k in ("features", "head", "model", "data"))

    def commands(where: Path):
        return {
            "extract": ["extract", "--base", "mobilenet_0.25", "--data", d, "--weights", "none", "--input-size", "32",
                        "--out", str(where / "f.h5")],
            "fit-head": ["fit-head", "--features", f, "--out", str(where / "head")],
            "export": ["export", "--head", h, "--out", str(where / "m.keras")],
            "predict": ["predict", "--model", m, d, "--out", str(where / "p.csv"), "--format", "csv"],
            "evaluate": ["evaluate", "--model", m, "--data", d, "--out", str(where / "ev")],
            "manifest": ["manifest", "--data", d, "--out", str(where / "m.json")],
            "learning-curve": ["learning-curve", "--features", f, "--out", str(where / "lc.csv")],
        }

    def no_fitting(*a, **k):  # the curve must be refused before the first fit
        raise AssertionError("learning-curve fitted before checking its output")

    monkeypatch.setattr(lc, "subsample", no_fitting)
    for name, args in commands(a_file).items():
        r = _run(args)
        assert r.exit_code == 2, (name, r.output)
        assert r.output.strip().startswith("tlpipe: error: ") and "is a file, not a folder" in r.output, (name, r.output)
    with _ReadOnly(locked) as ro, _ReadOnly(cache) as ro_cache:
        if not (ro.ok and ro_cache.ok):
            pytest.skip("cannot make a folder read-only here (neither chmod nor chattr works)")
        for name, args in [*commands(locked).items(), ("report", ["report", "--cache-dir", str(cache)])]:
            r = _run(args)
            errors = [ln for ln in r.output.splitlines() if ln.startswith("tlpipe: error: ")]
            assert r.exit_code == 2 and len(errors) == 1, (name, r.output)
            assert "cannot be written" in errors[0] and "not writable" in errors[0], (name, errors)
            assert "PermissionError" not in r.output and ".tmp" not in errors[0], (name, errors)
        assert list(locked.iterdir()) == []


def _synthetic_weights(folder: Path, base: str) -> Path:
    """``base``'s no-top weights (random, ``weights=None``) saved as ``<base>_notop.weights.h5``."""
    from pipeline.nets.backbones import get_backbone

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{base}_notop.weights.h5"
    get_backbone(base).build(None, 32, "avg").save_weights(str(path))
    return path


def test_weights_of_another_base_are_one_line_exit_2_naming_their_base(tmp_path):
    """--weights of another base: one line, exit 2, naming the base the file fits; Keras never
    starts loading it, so no per-layer warnings reach stderr."""
    weights = _synthetic_weights(tmp_path / "w", "mobilenet_0.25")
    data = make_folder(tmp_path / "data", per_class=10)
    r = _cli_subprocess("extract", "--base", "vgg16", "--data", str(data), "--weights", str(weights),
                        "--input-size", "32", "--out", str(tmp_path / "f.h5"), "-q")
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING pipeline.data")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "does not fit vgg16" in lines[0] and "it fits mobilenet_0.25" in lines[0]
    assert not (tmp_path / "f.h5").exists()
    # the right base takes it
    r = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--weights", str(weights),
              "--input-size", "32", "--out", str(tmp_path / "g.h5"), "--no-progress"])
    assert r.exit_code == 0, r.output


def test_shared_mobilenet_weights_into_resnet50_name_mobilenet(tmp_path):
    shared = REPO.parent / "shared" / "weights" / "mobilenet_0.75_224_imagenet_notop.weights.h5"
    if not shared.is_file():
        shared = Path("/work/shared/weights/mobilenet_0.75_224_imagenet_notop.weights.h5")
    if not shared.is_file():
        pytest.skip("shared MobileNet weights absent")
    data = make_folder(tmp_path / "data", per_class=10)
    r = _run(["extract", "--base", "resnet50", "--data", str(data), "--weights", str(shared), "--input-size", "32",
              "--out", str(tmp_path / "f.h5")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("tlpipe: error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "it fits mobilenet_0.75" in errors[0], r.output


def test_the_real_mistake_comes_before_the_existing_output(fitted, tmp_path):
    """--weights model.keras and --unfreeze block99 are named as such, not as 'made from other settings'."""
    d = str(fitted["data"])
    out = tmp_path / "f.h5"
    shutil.copy(fitted["features"], out)  # an existing output made with other settings (weights none)
    r = _run(["extract", "--base", "mobilenet_0.25", "--data", d, "--weights", str(fitted["model"]),
              "--input-size", "32", "--out", str(out)])
    assert r.exit_code == 2 and "saved Keras model (.keras), not a weights file" in r.output, r.output
    assert "other settings" not in r.output
    ft_out = tmp_path / "ft"
    ft_out.mkdir()
    (ft_out / "mine.txt").write_text("a user's folder")
    r = _run(["fine-tune", "--head", str(fitted["head"]), "--unfreeze", "block99", "--out", str(ft_out)])
    assert r.exit_code == 2 and "unknown block 'block99'" in r.output, r.output
    assert "--force" not in r.output


def test_features_of_the_wrong_kind_and_info_on_a_head_folder(fitted, tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    for wrong, kind in ((fitted["model"], "saved Keras model"), (photo, "an image")):
        for cmd in ("fit-head", "learning-curve"):
            r = _run([cmd, "--features", str(wrong), "--out", str(tmp_path / "o")])
            assert r.exit_code == 2 and kind in r.output, (cmd, r.output)
    r = _run(["info", str(fitted["head"])])
    assert r.exit_code == 0, r.output
    assert "features file not found" not in r.output
    for key in ("base", "head", "features", "chosen", "val accuracy", "test accuracy"):
        assert key in r.output, r.output
    assert "mobilenet_0.25" in r.output and "logistic" in r.output and "C=" in r.output
    r = _run(["info", str(fitted["head"]), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["head"] == "logistic"
    r = _run(["info", str(fitted["data"])])
    assert r.exit_code == 2 and "no evaluation.json" in r.output


def test_the_python_api_is_as_quiet_as_the_cli(tmp_path):
    """``from pipeline import extract``: no TensorFlow C++ lines (absl, oneDNN, CUDA's E0000) on stderr."""
    data = make_folder(tmp_path / "data", per_class=4)
    code = ("from pipeline import ExtractConfig, extract\n"
            f"extract(ExtractConfig(base='mobilenet_0.25', data={str(data)!r}, weights='none', input_size=32,\n"
            f"        batch_size=4, runtime='keras', out={str(tmp_path / 'f.h5')!r}, progress=False))\n"
            "import tensorflow as tf\ntf.config.list_physical_devices('GPU')\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import re

    noise = [ln for ln in r.stderr.splitlines()
             if re.match(r"^[IWEF]\d{4} ", ln) or "absl::" in ln or "cpu_feature_guard" in ln or "oneDNN" in ln]
    assert noise == [], noise
    # a user's explicit choice is respected: TF_CPP_MIN_LOG_LEVEL=0 asks TensorFlow for everything
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    r = subprocess.run([sys.executable, "-c", "import os, pipeline; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "0"


def test_bf16_on_avx512_bf16_without_amx_warns_and_auto_stays_f32(monkeypatch, caplog):
    import pipeline.stage1.runtime as rt

    probes = dict(openvino_ok=True, accelerator=None, backend="tensorflow", x86=True)
    for flags, warns in (({"avx512f", "avx512_bf16"}, True), ({"avx512_bf16", "amx_bf16", "amx_tile"}, False)):
        monkeypatch.setattr(rt, "cpu_flags", lambda flags=flags: set(flags))
        rt.bf16_supported.cache_clear()
        rt._said.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.stage1.runtime"):
            assert rt.resolve("openvino", "bf16", **probes) == ("openvino", "bf16")
            assert rt.resolve("auto", "auto", **probes) == ("openvino", "f32")
        said = [r.getMessage() for r in caplog.records if "slower than f32" in r.getMessage()]
        assert len(said) == (1 if warns else 0), said
        if warns:
            assert "\n" not in said[0] and "AVX512-BF16 but no AMX" in said[0]
    rt.bf16_supported.cache_clear()


def test_param_reference_reads_hostile_paths_from_params_yaml(tmp_path, monkeypatch):
    import yaml

    from pipeline.core.errors import UsageError
    from pipeline.core.util import param_reference

    hostile = str(tmp_path / "my \"photos\" it's $HOME `x` é")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": hostile}, "extract": {"limit": 0}},
                                                         allow_unicode=True), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert param_reference("params.yaml:data.source") == hostile
    assert param_reference("params.yaml:extract.limit") == "0"
    assert param_reference("tfds:cats_vs_dogs") == "tfds:cats_vs_dogs"
    assert param_reference("/data/photos") == "/data/photos"
    with pytest.raises(UsageError, match="no key data.nope"):
        param_reference("params.yaml:data.nope")
    with pytest.raises(UsageError, match="cannot read"):
        param_reference("other.yaml:data.source")


def test_progress_off_a_terminal_is_a_log_line_at_most_every_15_s(monkeypatch, caplog, capsys):
    """heads.md: when stderr is not a terminal, progress is a log line at most every 15 s (no tqdm redraws)."""
    import pipeline.core.util as u

    clock = [0.0]
    monkeypatch.setattr(u.time, "perf_counter", lambda: clock[0])
    bar = u.progress_bar(total=100, desc="extract x")  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="tlpipe.progress"):
        for _ in range(99):
            clock[0] += 1.0
            bar.set_postfix_str("train", refresh=False)
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "tlpipe.progress"]
    assert len(lines) == 6, lines  # 99 s: at 15, 30, ..., 90
    assert lines[0] == "extract x: 15/100 img, 1.0 img/s, about 85 s left (train)"
    assert "\r" not in capsys.readouterr().err


def test_fit_head_and_extract_write_no_progress_redraws_to_a_file(fitted, tmp_path):
    """``fit-head ... 2>file`` and ``extract ... 2>file``: no tqdm bar (``\\r`` redraws) in the file."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    runs = {
        "fit-head": ["fit-head", "--features", str(fitted["features"]), "--head", "logistic",
                     "--out", str(tmp_path / "h")],
        "extract": ["extract", "--base", "mobilenet_0.25", "--data", str(fitted["data"]), "--weights", "none",
                    "--input-size", "32", "--batch-size", "2", "--out", str(tmp_path / "f.h5")],
    }
    for name, args in runs.items():
        with open(tmp_path / f"{name}.err", "wb") as err:  # stderr is a file, as with 2>file or a DVC log
            rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, timeout=300, cwd=str(REPO)).returncode
        raw = (tmp_path / f"{name}.err").read_bytes()
        assert rc == 0 and b"\r" not in raw and b"%|" not in raw, (name, raw[-500:])


def test_imagenet_weights_offline_and_not_cached_fail_before_tensorflow_is_imported(tmp_path):
    """``extract --base vgg16`` offline with an empty Keras cache: the one line (put FILE in the cache or pass
    --weights PATH) comes before TensorFlow is imported, from the bases table's file name."""
    data = make_folder(tmp_path / "data", per_class=2)
    code = (
        "import sys\n"
        "import pipeline.nets.weights as w\n"
        "w.unreachable = lambda url, timeout=3.0: 'storage.test: name lookup failed'\n"
        "from pipeline.cli import cli\n"
        "try:\n"
        f"    cli.main(['extract', '--base', 'vgg16', '--data', {str(data)!r}, '--out', {str(tmp_path / 'f.h5')!r}],"
        " prog_name='tlpipe')\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "keras"), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    assert r.stdout.strip().splitlines()[-1] == "EXIT 1 []", (r.stdout, r.stderr[-1500:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("tlpipe: error: ")]
    assert len(errors) == 1 and "name lookup failed" in errors[0], r.stderr
    assert f"put vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 in {tmp_path / 'keras' / 'models'}/" in errors[0]
    assert "--weights PATH" in errors[0]


@pytest.mark.parametrize("base", ["mobilenet_0.25", "vgg16"])
def test_weight_table_is_each_bases_arrays(base):
    """``WEIGHT_ARRAYS`` (arrays, values) of the no-top bases, as built (every base: TLPIPE_ALL_BASES=1 on
    test_weight_table_of_every_base)."""
    from pipeline.nets.backbones import get_backbone
    from pipeline.nets.weight_table import WEIGHT_ARRAYS
    from pipeline.nets.weights import model_weight_shapes

    shapes = model_weight_shapes(get_backbone(base).build(None, None, "avg"))
    assert WEIGHT_ARRAYS[base] == (len(shapes), sum(int(np.prod(s)) for s in shapes))


@pytest.mark.skipif(not os.environ.get("TLPIPE_ALL_BASES"), reason="builds every base (minutes): TLPIPE_ALL_BASES=1")
def test_weight_table_of_every_base():
    from pipeline.nets.backbones import BACKBONES

    for name, b in BACKBONES.items():
        if not b.hub:
            test_weight_table_is_each_bases_arrays(name)


def test_wrong_base_and_top_weights_are_refused_before_tensorflow_is_imported(tmp_path):
    """Arrays of another base (as saved by save_weights) or with the classification top: one line, exit 2,
    from the file's arrays read with h5py, TensorFlow never imported."""
    import h5py

    from pipeline.nets.weight_table import WEIGHT_ARRAYS

    def fake(path: Path, arrays: int, values: int, top: int = 0) -> Path:
        """``arrays`` float32 arrays holding ``values`` values in all, plus ``top`` more (a classifier)."""
        with h5py.File(path, "w") as h5:
            for i in range(arrays - 1):
                h5.create_dataset(f"layers/l{i}/vars/0", data=np.zeros(1, "float32"))
            h5.create_dataset(f"layers/l{arrays}/vars/0", data=np.zeros(values - (arrays - 1), "float32"))
            for i in range(top):
                h5.create_dataset(f"layers/top{i}/vars/0", data=np.zeros(4, "float32"))
        return path

    data = make_folder(tmp_path / "data", per_class=2)
    mobilenet = fake(tmp_path / "mobilenet_0.75_224_imagenet_notop.weights.h5", *WEIGHT_ARRAYS["mobilenet_0.75"])
    line = _usage_error_before_tensorflow(["extract", "--base", "resnet50", "--data", data, "--weights", mobilenet],
                                          tmp_path)
    assert "does not fit resnet50" in line and "it fits mobilenet_0.75: use --base mobilenet_0.75" in line
    top = fake(tmp_path / "vgg16_top.weights.h5", *WEIGHT_ARRAYS["vgg16"], top=6)
    line = _usage_error_before_tensorflow(["extract", "--base", "vgg16", "--data", data, "--weights", top], tmp_path)
    assert "does not fit vgg16" in line and "a file with the classification top" in line
