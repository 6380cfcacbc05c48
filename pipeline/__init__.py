"""tlpipe: cache frozen-base image features once, fit many heads on them.

Python API (for notebooks); nothing heavy is imported until a name is used::

    from pipeline import ExtractConfig, FitConfig, extract, fit_head, evaluate, EvaluateConfig
    features = extract(ExtractConfig(base="vgg16", data="photos/"))
    head_dir = fit_head(FitConfig(features=[features], head="logistic"))

``extract``, ``fit_head``, ``export``, ``predict``, ``evaluate`` and ``report`` are the submodules
of those names, callable as their main function (``pipeline.extract.extract`` etc.), so that
``pipeline.extract.ExtractConfig`` keeps working too.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# submodule -> its main function, called when the submodule itself is called
_ENTRY = {"extract": "extract", "fit_head": "fit_head", "export": "export_model", "predict": "predict",
          "evaluate": "evaluate_model", "report": "report"}
# other public names -> the submodule that defines them
_NAMES = {
    "ExtractConfig": "extract", "FitConfig": "fit_head", "HeadParams": "heads", "ExportConfig": "export",
    "export_model": "export", "PredictResult": "predict", "EvaluateConfig": "evaluate",
    "EvaluateResult": "evaluate", "evaluate_model": "evaluate", "ReportConfig": "report",
    "load_features": "features", "load_head": "heads", "write_head_figures": "plots",
    "write_comparison_figure": "plots",
}
__all__ = sorted([*_ENTRY, *_NAMES])


class _CallableModule(types.ModuleType):
    """A submodule that can be called as its main function: ``pipeline.extract(cfg)``."""

    def __call__(self, *args, **kwargs):
        return getattr(self, _ENTRY[self.__name__.rpartition(".")[2]])(*args, **kwargs)


class _Package(types.ModuleType):
    """Makes the API submodules callable however (and whenever) they are first imported."""

    def __setattr__(self, name: str, value) -> None:
        if name in _ENTRY and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in _ENTRY:  # submodules imported before this package finished (none, normally)
    if f"{__name__}.{_name}" in sys.modules:
        setattr(sys.modules[__name__], _name, sys.modules[f"{__name__}.{_name}"])


def __getattr__(name: str):  # PEP 562: import on first use
    if name in _ENTRY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
