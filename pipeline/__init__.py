"""tlpipe: cache frozen-base image features once, fit many heads on them.

Python API (for notebooks); nothing heavy is imported until a name is used (PEP 562)::

    from pipeline import ExtractConfig, FitConfig, extract, fit_head
    features = extract(ExtractConfig(base="vgg16", data="photos/"))
    head_dir = fit_head(FitConfig(features=[features], head="logistic"))

Every name below is a plain function or class of the stage that defines it; the stages live in
sub-packages (``pipeline.stage1.extract``, ``pipeline.stage2.fit_head``, ``pipeline.deploy.export``, ...).
"""

from __future__ import annotations

import importlib

from pipeline.core.util import quiet_tensorflow_by_default

__version__ = "0.1.0"

# TensorFlow's C++ start-up lines (absl, oneDNN, CUDA's E0000) stay off stderr in notebooks and
# scripts too, as in the CLI; TF_CPP_MIN_LOG_LEVEL=0 (or a level the user set) is respected.
quiet_tensorflow_by_default()

# public name -> the module that defines it
_API = {
    "extract": "stage1.extract", "ExtractConfig": "stage1.extract",
    "fit_head": "stage2.fit_head", "FitConfig": "stage2.fit_head", "HeadParams": "heads.models",
    "load_head": "heads.models",
    "export": ("deploy.api", "export_model"), "export_model": "deploy.api", "ExportConfig": "deploy.export_spec",
    "predict": "deploy.predict", "PredictResult": "deploy.predict",
    "evaluate": ("deploy.evaluate", "evaluate_model"), "evaluate_model": "deploy.evaluate",
    "EvaluateConfig": "deploy.evaluate", "EvaluateResult": "deploy.evaluate",
    "report": "reporting.report", "ReportConfig": "reporting.report",
    "load_features": "store.features", "load_views": "store.features",
    "load_any_head": "heads.auto", "depth_slices": "nets.depths",
    "write_head_figures": "reporting.plots", "write_comparison_figure": "reporting.plots",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the defining module on first use of a public name."""
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
