"""learning-curve: validation accuracy against training-set size, on a small synthetic features file."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.core.errors import UsageError
from pipeline.stage2.learning_curve import parse_sizes, subsample


def _features_file(path, n_train=120, n_val=60, dim=16, k=3, seed=0):
    """A valid features file with separable Gaussian classes (no images, no base: fast)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (k, dim))
    with h5py.File(path, "w") as h5:
        counts = {}
        for split, n in (("train", n_train), ("val", n_val)):
            y = np.arange(n) % k
            X = (centres[y] + rng.normal(0, 1.0, (n, dim))).astype(np.float32)
            g = h5.create_group(split)
            g["features"] = X
            g["labels"] = y.astype(np.int64)
            g["ids"] = np.array([f"{split}/{i}" for i in range(n)], dtype=h5py.string_dtype())
            counts[split] = n
        h5.attrs.update({"schema_version": 1, "base": "vgg16", "weights": "none", "input_size": 32,
                         "pooling": "avg", "feature_size": dim, "class_names": json.dumps(["a", "b", "c"][:k]),
                         "num_classes": k, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": "x", "source_fingerprint": "y", "data_source": "synthetic",
                         "split_spec": "80/10/10", "preprocessing": "p", "skipped": "[]", "skipped_count": 0})
    return path


@pytest.fixture
def features(tmp_path):
    from pipeline.store.features import load_features

    path = _features_file(tmp_path / "syn.h5")
    load_features(path)  # the synthetic file must pass the real validation
    return path


def test_parse_sizes_caps_and_sorts():
    assert parse_sizes("50,100,500,1000,all", 300) == [50, 100, 300]
    assert parse_sizes("all", 42) == [42]
    for bad in ("abc", "1", ""):
        with pytest.raises(UsageError):
            parse_sizes(bad, 100)


def test_subsample_is_stratified_and_seeded():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = subsample(y, 20, seed=3)
    assert len(idx) == 20 and len(set(idx)) == 20
    assert set(y[idx]) == {0, 1, 2}  # the rare class is kept
    np.testing.assert_array_equal(idx, subsample(y, 20, seed=3))
    assert not np.array_equal(idx, subsample(y, 20, seed=4))
    np.testing.assert_array_equal(subsample(y, 500, seed=0), np.arange(100))


def test_learning_curve_cli(features, tmp_path):
    out = tmp_path / "curve.csv"
    r = CliRunner().invoke(cli, ["learning-curve", "--features", str(features), "--sizes", "6,30,500,all",
                                 "--seeds", "3", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["n_train", "seed", "val_accuracy", "val_log_loss", "train_accuracy", "fit_seconds"]
    sizes = sorted({int(r["n_train"]) for r in rows})
    assert sizes == [6, 30, 120]  # 500 and all both capped at the 120 training rows
    # 3 seeds at 6 and 30; all of train is the same sample whatever the seed: fitted once
    assert [(int(r["n_train"]), int(r["seed"])) for r in rows] == [(6, 0), (6, 1), (6, 2), (30, 0), (30, 1),
                                                                    (30, 2), (120, 0)]
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)
    summary = json.loads(out.with_suffix(".json").read_text())
    means = {s["n_train"]: s["mean"] for s in summary["sizes"]}
    assert set(means) == {6, 30, 120} and [s["runs"] for s in summary["sizes"]] == [3, 3, 1]
    assert [s["whole_train"] for s in summary["sizes"]] == [False, False, True]
    assert means[120] >= means[6] - 0.05 and means[120] >= 0.8  # more data does not hurt (much)
    assert "fitted once" in summary["note"]
    assert "n_train" in r.output and str(out) in r.output
    assert "all of train: one fit" in r.output
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in r.output


def test_seeds_only_change_the_subsample(features, tmp_path, monkeypatch):
    """The head's own seed is fixed (fit-head's default), so seeds vary the sample and nothing else."""
    from pipeline.heads.models import LogisticHead

    seeds = []
    original = LogisticHead.fit

    def spy(self, train, val=None):
        seeds.append(self.params.seed)
        return original(self, train)

    monkeypatch.setattr(LogisticHead, "fit", spy)
    r = CliRunner().invoke(cli, ["learning-curve", "--features", str(features), "--sizes", "30,all", "--seeds", "2",
                                 "--out", str(tmp_path / "c.csv")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seeds == [0, 0, 0]  # 30 with seeds 0 and 1, then all of train once


def test_learning_curve_default_output(features, tmp_path):
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli, ["learning-curve", "--features", str(features), "--sizes", "30,all", "--seeds", "1",
                                 "--head", "knn", "--cache-dir", str(cache)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (cache / "learning_curves" / "syn-knn.csv").is_file()
    assert (cache / "learning_curves" / "syn-knn.json").is_file()
    assert (cache / "learning_curves" / "syn-knn.png").is_file()
    r = CliRunner().invoke(cli, ["learning-curve", "--features", str(features), "--head", "forest"])
    assert r.exit_code == 2 and "unknown head" in r.output


def test_learning_curve_never_gives_val_to_the_head(features, tmp_path, monkeypatch):
    """The head tunes inside each training sample; the val split only scores it."""
    from pipeline.heads.models import LogisticHead

    seen = []
    original = LogisticHead.fit

    def spy(self, train, val=None):
        seen.append(val)
        return original(self, train)

    monkeypatch.setattr(LogisticHead, "fit", spy)
    r = CliRunner().invoke(cli, ["learning-curve", "--features", str(features), "--sizes", "30,all", "--seeds", "1",
                                 "--out", str(tmp_path / "c.csv")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen == [None, None]
    assert "never used for tuning" in json.loads((tmp_path / "c.json").read_text())["note"]
