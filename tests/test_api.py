"""`from pipeline import ...` for notebooks: cheap to import, names resolve lazily, submodules callable."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_pipeline_is_cheap():
    out = _py("import sys, pipeline; print(sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'matplotlib', "
              "'h5py', 'pipeline.extract') if m in sys.modules)); print(pipeline.__version__)")
    assert out.splitlines()[0] == "[]"


def test_names_resolve_and_submodules_are_callable():
    out = _py(
        "import pipeline.report\n"  # imported before 'from pipeline import': still callable
        "from pipeline import (extract, ExtractConfig, fit_head, FitConfig, HeadParams, export, ExportConfig,\n"
        "    export_model, predict, evaluate, EvaluateConfig, evaluate_model, report, ReportConfig,\n"
        "    write_head_figures)\n"
        "import pipeline.extract as m\n"
        "assert all(map(callable, (extract, fit_head, export, predict, evaluate, report)))\n"
        "assert extract.ExtractConfig is ExtractConfig and m is extract and export.export_model is export_model\n"
        "assert evaluate.evaluate_model is evaluate_model and report.ReportConfig is ReportConfig\n"
        "import pipeline\n"
        "try:\n    pipeline.nothere\nexcept AttributeError as e:\n    print('ok', e)\n")
    assert "ok module 'pipeline' has no attribute 'nothere'" in out


def test_calling_a_submodule_calls_its_main_function(tmp_path):
    from pipeline import report
    from tests.head_fixtures import write_head

    write_head(tmp_path / "heads" / "vgg16-logistic")
    md = report(report.ReportConfig(cache_dir=tmp_path))
    assert md == tmp_path / "report.md" and "| vgg16 | vgg16 | logistic |" in md.read_text()
