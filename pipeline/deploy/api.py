"""The Python API's entry points of this layer (``pipeline.export``): they check what needs no model
first and import TensorFlow only when those checks pass, so that ``from pipeline import export``
stays cheap and a usage error is quick."""

from __future__ import annotations

from pathlib import Path

from pipeline.deploy.export_spec import ExportConfig, check_export


def export_model(cfg: ExportConfig) -> Path:
    """Build the exported model and save it to ``cfg.out`` in ``cfg.format``; return the path.

    The head folder, ``--out`` and the format are checked (``check_export``) before
    ``pipeline.deploy.export`` (TensorFlow, Keras) is imported."""
    check_export(cfg)
    from pipeline.deploy.export import export_model as build_and_save

    return build_and_save(cfg)
