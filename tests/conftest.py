"""Shared fixtures: tiny synthetic image folders and helpers for features files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 16), fmt: str | None = None) -> Path:
    """A small deterministic RGB image (a colour gradient plus noise) at ``path``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (base[None, None, :] + 5 * xx[..., None] + 3 * yy[..., None]
           + rng.integers(0, 40, size=(h, w, 3))) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "RGB").save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 10, ext: str = ".png",
                seed: int = 0, size: tuple[int, int] = (20, 16)) -> Path:
    """``root/<class>/<class>_<i><ext>``: a folder source split by hash."""
    for c, cname in enumerate(classes):
        for i in range(per_class):
            write_image(Path(root) / cname / f"{cname}_{i:04d}{ext}", seed * 100_000 + c * 10_000 + i, size)
    return Path(root)


def make_presplit(root: Path, layout: dict[str, dict[str, int]], ext: str = ".png", seed: int = 0) -> Path:
    """``root/<split>/<class>/<image>`` from ``{"train": {"cat": 3, ...}, "val": {...}}``."""
    n = 0
    for split, classes in layout.items():
        for cname, count in classes.items():
            folder = Path(root) / split / cname
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                n += 1
                write_image(folder / f"{cname}_{i:04d}{ext}", seed * 100_000 + n)
    return Path(root)


def read_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by name (ids as str): compare files by content, not timing attrs."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.asstr()[...] if obj.dtype.kind == "O" else obj[...]
        h5.visititems(visit)
    return out


def assert_same_datasets(a: Path, b: Path) -> None:
    da, db = read_datasets(a), read_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        assert da[name].shape == db[name].shape, name
        if da[name].dtype.kind == "f":
            assert da[name].tobytes() == db[name].tobytes(), f"{name} differs"
        else:
            assert np.array_equal(da[name], db[name]), f"{name} differs"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def extract_cmd(**cfg) -> list[str]:
    """``python -c`` running ``pipeline.stage1.extract.extract(ExtractConfig(**cfg))``."""
    args = ", ".join(f"{k}={(str(v) if isinstance(v, Path) else v)!r}" for k, v in cfg.items())
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "from pathlib import Path; from pipeline.stage1.extract import ExtractConfig, extract; "
            f"print(extract(ExtractConfig({args})))")
    return [sys.executable, "-c", code]


def run_extract_subprocess(**cfg) -> subprocess.CompletedProcess:
    return subprocess.run(extract_cmd(**cfg), env=subprocess_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)


def dvc_env() -> dict[str, str]:
    """The environment for ``dvc`` and ``tlpipe`` subprocesses: this checkout's tlpipe, quiet TF."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_dvc(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=dvc_env(), capture_output=True,
                          text=True, timeout=timeout)


def make_dvc_project(work: Path, data: Path, base: str, epochs: int, patience: int) -> dict:
    """``work``: a git + DVC project with the real dvc.yaml and params.yaml set to one tiny base
    (random weights, 32 px, the Keras runtime) over ``data`` and one logistic head; returns the params
    written. (What these tests check is DVC's plumbing; converting each base to OpenVINO for a few dozen
    images cost more than the extraction: tests/test_runtime.py checks that runtime.)"""
    import yaml

    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(data)
    params["extract"].update(bases=[base], weights="none", input_size=32, batch_size=8, runtime="keras")
    params["fit_head"].update(heads=["logistic"], epochs=epochs, patience=patience)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, cwd=work, check=True)
    assert run_dvc("init", "-q", cwd=work).returncode == 0
    return params



# The files measured longest (per-file time under `-n 2`, longest first; see docs/development.md). With
# `--dist loadfile` a worker takes the next file when it is nearly done, in collection order (pyproject.toml
# turns off xdist's own order, most tests first, which left the one-test DVC and acceptance files to the
# end, on one worker): started first, they let the two workers finish together. Other files keep their order.
LONGEST_FIRST = ("test_export_predict.py", "test_depths.py", "test_export_formats.py", "test_dvc.py",
                 "test_no_data_loss.py", "test_baseline.py", "test_runtime.py", "test_engine_ray.py",
                 "test_backbones.py", "test_hub.py", "test_spine.py", "test_finetune.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Whole files in the order of ``LONGEST_FIRST``, then the rest as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of ten tiny PNGs, split 80/10/10 by hash."""
    return make_folder(tmp_path / "data", per_class=10)

# Converted OpenVINO models of the tests go to a throw-away folder, not the user's ~/.cache.
if "TLPIPE_OPENVINO_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TLPIPE_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="tlpipe-test-openvino-")
    atexit.register(shutil.rmtree, os.environ["TLPIPE_OPENVINO_CACHE"], True)
