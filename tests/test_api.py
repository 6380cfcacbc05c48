"""`from pipeline import ...` for notebooks: cheap to import, names resolve lazily to plain functions."""

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
              "'h5py', 'pipeline.stage1.extract') if m in sys.modules)); print(pipeline.__version__)")
    assert out.splitlines()[0] == "[]"


def test_names_resolve_to_plain_functions():
    out = _py(
        "import types\n"
        "from pipeline import (extract, ExtractConfig, fit_head, FitConfig, HeadParams, export, ExportConfig,\n"
        "    export_model, predict, evaluate, EvaluateConfig, evaluate_model, report, ReportConfig,\n"
        "    write_head_figures)\n"
        "import pipeline.stage1.extract as m\n"
        "fns = (extract, fit_head, export, predict, evaluate, report)\n"
        "assert all(isinstance(f, types.FunctionType) for f in fns), fns\n"
        "assert m.extract is extract and m.ExtractConfig is ExtractConfig\n"
        "assert export is export_model and evaluate is evaluate_model\n"
        "import pipeline\n"
        "assert type(pipeline) is types.ModuleType and pipeline.extract is extract\n"
        "try:\n    pipeline.nothere\nexcept AttributeError as e:\n    print('ok', e)\n")
    assert "ok module 'pipeline' has no attribute 'nothere'" in out


def test_report_from_the_api(tmp_path):
    from pipeline import ReportConfig, report
    from tests.head_fixtures import write_head

    write_head(tmp_path / "heads" / "vgg16-logistic")
    md = report(ReportConfig(cache_dir=tmp_path))
    assert md == tmp_path / "report.md" and "| vgg16 | vgg16 | logistic |" in md.read_text()


def test_every_public_name_imports_without_tensorflow():
    """README: nothing heavy is imported until one runs (``export`` imported TensorFlow before)."""
    out = _py("import sys, pipeline\n"
              "for name in pipeline.__all__:\n    getattr(pipeline, name)\n"
              "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    assert out.splitlines()[-1] == "[]"
