"""Characterisation test: pins what tlpipe computes, so that a refactor cannot move it.

A fixed synthetic folder (two classes, deterministic PNGs), a small base with ``--weights none`` at
32 px: extract, fit every head, export two of them, predict. The test compares with
``tests/golden/characterisation.json``:

- the sha256 of every feature dataset (bit for bit) and the file's fingerprint;
- each head's ``metrics.json``, and the tuning and per-split scores of ``evaluation.json``;
- the exported models' probabilities on fixed images.

Float results can differ in the last bits on another CPU or TensorFlow build. The sha256s are
compared bit for bit only where the golden was recorded (same CPU model and TF version); elsewhere
the recorded feature summaries and probabilities are compared at 1e-4.

A deliberate change of behaviour regenerates the golden::

    TLPIPE_REGEN_GOLDEN=1 python -m pytest tests/test_characterisation.py

and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_folder

GOLDEN = Path(__file__).parent / "golden" / "characterisation.json"
HEADS = ("logistic", "svm", "knn", "dense", "rbf-svm")
EXPORTED = ("logistic", "dense")
TIMING_KEYS = {"fit_seconds", "seconds", "elapsed", "fit_time", "predict_seconds", "created",
               "images_per_second", "timing", "extract_seconds"}

# One known config's fingerprint: if it changes, every user's features cache goes stale.
PINNED_FIELDS = dict(
    base="mobilenet", weights="imagenet", weights_sha256="0" * 64, input_size=224, pooling="avg",
    preprocessing="keras.applications.mobilenet.preprocess_input", source_fingerprint="f" * 64,
    split="80/10/10", version="0.1.0", resize="antialiased-bilinear-rounded-v2", runtime="keras",
    precision="f32")
PINNED_FINGERPRINT = "79ef682c479228082b23b6a7521d16ed4fd0e12060ef82d0f007945954447dc2"


def _machine() -> str:
    """CPU model, the vector extensions oneDNN picks kernels by, and TensorFlow: features are compared
    bit for bit only between runs with the same string (one "AMD EPYC" name covers AVX2-only and
    AVX-512 hosts, whose float sums differ in the last bits)."""
    import tensorflow as tf

    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not flags:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{cpu} [{' '.join(isa)}] | tf {tf.__version__}"


def _strip_timings(value):
    if isinstance(value, dict):
        return {k: _strip_timings(v) for k, v in value.items()
                if k not in TIMING_KEYS and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_strip_timings(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def _features_record(path: Path) -> dict:
    rec: dict = {"datasets": {}, "summary": {}}
    with h5py.File(path, "r") as h5:
        rec["fingerprint"] = h5.attrs["fingerprint"]
        rec["source_fingerprint"] = h5.attrs["source_fingerprint"]
        for split in ("train", "val", "test"):
            for name in ("features", "labels", "ids"):
                ds = h5[split][name]
                arr = ds.asstr()[...] if ds.dtype.kind == "O" else ds[...]
                blob = "\n".join(arr).encode() if ds.dtype.kind == "O" else np.ascontiguousarray(arr).tobytes()
                rec["datasets"][f"{split}/{name}"] = hashlib.sha256(blob).hexdigest()
            feats = h5[split]["features"][...].astype(np.float64)
            rec["summary"][split] = [round(float(feats.sum()), 4), round(float(np.abs(feats).sum()), 4),
                                     round(float(feats[:, ::7].sum()), 4)]
    return rec


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Extract, fit every head, export two, predict: what the golden records."""
    from pipeline import (ExportConfig, ExtractConfig, FitConfig, export, extract, fit_head, predict)

    root = make_folder(tmp_path_factory.mktemp("char") / "shapes", classes=("ant", "bee"), per_class=20,
                       size=(24, 20))
    cache = tmp_path_factory.mktemp("cache")
    features = extract(ExtractConfig(base="vgg16", data=str(root), weights="none", input_size=32,
                                     batch_size=8, cache_dir=cache, progress=False, runtime="keras",
                                     precision="f32"))
    record = {"machine": _machine(), "features": _features_record(features), "heads": {}, "proba": {}}
    images = sorted(str(p) for p in root.rglob("*.png"))[::5]
    for head in HEADS:
        folder = fit_head(FitConfig(features=[features], head=head, cache_dir=cache))
        metrics = json.loads((folder / "metrics.json").read_text())
        evaluation = json.loads((folder / "evaluation.json").read_text())
        record["heads"][head] = _strip_timings({"metrics": metrics, "tuning": evaluation["tuning"],
                                                "splits": evaluation["splits"]})
        if head in EXPORTED:
            model = export(ExportConfig(head=folder, out=cache / f"{head}.keras", cache_dir=cache))
            rows = predict(model, images, runtime="keras").rows
            record["proba"][head] = [[round(float(p), 6) for p in _row_proba(r)] for r in rows]
    return record


def _row_proba(row) -> list[float]:
    probs = row["probabilities"] if isinstance(row, dict) else row.probabilities
    return list(probs.values()) if isinstance(probs, dict) else list(probs)


def test_pinned_fingerprint():
    from pipeline.store.features import extraction_fingerprint

    assert extraction_fingerprint(**PINNED_FIELDS) == PINNED_FINGERPRINT


def test_behaviour_matches_golden(run):
    if os.environ.get("TLPIPE_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden regenerated")
    golden = json.loads(GOLDEN.read_text())
    assert run["features"]["fingerprint"] == golden["features"]["fingerprint"]
    assert run["features"]["source_fingerprint"] == golden["features"]["source_fingerprint"]
    for split in ("train", "val", "test"):
        for name in ("labels", "ids"):
            key = f"{split}/{name}"
            assert run["features"]["datasets"][key] == golden["features"]["datasets"][key], key
    if run["machine"] == golden["machine"]:
        assert run["features"]["datasets"] == golden["features"]["datasets"]
    np.testing.assert_allclose(
        [run["features"]["summary"][s] for s in ("train", "val", "test")],
        [golden["features"]["summary"][s] for s in ("train", "val", "test")], rtol=1e-4)
    assert sorted(run["heads"]) == sorted(golden["heads"])
    for head in HEADS:
        assert _close(run["heads"][head], golden["heads"][head]), head
    for head in EXPORTED:
        np.testing.assert_allclose(run["proba"][head], golden["proba"][head], atol=1e-4, err_msg=head)


def _close(a, b) -> bool:
    """Equal structures; floats within 1e-4 (absolute)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(a) == sorted(b) and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-4
    return a == b
