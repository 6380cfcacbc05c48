"""Classify image files with a model written by ``tlpipe export``.

Images are decoded with ``pipeline.data.images.decode_image`` at the base's input size (the
same decode and resize as extraction, so the exported model reproduces the head's
predictions on cached features); the model's own Resizing layer is then the identity.
A model fused from bases at several input sizes gets the image decoded at each size.
Unreadable files are reported with their reason and do not stop the run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError, NotAModel, UsageError
from pipeline.core.util import sha256_file
from pipeline.nets.graph import METADATA_MEMBER
from pipeline.stage1.runtime import compile_keras_model, resolve
from pipeline.store.features import is_features_file

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """Predictions (one dict per image) and failures (path, reason)."""

    class_names: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    runtime: str = "keras"  # which runtime computed them (pipeline.stage1.runtime)
    precision: str = "f32"


def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to their image files, sorted."""
    from pipeline.data.images import IMAGE_EXTENSIONS  # OpenCV: not before the one-line checks

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UsageError(f"no image files in folder {path} (searched its subfolders for "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            out += found
        elif not path.exists() and not path.is_symlink():
            raise UsageError(f"no such file or folder: {path}")
        else:
            out.append(path)  # files that cannot be decoded are reported as failures
    return out


def check_model_path(path: str | Path) -> Path:
    """The model path, checked before anything slow is imported (one line for a wrong path)."""
    path = Path(path)
    if path.is_dir() and ((path / "model" / "head.json").is_file() or (path / "head.json").is_file()):
        raise UsageError(f"--model {path} is a head folder: run 'tlpipe export --head {path} --out "
                         f"{path.name}.keras' first, then --model {path.name}.keras")
    if path.is_dir() or path.suffix == ".tflite":
        raise UsageError(f"--model {path}: tlpipe reads the .keras file that 'tlpipe export' writes; a "
                         "SavedModel folder or a TFLite file runs without tlpipe (docs/guide/deploy.md, Export)")
    if not path.is_file():
        raise UsageError(f"model file not found: {path} (make one with 'tlpipe export')")
    return path


def check_model_file(path: str | Path) -> Path:
    """``check_model_path``, then the file's kind, still before anything slow is imported: a features file
    or any other file that is not a ``.keras`` zip is one line (exit 2)."""
    path = check_model_path(path)
    how = "export a head first: tlpipe export --head HEAD_DIR --out X.keras"
    if is_features_file(path):
        raise NotAModel(f"--model {path} is a tlpipe features file; {how}")
    try:
        with zipfile.ZipFile(path) as zf:
            keras_zip = "config.json" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        keras_zip = False
    if not keras_zip:
        raise NotAModel(f"--model {path} is not a model written by 'tlpipe export' (a .keras file); {how}")
    return path


def zip_metadata(path: str | Path) -> dict[str, Any] | None:
    """Class names and provenance (``tlpipe.json``) read from a ``.keras`` zip without loading the model;
    None for older exports, which kept them in the model's last layer."""
    path = check_model_file(path)
    with zipfile.ZipFile(path) as zf:
        if METADATA_MEMBER not in zf.namelist():
            return None
        return json.loads(zf.read(METADATA_MEMBER))


def load_exported(path: str | Path):
    """Load a ``.keras`` model written by ``tlpipe export``; return ``(model, metadata)``."""
    path = check_model_file(path)
    import keras

    import pipeline.deploy.export  # noqa: F401 - registers the custom layers (svm, rbf-svm, knn; old exports)
    import pipeline.nets.extractor  # noqa: F401
    from pipeline.deploy.export import import_hub_layers, read_metadata

    import_hub_layers(path)  # a KerasHub base: its layers register when keras_hub is imported
    try:
        model = keras.saving.load_model(path)
    except Exception as exc:  # noqa: BLE001
        raise NotAModel(f"could not load {path} as a Keras model: {str(exc).strip().splitlines()[0]}") from None
    with zipfile.ZipFile(path) as zf:  # load_model read it, so it is a zip
        member = zf.read(METADATA_MEMBER) if METADATA_MEMBER in zf.namelist() else None
    return model, json.loads(member) if member is not None else read_metadata(model)  # else the old form


def predict(model_path: str | Path, inputs: list[str | Path], batch_size: int = 32,
            workers: int = 0, runtime: str = "auto", precision: str = "auto") -> PredictResult:
    """Predict every image; raise ``DataError`` only when none could be predicted.

    ``runtime``/``precision`` as for extraction (``pipeline.stage1.runtime``): with OpenVINO the exported
    Keras model is converted once (cached, keyed by the file's sha256) and run on the CPU.
    """
    from pipeline.data.images import DecodeError, decode_image  # OpenCV: not before the one-line checks

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    resolve(runtime, precision, "off")  # one line, exit 2, before anything slow
    check_model_path(model_path)
    files = list_inputs(inputs)
    if not files:
        raise UsageError("no images given (pass image files or folders)")
    check_model_file(model_path)  # a features file or another file: one line, before TensorFlow
    model, meta = load_exported(model_path)
    # one input per input size (fused bases at several sizes): each sees the image resized as at extraction
    sizes = [int(s) for s in meta.get("input_sizes") or [meta["input_size"]]]
    forward, result_runtime, result_precision = compile_keras_model(
        model, runtime, precision, key={"exported_sha256": sha256_file(model_path)}, input_sizes=sizes)
    result = PredictResult(class_names=meta["class_names"], runtime=result_runtime, precision=result_precision)

    def decode(path: Path):
        try:
            return [decode_image(path, size) for size in sizes], None
        except DecodeError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, exc.strerror or type(exc).__name__

    with ThreadPoolExecutor(workers or max(1, min(4, os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            good, arrays = [], []
            for path, (arr, why) in zip(chunk, pool.map(decode, chunk)):
                if arr is None:
                    result.failed.append({"path": str(path), "reason": why})
                else:
                    good.append(path)
                    arrays.append(arr)
            if not arrays:
                continue
            batch = [np.stack([a[i] for a in arrays]) for i in range(len(sizes))]
            proba = np.asarray(forward(batch if len(sizes) > 1 else batch[0]), dtype=np.float64)
            for path, p in zip(good, proba):
                k = int(p.argmax())
                result.rows.append({"path": str(path), "class": result.class_names[k],
                                    "probability": float(p[k]),
                                    "probabilities": {c: float(v) for c, v in zip(result.class_names, p)}})
    if not result.rows:
        reasons = "; ".join(f"{f['path']}: {f['reason']}" for f in result.failed[:5])
        raise DataError(f"no image could be predicted ({len(result.failed)} unreadable: {reasons})")
    return result


def is_prediction_file(path: Path) -> bool:
    """True for a file that ``tlpipe predict --out`` wrote (csv, json or table), from its first line."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
        second = fh.readline()
    if first.startswith("path,class,probability,") and first.rstrip("\n").endswith(",error"):
        return True
    if first == "{\n" and second.startswith('  "classes": '):
        return True
    return first.split() == ["path", "class", "probability"]


def format_result(result: PredictResult, fmt: str) -> str:
    """``table`` (for people), ``csv`` (one row per image, failures with an error column) or ``json``."""
    if fmt == "json":
        return json.dumps({"classes": result.class_names, "predictions": result.rows,
                           "failed": result.failed}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        cols = ["path", "class", "probability", *[f"p_{c}" for c in result.class_names], "error"]
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in result.rows:
            w.writerow([r["path"], r["class"], f"{r['probability']:.6f}",
                        *[f"{r['probabilities'][c]:.6f}" for c in result.class_names], ""])
        for f in result.failed:
            w.writerow([f["path"], "", "", *[""] * len(result.class_names), f["reason"]])
        return buf.getvalue()
    if fmt != "table":
        raise UsageError(f"unknown format '{fmt}': table, csv or json")
    width = max([len(r["path"]) for r in result.rows + result.failed] + [4])
    lines = [f"{'path':{width}s}  {'class':15s} probability"]
    lines += [f"{r['path']:{width}s}  {r['class']:15s} {r['probability']:.4f}" for r in result.rows]
    if result.failed:
        lines.append(f"\nunreadable ({len(result.failed)}):")
        lines += [f"  {f['path']}: {f['reason']}" for f in result.failed]
    return "\n".join(lines) + "\n"
