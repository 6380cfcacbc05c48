"""What ``tlpipe export`` is asked to do, checked without TensorFlow: the config and every refusal
that needs no model (the head folder, ``--out``, a format the head cannot take), so that a usage
error ends before TensorFlow starts (``pipeline.deploy.api.export_model``, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UsageError
from pipeline.core.safety import check_out_path
from pipeline.heads.folder import read_head_info

FORMATS = ("keras", "savedmodel", "tflite")
CUSTOM_LAYER_HEADS = ("svm", "rbf-svm", "knn")  # their .keras files need 'import pipeline.deploy.export' to load


@dataclass
class ExportConfig:
    """Everything ``export_model`` needs."""

    head: Path  # a fitted head folder (cache/heads/<features>-<head>)
    out: Path
    base: str | None = None  # must match the head's base when given
    weights: str | None = None  # default: what the features file recorded
    cache_dir: Path = Path("cache")
    format: str = "keras"  # keras | savedmodel | tflite
    force: bool = False  # replace an existing --out


def check_out(out: str | Path, fmt: str, force: bool = False) -> Path:
    """Refuse an ``--out`` that does not fit ``fmt``, or that exists without ``force``."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}': {', '.join(FORMATS)}")
    want = {"keras": ".keras", "tflite": ".tflite"}.get(fmt)
    if want and out.suffix != want:
        raise UsageError(f"--out must end in {want} for --format {fmt}, not {out.name}")
    if fmt == "savedmodel" and out.suffix in (".keras", ".tflite", ".h5", ".pb", ".zip"):
        raise UsageError(f"--format savedmodel writes a directory: --out must be a folder name, not {out.name}")
    check_out_path(out, "folder" if fmt == "savedmodel" else "file")
    if not force:
        for path in output_paths(out, fmt):
            if path.exists() or path.is_symlink():
                raise UsageError(f"{path} exists; pass --force to replace it")
    return out


def output_paths(out: Path, fmt: str) -> list[Path]:
    """Every path the export writes (the model and, for TFLite, its sidecars)."""
    if fmt == "tflite":
        return [out, out.with_suffix(".json"), out.with_suffix(".labels.txt")]
    return [out]


def check_export(cfg: ExportConfig) -> Path:
    """Every refusal that needs no TensorFlow: the head folder, ``--out``, and a format the head
    cannot take (TFLite and the custom-layer heads). Returns ``--out`` as a Path."""
    head_dir = Path(cfg.head)
    if not (head_dir / "model" / "head.json").is_file() and not (head_dir / "head.json").is_file():
        raise UsageError(f"{head_dir} is not a fitted head folder (no head.json); run 'tlpipe fit-head' first")
    out = check_out(cfg.out, cfg.format, cfg.force)
    head = read_head_info(head_dir)[1].get("head")
    if cfg.format == "tflite" and head in CUSTOM_LAYER_HEADS:
        raise UsageError(f"--format tflite supports the logistic and dense heads, not {head} (its float64 "
                         f"layers need TensorFlow ops that TFLite lacks); use --format savedmodel")
    return out


def custom_layer_note(head: str, fmt: str) -> str | None:
    """One line for heads whose ``.keras`` file needs tlpipe to load, else None."""
    if head in CUSTOM_LAYER_HEADS and fmt == "keras":
        return (f"note: the {head} head uses tlpipe's custom layers: load this .keras file after "
                f"'import pipeline.deploy.export' (or export with --format savedmodel to run it without tlpipe)")
    return None
