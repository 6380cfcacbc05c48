"""Acceptance on real data and weights from ../shared (skipped when absent).

MobileNet-0.75 with real ImageNet weights on cats_vs_dogs_small, logistic head: val accuracy >= 0.98.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "cats_vs_dogs_small"
WEIGHTS = SHARED / "weights" / "mobilenet_0.75_224_imagenet_notop.weights.h5"

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not (DATA.is_dir() and WEIGHTS.is_file()), reason="../shared data/weights not present"),
]


def test_mobilenet_075_logistic_on_real_cats_vs_dogs(tmp_path):
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.fit_head import FitConfig, fit_head
    from pipeline.core.util import sha256_file

    out = extract(ExtractConfig(base="mobilenet_0.75", data=str(DATA), weights=str(WEIGHTS.parent),
                                cache_dir=tmp_path, progress=False))
    import h5py

    with h5py.File(out, "r") as h5:
        assert h5["train"]["features"].shape == (2000, 768)
        assert h5["val"]["features"].shape == (1000, 768)
        assert h5.attrs["weights_sha256"] == sha256_file(WEIGHTS)
        rate = float(h5.attrs["images_per_second"])
    folder = fit_head(FitConfig(features=[out], head="logistic", cache_dir=tmp_path))
    m = json.loads((folder / "metrics.json").read_text())
    print(f"\nacceptance: val accuracy {m['val']['accuracy']:.4f}, extraction {rate:.1f} images/s, "
          f"logistic fit {m['fit_seconds']:.2f} s")
    assert m["val"]["accuracy"] >= 0.98
