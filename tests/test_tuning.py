"""Issue #12, section 3: nothing is tuned on val or test; the head folder says what tuned what.

Synthetic features files (no images, no base): fast.
"""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from pipeline.stage2.fit_head import FitConfig, fit_head, summary
from pipeline.heads.models import GRID_COLUMNS, HISTORY_COLUMNS, HeadParams, get_head, load_head

GRID_HEADS = ["logistic", "svm", "rbf-svm", "knn"]


def _blobs(n: int, k: int, dim: int, rng, spread: float = 1.0, centres=None):
    centres = rng.normal(0, 1.5, (k, dim)) if centres is None else centres
    y = np.arange(n) % k
    return (centres[y] + rng.normal(0, spread, (n, dim))).astype(np.float32), y.astype(np.int64), centres


def _features_file(path, k=3, n=(90, 45, 30), dim=12, weights="none", seed=0, spread=1.6):
    """A valid features file with overlapping Gaussian classes (train, val, test)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1.5, (k, dim))
    with h5py.File(path, "w") as h5:
        counts = {}
        for split, m in zip(("train", "val", "test"), n):
            X, y, _ = _blobs(m, k, dim, rng, spread, centres)
            g = h5.create_group(split)
            g["features"], g["labels"] = X, y
            g["ids"] = np.array([f"{split}/{i}" for i in range(m)], dtype=h5py.string_dtype())
            counts[split] = m
        h5.attrs.update({"schema_version": 1, "base": "vgg16", "weights": weights, "input_size": 32,
                         "pooling": "avg", "feature_size": dim, "class_names": json.dumps(list("abcde")[:k]),
                         "num_classes": k, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": f"fp{seed}", "source_fingerprint": "src", "data_source": "synthetic",
                         "split_spec": "60/25/15", "preprocessing": "p", "skipped": "[]", "skipped_count": 0,
                         "limit": 0})
    return path


class _Untouchable:
    """Stands in for the val arrays: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"val was used ({name})")

    def __len__(self):
        raise AssertionError("val was used (len)")

    def __getitem__(self, item):
        raise AssertionError("val was used (indexing)")

    def __array__(self, *a, **kw):
        raise AssertionError("val was used (as an array)")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    X, y, centres = _blobs(90, 3, 12, rng, spread=1.6)
    Xv, yv, _ = _blobs(45, 3, 12, rng, spread=1.6, centres=centres)
    probe, _, _ = _blobs(30, 3, 12, rng, spread=1.6, centres=centres)
    return (X, y), (Xv, yv), probe


@pytest.mark.parametrize("name", GRID_HEADS)
def test_grid_heads_never_touch_val(data, name):
    train, val, probe = data
    a = get_head(name)(3, HeadParams(seed=3))
    rows = a.fit(train, val)
    b = get_head(name)(3, HeadParams(seed=3))
    b.fit(train, (_Untouchable(), _Untouchable()))  # the old heads read val here
    assert a.chosen == b.chosen and a.tuning == b.tuning
    np.testing.assert_array_equal(a.predict_proba(probe), b.predict_proba(probe))
    t = a.tuning
    assert t["val_used_for_tuning"] is False
    assert t["method"] == f"{3 if name == 'rbf-svm' else 5}-fold stratified CV on train"
    assert [r["value"] for r in rows] == sorted(r["value"] for r in rows) and len(rows) >= 2
    best = min(rows, key=lambda r: r["cv_log_loss"])  # chosen by mean CV log loss, a proper score
    assert t["chosen"] == best["value"] and t["cv_log_loss"] == pytest.approx(best["cv_log_loss"])
    assert 0 <= t["cv_accuracy"] <= 1


@pytest.mark.parametrize("name", GRID_HEADS)
def test_grid_choice_matches_scikit_learn_cross_validation(data, name):
    """The chosen value is the one scikit-learn's own GridSearchCV picks on train alone."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    train, _, _ = data
    head = get_head(name)(3, HeadParams(seed=5))
    rows = head.fit(train)
    folds = head.tuning["folds"]
    template = head.make(rows[0]["value"])
    step = template.steps[-1][0]
    search = GridSearchCV(template, {f"{step}__{head.param_name}": [r["value"] for r in rows]},
                          scoring="neg_log_loss", cv=StratifiedKFold(folds, shuffle=True, random_state=5)).fit(*train)
    assert head.tuning["chosen"] == rows[int(search.best_index_)]["value"]
    np.testing.assert_allclose([r["cv_log_loss"] for r in rows], -search.cv_results_["mean_test_score"], rtol=0.05)


@pytest.mark.parametrize("k", [2, 3])
def test_dense_early_stops_on_train_slice_not_val(data, k):
    train, val, probe = data
    keep = train[1] < k
    train = (train[0][keep], train[1][keep])
    keep_v = val[1] < k
    val = (val[0][keep_v], val[1][keep_v])
    shuffled = (val[0][::-1].copy(), np.random.default_rng(0).permutation(val[1]))  # other rows, wrong labels
    params = dict(seed=4, epochs=12, patience=3, hidden=16, batch_size=16)
    a = get_head("dense")(k, HeadParams(**params))
    rows_a = a.fit(train, val)
    b = get_head("dense")(k, HeadParams(**params))
    rows_b = b.fit(train, shuffled)
    assert a.chosen == b.chosen and a.tuning == b.tuning
    np.testing.assert_allclose(a.predict_proba(probe), b.predict_proba(probe), rtol=0, atol=1e-7)
    assert [r["tune_loss"] for r in rows_a] == [r["tune_loss"] for r in rows_b]
    assert [r["val_loss"] for r in rows_a] != [r["val_loss"] for r in rows_b]  # val is still monitored
    assert a.tuning["param"] == "epochs" and a.tuning["val_used_for_tuning"] is False
    assert a.tuning["method"] == "early stopping on a 10% stratified slice of train"
    n_tune = a.tuning["tune_rows"]
    assert n_tune == max(k, int(np.ceil(0.1 * len(train[1]))))
    best = int(np.argmin([r["tune_loss"] for r in rows_a])) + 1
    assert a.tuning["chosen"] == a.chosen["best_epoch"] == best
    assert all(set(HISTORY_COLUMNS) == set(r) for r in rows_a)


def test_dense_tune_slice_is_stratified_and_seeded():
    head = get_head("dense")(2, HeadParams(seed=1))
    y = np.array([0] * 80 + [1] * 20)
    fit_idx, tune_idx = head.tune_split(y)
    assert len(tune_idx) == 10 and np.bincount(y[tune_idx]).tolist() == [8, 2]
    assert not set(fit_idx) & set(tune_idx) and len(fit_idx) + len(tune_idx) == 100
    np.testing.assert_array_equal(tune_idx, get_head("dense")(2, HeadParams(seed=1)).tune_split(y)[1])
    assert not np.array_equal(tune_idx, get_head("dense")(2, HeadParams(seed=2)).tune_split(y)[1])


def test_fewer_folds_when_a_class_is_small():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.array([0] * 37 + [1] * 3)
    X[y == 1] += 3
    head = get_head("logistic")(2, HeadParams())
    head.fit((X, y))
    assert head.tuning["folds"] == 3 and head.tuning["method"] == "3-fold stratified CV on train"
    knn = get_head("knn")(2, HeadParams(k_grid=(1, 5, 11, 21, 39)))
    rows = knn.fit((X, y))
    assert [r["value"] for r in rows] == [1, 5, 11, 21]  # 39 > the 26 rows of a CV training part
    single = get_head("logistic")(2, HeadParams())
    single.fit((X[:38], y[:38]))  # one row of class 1: no stratified CV possible
    assert single.tuning["folds"] == 0 and single.tuning["chosen"] == 1.0
    assert single.tuning["val_used_for_tuning"] is False and "none" in single.tuning["method"]


@pytest.mark.parametrize("name", ["logistic", "dense"])
def test_head_folder_schema(tmp_path, name):
    files = [_features_file(tmp_path / "a.h5", weights="none"),
             _features_file(tmp_path / "b.h5", weights="file:mobilenet_0.75_224_imagenet_notop.weights.h5")]
    folder = fit_head(FitConfig(features=[str(f) for f in files], head=name, out=tmp_path / name,
                                params=HeadParams(epochs=6, patience=2, hidden=8)))
    m = json.loads((folder / "metrics.json").read_text())
    assert set(m) == {"val", "test", "fit_seconds"}
    assert set(m["val"]) == set(m["test"]) == {"accuracy", "log_loss"}
    assert all(isinstance(v, float) for s in ("val", "test") for v in m[s].values())
    ev = json.loads((folder / "evaluation.json").read_text())
    for key in ("base", "head", "features", "weights", "data_source", "limit", "classes", "feature_size",
                "fit_seconds", "extract_images_per_second", "tuning", "splits", "chance", "untrained"):
        assert key in ev, key
    assert ev["weights"] == ["none", "file:mobilenet_0.75_224_imagenet_notop.weights.h5"]
    assert ev["data_source"] == "synthetic" and ev["limit"] == 0 and ev["head"] == name
    assert ev["feature_size"] == 24 and ev["base"] == "vgg16+vgg16"
    t = ev["tuning"]
    assert {"method", "param", "chosen", "cv_accuracy", "cv_log_loss", "val_used_for_tuning"} <= set(t)
    assert t["val_used_for_tuning"] is False
    for split in ("train", "val", "test"):
        s = ev["splits"][split]
        assert {"n", "accuracy", "balanced_accuracy", "log_loss", "roc_auc", "confusion_matrix", "per_class"} <= set(s)
        assert np.array(s["confusion_matrix"]).shape == (3, 3)
    assert m["val"]["accuracy"] == ev["splits"]["val"]["accuracy"]
    history = list(csv.reader((folder / "history.csv").open()))
    grid = list(csv.reader((folder / "grid.csv").open()))
    assert history[0] == HISTORY_COLUMNS and grid[0] == GRID_COLUMNS
    text = summary(folder)
    if name == "dense":
        assert len(history) == 1 + t["epochs_run"] and len(grid) == 1
        assert all(r[5] and r[6] for r in history[1:])  # val monitored every epoch
        assert t["param"] == "epochs" and f"best epoch {t['chosen']} of" in text
        assert "chosen by early stopping on a 10% stratified slice of train" in text
    else:
        assert len(history) == 1 and len(grid) == 1 + len(t["grid"])
        assert set(HeadParams().c_grid) <= set(t["grid"]) and len(t["grid"]) <= 4 + 1  # extended at most once
        assert [float(r[1]) for r in grid[1:]] == t["grid"] and (t["grid_extended_to"] is None) == (len(t["grid"]) == 4)
        assert {r[0] for r in grid[1:]} == {"C"} and all(r[2] and r[3] and r[4] and r[5] for r in grid[1:])
        assert f"C={t['chosen']} chosen by 5-fold stratified CV on train" in text
    assert "val and test not used for tuning" in text
    meta = json.loads((folder / "model" / "head.json").read_text())
    assert meta["tuning"] == t
    assert load_head(folder).predict_proba(np.zeros((2, 24), np.float32)).shape == (2, 3)


def test_report_reads_the_new_head_folder(tmp_path):
    from pipeline.reporting.report import collect

    f = _features_file(tmp_path / "syn.h5")
    fit_head(FitConfig(features=[str(f)], head="knn", out=tmp_path / "heads" / "syn-knn"))
    rows = collect(tmp_path / "heads")
    assert rows[0]["head"] == "knn" and rows[0]["base"] == "vgg16" and rows[0]["n_train"] == 90
    assert rows[0]["val_accuracy"] is not None and rows[0]["chance_val"] is not None


def test_folds_leave_calibrated_svms_three_rows_per_class():
    from pipeline.heads.models import cv_folds

    assert cv_folds(np.array([0] * 30 + [1] * 3), 5) == 3
    assert cv_folds(np.array([0] * 30 + [1] * 3), 5, min_per_class=3) == 0
    assert cv_folds(np.array([0] * 30 + [1] * 4), 5, min_per_class=3) == 4
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 4)
    X = (rng.normal(size=(34, 4)) + 3 * y[:, None]).astype(np.float32)
    head = get_head("svm")(2, HeadParams())
    head.fit((X, y))  # each CV training part keeps 3 rows of class 1 for the 3-fold calibration
    assert head.tuning["method"] == "4-fold stratified CV on train"
