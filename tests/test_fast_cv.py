"""Issue #20, section 1: the grid heads' fast cross-validation keeps the tuning honest.

The fast path (warm-started paths, a reduced problem when features outnumber rows, k-NN
neighbours once per fold, the linear SVMs of all folds solved together) must choose what
scikit-learn's own ``GridSearchCV`` chooses with the estimators the heads used before
(``LogisticRegression``, ``CalibratedClassifierCV(LinearSVC)``, ``KNeighborsClassifier``), with
the same CV scores and the same accuracy.  Small synthetic problems; no timings here
(``benchmarks/bench_heads.py`` prints those).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.heads.fastcv import (SquaredHingeSVC, fold_splits, gram, penalties, reduced, sigmoid_proba,
                                   sigmoid_proba_sklearn, signs, solve_joint, solve_per_class)
from pipeline.heads.models import HeadParams, get_head


def _problem(n=150, k=3, dim=12, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (k, dim))
    y = np.arange(n) % k
    X = (centres[y] + rng.normal(0, spread, (n, dim))).astype(np.float32)
    return X, y.astype(np.int64)


def _reference(name: str, params: HeadParams):
    """The estimator each head cross-validated before the fast path, and its grid parameter."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import LinearSVC

    if name == "logistic":
        return LogisticRegression(max_iter=500, random_state=params.seed), "C", params.c_grid
    if name == "svm":
        svc = LinearSVC(random_state=params.seed, max_iter=20000, tol=1e-6)
        return CalibratedClassifierCV(svc, method="sigmoid", cv=3), "estimator__C", params.c_grid
    return KNeighborsClassifier(weights="distance", algorithm="brute"), "n_neighbors", params.k_grid


@pytest.mark.parametrize("name,k,dim,n", [("logistic", 3, 12, 150), ("logistic", 2, 300, 80),
                                          ("svm", 3, 12, 150), ("svm", 2, 300, 90),
                                          ("knn", 3, 12, 150), ("knn", 2, 300, 80)])
def test_fast_path_chooses_what_gridsearchcv_chooses(name, k, dim, n):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X, y = _problem(n, k, dim, seed=k + dim)
    Xt, yt = _problem(200, k, dim, seed=k + dim + 1)  # probe rows: predictions compared only
    params = HeadParams(seed=7)
    head = get_head(name)(k, params)
    rows = head.fit((X, y))
    prep = head.model[:-1]
    estimator, param, grid = _reference(name, params)
    assert set(grid) <= set(head.tuning["grid"]) and len(head.tuning["grid"]) <= len(grid) + 1
    grid = head.tuning["grid"]  # extended once when the choice was at an edge: the reference sees the same grid
    ref = GridSearchCV(estimator, {param: list(grid)}, scoring={"log_loss": "neg_log_loss", "acc": "accuracy"},
                       refit="log_loss", cv=StratifiedKFold(head.tuning["folds"], shuffle=True, random_state=7))
    ref.fit(prep.transform(X), y)
    assert [r["value"] for r in rows] == list(grid)
    assert head.tuning["chosen"] == grid[ref.best_index_]
    tol = 5e-3 if name == "svm" else 1e-3  # solvers' tolerances (L-BFGS vs liblinear; warm vs cold starts)
    np.testing.assert_allclose([r["cv_log_loss"] for r in rows], -ref.cv_results_["mean_test_log_loss"], rtol=tol,
                               atol=1e-4)
    np.testing.assert_allclose([r["cv_accuracy"] for r in rows], ref.cv_results_["mean_test_acc"],
                               atol=0 if name != "svm" else 1.5 / len(y))
    ours = head.predict_proba(Xt).argmax(1)
    theirs = ref.best_estimator_.predict(prep.transform(Xt))
    assert (ours == theirs).mean() >= (1.0 if name != "svm" else 0.99)


@pytest.mark.parametrize("k,weight", [(2, None), (3, None), (3, "balanced")])
def test_squared_hinge_svm_has_liblinears_optimum(k, weight):
    from sklearn.svm import LinearSVC

    X, y = _problem(240, k, 8, seed=3)
    if weight:
        keep = (y != 0) | (np.arange(len(y)) % 3 == 0)  # class 0 rarer
        X, y = X[keep], y[keep]
    for C in (0.01, 1.0):
        ours = SquaredHingeSVC(C=C, class_weight=weight, tol=1e-7).fit(X, y)
        ref = LinearSVC(C=C, class_weight=weight, tol=1e-8, max_iter=100_000).fit(X, y)
        a, b = ours.decision_function(X), ref.decision_function(X)
        np.testing.assert_allclose(a, b, atol=2e-3 * np.abs(b).max())
        np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


def test_each_class_of_a_multiclass_svm_is_solved_as_if_alone():
    """One-vs-rest classes share the products with X but not their L-BFGS: each column of the
    per-class solve is the solve of that column alone, the joint L-BFGS-B's solution, and the exact
    optimum (zero gradient)."""
    X, y = _problem(300, 4, 30, seed=12)
    classes = np.unique(y)
    S = signs(y, classes)
    Cw = penalties(y, np.arange(len(y)), classes, 0.5, "balanced", S)
    W = solve_per_class(X, S, Cw, None, True, 1e-8, 5000)
    np.testing.assert_allclose(W, solve_joint(X, S, Cw, None, True, 1e-8, 5000), atol=1e-3 * np.abs(W).max())
    for j in range(S.shape[1]):
        alone = solve_per_class(X, S[:, j:j + 1], Cw[:, j:j + 1], None, True, 1e-8, 5000)
        np.testing.assert_allclose(W[:, j], alone[:, 0], atol=1e-4 * np.abs(alone).max())
    Z = X.astype(np.float64) @ W[:-1] + W[-1]
    R = -2.0 * Cw * S * np.maximum(1.0 - S * Z, 0.0)
    G = W + np.vstack([X.T.astype(np.float64) @ R, R.sum(0)])
    assert np.abs(G).max() <= 1e-5 * np.abs(np.vstack([X.T @ (2.0 * Cw * S), (2.0 * Cw * S).sum(0)])).max()


@pytest.mark.parametrize("k,spread", [(2, 1.0), (4, 1.0), (3, 80.0)])
def test_sigmoid_calibration_is_calibratedclassifiercvs(k, spread):
    """The Newton-solved Platt sigmoid gives CalibratedClassifierCV's probabilities (its own L-BFGS-B
    fit, tolerance 1e-6), binary and one-vs-rest, decision values beyond ±30 rescaled as there."""
    rng = np.random.default_rng(k)
    y = np.arange(240) % k
    cols = 1 if k == 2 else k
    D = rng.normal(0, spread, (240, cols)) + spread * ((y[:, None] == np.arange(cols) + (k == 2)) - 0.5)
    probe = rng.normal(0, spread, (50, cols))
    ours = sigmoid_proba(D, y, np.arange(k), probe, D)
    theirs = sigmoid_proba_sklearn(D, y, np.arange(k), probe, D)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_warm_start_reaches_the_cold_optimum():
    X, y = _problem(200, 3, 10, seed=4)
    warm = SquaredHingeSVC(C=0.001, warm_start=True, tol=1e-7).fit(X, y)
    warm.set_params(C=1.0).fit(X, y)
    cold = SquaredHingeSVC(C=1.0, tol=1e-7).fit(X, y)
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-3 * np.abs(cold.coef_).max())


def test_reduced_problem_is_exact():
    """Features outnumber rows: the fit on the Gram-reduced rows is the fit on the full rows."""
    from sklearn.linear_model import LogisticRegression

    X, y = _problem(60, 2, 400, seed=5)
    X = (X - X.mean(0)) / X.std(0)
    K = gram(X)
    assert K is not None and gram(X[:, :60]) is None  # only when features outnumber rows
    tr, te = np.arange(45), np.arange(45, 60)
    Ztr, Zte = reduced(K, tr, te)
    assert Ztr.shape[1] <= 45
    full = LogisticRegression(C=0.1, tol=1e-10, max_iter=5000).fit(X[tr], y[tr])
    small = LogisticRegression(C=0.1, tol=1e-10, max_iter=5000).fit(Ztr, y[tr])
    np.testing.assert_allclose(small.predict_proba(Zte), full.predict_proba(X[te]), atol=1e-5)


def test_groups_stay_in_one_fold_and_are_recorded():
    X, y = _problem(120, 2, 6, seed=6)
    groups = np.arange(120) // 4  # e.g. 4 views of each photo
    groups = np.where(y == 0, groups, groups + 1000)  # a group holds one class
    for tr, te in fold_splits(y, 5, 0, groups):
        assert not set(groups[tr]) & set(groups[te])
    head = get_head("logistic")(2, HeadParams())
    head.fit((X, y), groups=groups)
    assert head.tuning["method"] == "5-fold stratified group CV on train"
    plain = get_head("logistic")(2, HeadParams())
    plain.fit((X, y))
    assert plain.tuning["method"] == "5-fold stratified CV on train"


def test_choice_at_the_grid_edge_extends_the_grid_once_and_says_so(caplog):
    X, y = _problem(120, 2, 10, seed=1, spread=0.3)  # well separated: the weakest regularisation wins
    head = get_head("logistic")(2, HeadParams(c_grid=(1e-5, 1e-4)))
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.models"):
        rows = head.fit((X, y))
    assert [r["value"] for r in rows] == [1e-5, 1e-4, 1e-3]  # one decade beyond the edge, once
    assert head.tuning["grid"] == [1e-5, 1e-4, 1e-3] and head.tuning["grid_extended_to"] == 1e-3
    assert head.tuning["chosen"] == 1e-3 and head.tuning["at_grid_edge"] is True
    assert "C=0.001 is the largest value of its grid [1e-05, 0.0001, 0.001] (extended once, to C=0.001)" in caplog.text
    assert rows[2]["cv_log_loss"] < rows[1]["cv_log_loss"]
    assert head.grid_edge((0.01, 0.1, 1.0), 1) is None
    assert "smallest" in head.grid_edge((0.01, 0.1, 1.0), 0)


def test_extension_that_does_not_help_keeps_the_choice():
    X, y = _problem(150, 3, 12, seed=2, spread=6.0)  # noisy: strong regularisation wins
    head = get_head("knn")(3, HeadParams(k_grid=(1, 3)))
    rows = head.fit((X, y))
    assert [r["value"] for r in rows] == [1, 3, 5] and head.tuning["grid_extended_to"] == 5
    best = min(range(3), key=lambda i: (rows[i]["cv_log_loss"], i))
    assert head.tuning["chosen"] == rows[best]["value"]
    assert head.cv_cache is None  # the neighbours are not kept with the head


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_only_when_asked(capsys, monkeypatch, enabled):
    import sys

    X, y = _problem(90, 3, 6, seed=8)
    head = get_head("knn")(3, HeadParams())
    head.progress = enabled
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar (else a log line per 15 s)
    head.fit((X, y))
    err = capsys.readouterr().err
    assert ("knn CV" in err) is enabled
    if enabled:
        assert "10/10" in err  # 5 folds: 10 pairs of folds multiplied (every k scored from them)


def test_knn_train_scores_are_leave_one_out():
    """Each training row's neighbours are the other rows (in-sample, every row is its own neighbour:
    accuracy 1, log loss 0); the same probabilities as KNeighborsClassifier fitted without the row."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import normalize

    X, y = _problem(60, 3, 6, seed=9)
    X[6] = X[3]  # a duplicate row (same class): only the row itself is left out, not its twin
    head = get_head("knn")(3, HeadParams(k_grid=(3,)))
    head.fit((X, y))
    loo = head.train_proba(X, y)
    assert np.allclose(head.predict_proba(X).argmax(1), y)  # in-sample: exact
    Z = normalize(X)
    for i in range(len(X)):
        rest = np.arange(len(X)) != i
        ref = KNeighborsClassifier(3, weights="distance", algorithm="brute").fit(Z[rest], y[rest])
        assert np.allclose(loo[i], ref.predict_proba(Z[i:i + 1])[0]), i
    assert (loo.argmax(1) != y).any()


@pytest.mark.parametrize("k_grid", [(3,), (1, 3, 5)])
def test_knn_leave_one_out_reuses_the_cv_neighbours(k_grid):
    """With a CV (several k), train_proba reuses each fold's neighbours in the other folds and
    searches only within the fold; without one (a single k), every pair of rows.  Both give the
    leave-one-out definition: KNeighborsClassifier fitted on all rows but the one scored (float64)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import normalize

    X, y = _problem(300, 3, 20, seed=11, spread=3.0)
    X[7] = X[4]  # duplicates of one class: a twin (not the row itself) is a neighbour at distance 0
    X[10] = X[4]  # (twins tie: of different classes, which of them is kept would decide the vote)
    head = get_head("knn")(3, HeadParams(k_grid=k_grid))
    head.fit((X, y))
    assert (head.loo_cache is not None) == (len(k_grid) > 1)
    loo = head.train_proba(X, y)
    Z, k = normalize(X.astype(np.float64)), head.chosen["k"]
    for i in range(len(X)):
        rest = np.arange(len(X)) != i
        ref = KNeighborsClassifier(k, weights="distance", algorithm="brute").fit(Z[rest], y[rest])
        np.testing.assert_allclose(loo[i], ref.predict_proba(Z[i:i + 1])[0], atol=1e-6, err_msg=str(i))
    np.testing.assert_allclose(head.train_proba(X.copy(), y), loo, atol=1e-6)  # another array: the full search


def test_knn_leave_one_out_with_a_fold_smaller_than_k():
    """Folds of unequal sizes, one with fewer rows than k (a small data set with the default k grid):
    the candidates of each fold differ in number (once a concatenation error); the scores are still
    leave-one-out's definition."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import normalize

    from pipeline.heads.fastcv import knn_leave_one_out, knn_neighbours

    X, y = _problem(47, 2, 12, seed=3, spread=2.0)
    Z = normalize(X.astype(np.float64)).astype(np.float32)
    sizes = [20, 15, 8, 4]  # the last fold: 4 rows, fewer than k = 7
    cuts = np.cumsum([0, *sizes])
    splits = [(np.setdiff1d(np.arange(47), np.arange(a, b)), np.arange(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
    k = 7
    found = knn_neighbours(Z, splits, k, lambda _: None)
    dist, idx = knn_leave_one_out(Z, k, splits, [(d, i) for d, i, *_ in found])
    for i in range(len(X)):
        rest = np.flatnonzero(np.arange(len(X)) != i)
        ref_d, ref_i = KNeighborsClassifier(k, algorithm="brute").fit(Z[rest], y[rest]).kneighbors(Z[i:i + 1])
        np.testing.assert_allclose(dist[i], ref_d[0], atol=1e-5, err_msg=str(i))
        assert sorted(rest[ref_i[0]]) == sorted(idx[i]), i
