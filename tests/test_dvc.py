"""`dvc repro` of the real dvc.yaml on a tiny local config; a second repro changes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_project, make_folder, run_dvc
from tests.test_spine import _colour_folder

REPO = Path(__file__).resolve().parents[1]


def _dvc(*args, cwd):
    return run_dvc(*args, cwd=cwd)


HOSTILE = "my \"photos\" it's $HOME `date` é"  # a space, both quotes, $, backticks, non-ASCII


def _stages(work) -> set[str]:
    r = _dvc("stage", "list", "--name-only", cwd=work)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def _write_params(work: Path, params: dict) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")


def _no_dvc_warnings(run: subprocess.CompletedProcess) -> str:
    """No "'cache/dvc/finetuned' is empty" (the report's dependencies on the fine-tune and baseline
    folders) and no "No file hash info found"; the run succeeded."""
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    assert "is empty" not in text and "No file hash info found" not in text, text
    return run.stdout


@pytest.mark.slow
def test_dvc_repro_then_nothing_to_do_then_only_what_changed(tmp_path):
    """One project, run after run (each `dvc repro` starts tlpipe once per stage, so the checks share them):
    a fresh repro of the defaults' empty fine-tune/baseline lists over an image folder whose path has spaces,
    quotes, $ and accents prints no DVC warnings; a second changes nothing; a stage-two param reruns the
    heads only; listed fine-tune and baseline entries become stages that run once, and a baseline param
    reruns the baseline and the report, nothing else."""
    if shutil.which("tlpipe", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("tlpipe console script not installed (pip install -e .)")
    data = _colour_folder(tmp_path / f"images {HOSTILE}", per_class=8)
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["fine_tune"]["heads"] == [] and params["baseline"]["input_sizes"] == []  # light by default
    params["data"]["source"] = str(data)
    # (the Keras runtime: OpenVINO's conversion of googlenet cost more than its extraction of 16 images)
    params["extract"].update(bases=["vgg16", "googlenet"], weights="none", input_size=75, batch_size=8,
                             runtime="keras")
    params["fit_head"].update(heads=["logistic", "dense"], epochs=5, patience=2)
    _write_params(work, params)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    assert _dvc("init", "-q", cwd=work).returncode == 0
    assert not {s for s in _stages(work) if s.startswith(("fine_tune", "baseline"))}  # empty lists: no stage

    _no_dvc_warnings(_dvc("repro", cwd=work))
    for base in ("vgg16", "googlenet"):
        assert (work / "cache/dvc/features" / f"{base}.h5").is_file()
        for head in ("logistic", "dense"):
            assert (work / "cache/dvc/heads" / f"{base}-{head}" / "metrics.json").is_file()
    assert "| vgg16 |" in (work / "cache/dvc/report.md").read_text()
    import h5py

    with h5py.File(work / "cache/dvc/features/vgg16.h5", "r") as h5:
        assert h5.attrs["data_source"] == str(data)
    stamps = {p: p.stat().st_mtime_ns for p in (work / "cache").rglob("*") if p.is_file()
              and p.name != "manifest.json"}

    out = _no_dvc_warnings(_dvc("repro", cwd=work))
    assert "Running stage 'extract" not in out and "Running stage 'fit_head" not in out
    assert "Running stage 'report'" not in out
    assert "didn't change, skipping" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    metrics = _dvc("metrics", "show", "--json", cwd=work)
    assert metrics.returncode == 0, metrics.stderr
    assert "cache/dvc/heads/vgg16-logistic/metrics.json" in metrics.stdout and '"accuracy"' in metrics.stdout

    # a param of stage two only: extraction is not redone, heads are
    params["fit_head"]["seed"] = 1
    _write_params(work, params)
    third = _dvc("repro", cwd=work)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'extract" not in third.stdout
    assert "Running stage 'fit_head@vgg16-logistic'" in third.stdout
    assert json.loads((work / "cache/dvc/heads/vgg16-logistic/evaluation.json").read_text())["head"] == "logistic"
    _fine_tune_and_baseline_run_only_for_listed_entries(work, params)


def _fine_tune_and_baseline_run_only_for_listed_entries(work: Path, params: dict) -> None:
    """(The project of the test above, its heads fitted.)"""
    params["fine_tune"].update(heads=["vgg16-logistic"], epochs=1, batch_size=8, unfreeze="3")
    params["baseline"].update(input_sizes=[32], epochs=1, batch_size=8)
    _write_params(work, params)
    assert {"fine_tune@vgg16-logistic", "baseline@32"} <= _stages(work)
    first = _dvc("repro", cwd=work)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'fit_head" not in first.stdout
    ft, bl = work / "cache/dvc/finetuned/vgg16-logistic", work / "cache/dvc/baseline/32px-scratch-cnn"
    for folder in (ft, bl):
        for name in ("model.keras", "metrics.json", "evaluation.json", "history.csv", "predictions.csv"):
            assert (folder / name).is_file(), folder / name
    rows = json.loads((work / "cache/dvc/report.json").read_text())["rows"]
    assert {r["head"] for r in rows} == {"logistic", "dense", "logistic+ft", "scratch-cnn"}
    assert all(r["pipeline"] for r in rows)

    second = _dvc("repro", cwd=work)
    assert second.returncode == 0, second.stderr
    assert "Running stage 'fine_tune" not in second.stdout and "Running stage 'baseline" not in second.stdout
    metrics = _dvc("metrics", "show", "--json", cwd=work)
    assert "cache/dvc/baseline/32px-scratch-cnn/metrics.json" in metrics.stdout

    # a baseline param reruns the baseline (and the report), nothing else
    params["baseline"]["seed"] = 1
    _write_params(work, params)
    third = _dvc("repro", cwd=work)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'baseline@32'" in third.stdout and "Running stage 'report'" in third.stdout
    assert "Running stage 'fine_tune" not in third.stdout and "Running stage 'fit_head" not in third.stdout


def _tiny_project(tmp_path: Path, data: Path) -> tuple[Path, dict]:
    work = tmp_path / "proj"
    return work, make_dvc_project(work, data, "mobilenet_0.25", epochs=2, patience=1)


def test_dvc_commands_take_path_params_with_spaces_quotes_and_accents(tmp_path):
    """Path params never go through the shell: the rendered commands read them from params.yaml, so
    -S 'data.source=/data/my photos' (or quotes, $, é) cannot break a stage."""
    data = make_folder(tmp_path / HOSTILE, per_class=6)
    weights = tmp_path / f"weights {HOSTILE}"
    weights.mkdir()
    work, params = _tiny_project(tmp_path, data)
    params["extract"]["weights"] = str(weights)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    dry = _dvc("repro", "--dry", "--force", cwd=work)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    commands = [ln for ln in dry.stdout.splitlines() if ln.startswith("> ")]
    assert any("tlpipe -q manifest" in c for c in commands) and any("tlpipe extract" in c for c in commands)
    for c in commands:
        assert "${" not in c and "photos" not in c and "é" not in c, c  # no path in the shell text
    assert sum("--data params.yaml:data.source" in c for c in commands) == 2
    assert any("--weights params.yaml:extract.weights" in c for c in commands)
    # and the manifest stage runs with that path
    r = _dvc("repro", "manifest", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((work / "cache/dvc/manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == str(data) and manifest["counts"]["train"] > 0
