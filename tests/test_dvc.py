"""`dvc repro` of the real dvc.yaml on a tiny local config; a second repro changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_spine import _colour_folder

REPO = Path(__file__).resolve().parents[1]


def _dvc(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_dvc_repro_then_nothing_to_do(tmp_path):
    if shutil.which("tlpipe", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("tlpipe console script not installed (pip install -e .)")
    data = _colour_folder(tmp_path / "images", per_class=8)
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(data)
    params["extract"].update(bases=["vgg16", "googlenet"], weights="none", input_size=75, batch_size=8)
    params["fit_head"].update(heads=["logistic", "dense"], epochs=5, patience=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    assert _dvc("init", "-q", cwd=work).returncode == 0

    first = _dvc("repro", cwd=work)
    assert first.returncode == 0, first.stdout + first.stderr
    for base in ("vgg16", "googlenet"):
        assert (work / "cache/dvc/features" / f"{base}.h5").is_file()
        for head in ("logistic", "dense"):
            assert (work / "cache/dvc/heads" / f"{base}-{head}" / "metrics.json").is_file()
    assert "| vgg16 |" in (work / "cache/dvc/report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (work / "cache").rglob("*") if p.is_file()
              and p.name != "manifest.json"}

    second = _dvc("repro", cwd=work)
    assert second.returncode == 0, second.stderr
    out = second.stdout
    assert "Running stage 'extract" not in out and "Running stage 'fit_head" not in out
    assert "Running stage 'report'" not in out
    assert "didn't change, skipping" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    metrics = _dvc("metrics", "show", "--json", cwd=work)
    assert metrics.returncode == 0, metrics.stderr
    assert "cache/dvc/heads/vgg16-logistic/metrics.json" in metrics.stdout and '"accuracy"' in metrics.stdout

    # a param of stage two only: extraction is not redone, heads are
    params["fit_head"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc("repro", cwd=work)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'extract" not in third.stdout
    assert "Running stage 'fit_head@vgg16-logistic'" in third.stdout
    assert json.loads((work / "cache/dvc/heads/vgg16-logistic/evaluation.json").read_text())["head"] == "logistic"
