"""Fast cross-validation for the grid heads: the same folds, grid and choice rule as
scikit-learn's ``GridSearchCV`` (best mean log loss over stratified, shuffled folds of train),
with fewer and cheaper fits:

- each fold walks its grid once, from strong to weak regularisation, warm-starting every fit
  from the previous solution (logistic: ``LogisticRegression(warm_start=True)``; linear SVM:
  each of the 3 inner calibration SVMs);
- logistic, when the features outnumber the rows of a fold (e.g. several depths concatenated):
  an exact reduced problem (the L2 solution lies in the span of the fold's training rows: one
  Gram matrix ``X Xᵀ`` of train, an eigendecomposition per fold, ``rows x rows`` instead of
  ``rows x features``);
- k-NN finds each fold's neighbours once, for the largest k, and scores every k from them; the
  distances come from one float32 product per pair of folds (a fold's training rows are the other
  folds' rows, so each block serves both folds: half the products of a search per fold);
- folds (k-NN: blocks) run in parallel threads on every core (one BLAS thread each);
- the linear SVM is a squared-hinge L2 SVM (LinearSVC's objective, bias regularised as in
  liblinear) solved by L-BFGS, so that it can be warm-started; on large one-vs-rest problems
  each class is its own L-BFGS (own curvature pairs, exact line search on the piecewise-quadratic
  objective, its own stopping) while all classes share one matrix product per step; its sigmoid
  calibration is the one ``CalibratedClassifierCV`` fits (3 stratified inner folds, averaged;
  Platt's objective solved by Newton's method), per grid value, applied to decision values
  computed once per SVM; the 3 inner SVMs of every fold (15 with 5 folds) run in parallel, not
  the 5 folds.

Only train rows are used; val and test never reach this module.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

log = logging.getLogger(__name__)

Fold = tuple[np.ndarray, np.ndarray]
# per fold: one (test accuracy, test log loss, train accuracy, train log loss) per grid value
FoldScores = list[tuple[float, float, float, float]]
GRAM_RATIO = 1.25  # reduced (Gram) problem when features > GRAM_RATIO x training rows


def fold_splits(y: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> list[Fold]:
    """The CV folds of train: ``StratifiedKFold`` (shuffled, seeded) as ``GridSearchCV`` used them,
    or ``StratifiedGroupKFold`` when ``groups`` is given (rows of one group, e.g. the views of one
    photo, stay in one fold)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    dummy = np.zeros((len(y), 1))
    if groups is None:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(dummy, y))
    groups = np.asarray(groups)
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(dummy, y, groups))


def scores(proba: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) as ``GridSearchCV``'s ``accuracy`` and ``neg_log_loss`` scorers give them."""
    from sklearn.metrics import log_loss

    return float((classes[proba.argmax(1)] == y).mean()), float(log_loss(y, proba, labels=classes))


def workers(n_tasks: int) -> int:
    """Threads for the folds: one per core, at most one per fold."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_tasks, cores))


class Progress:
    """Counts fits (fold x grid value) from any thread: a tqdm bar (i/n, rate, ETA) on a terminal, a log
    line at most every 15 s when stderr is not one (``pipeline.core.util.progress_bar``); silent when
    ``enabled`` is false."""

    def __init__(self, name: str, total: int, enabled: bool):
        from pipeline.core.util import progress_bar

        self.name, self.total, self.enabled = name, total, enabled
        self.bar = progress_bar(total=total, desc=f"{name} CV", enabled=enabled, unit="fit")
        self.lock = threading.Lock()

    def tick(self, fold: int | None, what: str) -> None:
        """One more fit done (``fold``: its fold, or None when ``what`` says it)."""
        where = what if fold is None else f"fold {fold + 1}, {what}"
        with self.lock:
            self.bar.set_postfix_str(where, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_folds(task: Callable[[int, Fold, Callable[[str], None]], FoldScores], splits: Sequence[Fold],
              progress: Progress) -> np.ndarray:
    """``task(i, fold, tick)`` on every fold, folds in parallel threads (BLAS on one thread each
    while more than one runs); the scores as an array ``[fold, grid value, 4]``."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    n = workers(len(splits))

    def one(i: int, fold: Fold) -> FoldScores:
        return task(i, fold, lambda what: progress.tick(i, what))

    try:
        if n == 1:
            out = [one(i, f) for i, f in enumerate(splits)]
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                out = Parallel(n_jobs=n, prefer="threads")(delayed(one)(i, f) for i, f in enumerate(splits))
    finally:
        progress.close()
    return np.asarray(out, dtype=np.float64)


def gram(X: np.ndarray) -> np.ndarray | None:
    """``X Xᵀ`` (float64) when the features outnumber the rows enough for the reduced problem to pay."""
    if X.shape[1] <= GRAM_RATIO * X.shape[0]:
        return None
    X64 = np.asarray(X, dtype=np.float64)
    return X64 @ X64.T


def reduced(K: np.ndarray, fit_rows: np.ndarray, *others: np.ndarray, bias: float = 0.0) -> list[np.ndarray]:
    """Exact low-dimensional coordinates for an L2-regularised linear model fitted on ``fit_rows``.

    With ``X_fit = U S Vᵀ``, a solution ``w`` lies in ``span(V)`` (the penalty removes any other
    part), so ``w = V z``, ``||w|| = ||z||`` and ``X w = (X V) z``: the rows ``fit_rows`` become
    ``U S`` and any other rows ``X_o V = K[o, fit] U S⁻¹``, all from the Gram matrix ``K``.
    ``bias`` adds a constant feature of that value (liblinear's regularised intercept: 1)."""
    Kff = K[np.ix_(fit_rows, fit_rows)] + bias * bias
    lam, U = np.linalg.eigh(Kff)
    keep = lam > max(lam.max(), 0.0) * len(fit_rows) * np.finfo(np.float64).eps
    root = np.sqrt(lam[keep])
    P = U[:, keep] / root
    return [U[:, keep] * root] + [(K[np.ix_(rows, fit_rows)] + bias * bias) @ P for rows in others]


def logistic_task(X, y, K, grid, make, train_scores: bool):
    """Fold task of the logistic head: one warm-started ``LogisticRegression`` walks the C grid."""

    def task(i: int, fold: Fold, tick) -> FoldScores:
        tr, te = fold
        Xtr, Xte = (X[tr], X[te]) if K is None else reduced(K, tr, te)
        est = make(grid[0]).set_params(warm_start=True)
        out = []
        for c in grid:
            est.set_params(C=c).fit(Xtr, y[tr])
            test = scores(est.predict_proba(Xte), y[te], est.classes_)
            train = scores(est.predict_proba(Xtr), y[tr], est.classes_) if train_scores else (np.nan, np.nan)
            out.append(test + train)
            tick(f"C={c}")
        return out

    return task


def knn_vote(dist: np.ndarray, labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """``KNeighborsClassifier(weights="distance")``'s probabilities from the ``k`` nearest of sorted
    neighbours (``dist``, their class codes ``labels``): a zero distance takes the whole vote."""
    with np.errstate(divide="ignore"):
        w = 1.0 / dist[:, :k]
    inf = np.isinf(w)
    rows = inf.any(1)
    w[rows] = inf[rows]
    votes = labels[:, :k]
    proba = np.stack([(w * (votes == c)).sum(1) for c in range(n_classes)], axis=1)
    total = proba.sum(1, keepdims=True)
    return proba / np.where(total == 0, 1.0, total)


def nearest(d2: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest squared distances along ``axis`` (unsorted) and their positions, with
    ``axis`` moved last; all of them when there are no more than ``k``."""
    d2 = d2 if axis == 1 else d2.T
    if d2.shape[1] <= k:
        pos = np.broadcast_to(np.arange(d2.shape[1]), d2.shape)
    else:
        pos = np.argpartition(d2, k - 1, axis=1)[:, :k]
    return np.take_along_axis(d2, pos, axis=1), pos


KNN_CHUNK = 1024  # rows of a fold multiplied at once (a chunk x fold block of distances in memory)


def knn_neighbours(X: np.ndarray, splits: Sequence[Fold], kmax: int, tick: Callable[[str], None]) -> list[tuple]:
    """For every fold's test rows, their ``kmax`` nearest training rows of that fold: (sorted
    Euclidean distances, row indices into ``X``), as brute-force search finds them, but each pair
    of folds multiplied once (a fold's training rows are the other folds' rows; a block gives both
    folds their candidates): half the products of one search per fold.  Blocks run in threads,
    BLAS on one thread each."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    parts = [np.sort(te) for _, te in splits]
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64).astype(X.dtype)
    by_rows: dict[tuple[int, int], dict[int, tuple]] = {}  # (a, b) -> chunk start -> candidates of a's rows
    by_cols: list[list[tuple]] = [[] for _ in parts]  # b -> candidates of all of b's rows, one per block
    lock = threading.Lock()

    def block(a: int, b: int, lo: int) -> None:
        ra, rb = parts[a][lo:lo + KNN_CHUNK], parts[b]
        d2 = sq[ra][:, None] + sq[rb][None, :] - 2.0 * (X[ra] @ X[rb].T)
        np.maximum(d2, 0.0, out=d2)
        da, pa = nearest(d2, kmax, 1)
        db, pb = nearest(d2, kmax, 0)
        with lock:
            by_rows.setdefault((a, b), {})[lo] = (da, rb[pa])
            by_cols[b].append((db, ra[pb]))
        tick(f"folds {a + 1}-{b + 1}")

    jobs = [(a, b, lo) for a in range(len(parts)) for b in range(a + 1, len(parts))
            for lo in range(0, len(parts[a]), KNN_CHUNK)]
    with threadpool_limits(limits=1, user_api="blas"):
        Parallel(n_jobs=workers(len(jobs)), prefer="threads")(delayed(block)(*job) for job in jobs)
    out = []
    for f in range(len(parts)):
        cands = list(by_cols[f])
        for (a, _), chunks in sorted(by_rows.items()):
            if a == f:
                cands.append(tuple(np.concatenate([chunks[lo][j] for lo in sorted(chunks)]) for j in (0, 1)))
        d2, ind = (np.concatenate([c[j] for c in cands], axis=1) for j in (0, 1))
        order = np.lexsort((ind, d2))[:, :kmax]  # by distance, ties by row
        out.append((np.sqrt(np.take_along_axis(d2, order, 1).astype(np.float64)), np.take_along_axis(ind, order, 1)))
    return out


NEAR_ZERO = 1e-3  # squared distances below this are recomputed in float64 (duplicates: exactly 0)


def within_parts(X: np.ndarray, parts: Sequence[np.ndarray], k: int) -> list[tuple]:
    """For each part (sorted row indices into ``X``), each of its rows' ``k`` nearest *other* rows of
    the same part: (squared distances, row indices), unsorted.  Each pair of chunks of a part is
    multiplied once (it gives both chunks their candidates); the row itself is left out.  Blocks
    run in threads, BLAS on one thread each."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64).astype(X.dtype)
    chunks = [[p[lo:lo + KNN_CHUNK] for lo in range(0, len(p), KNN_CHUNK)] for p in parts]
    got: dict[tuple[int, int], list[tuple]] = {}  # (part, chunk) -> candidates of the chunk's rows
    lock = threading.Lock()

    def block(f: int, i: int, j: int) -> None:
        ra, rb = chunks[f][i], chunks[f][j]
        d2 = sq[ra][:, None] + sq[rb][None, :] - 2.0 * (X[ra] @ X[rb].T)
        np.maximum(d2, 0.0, out=d2)
        if i == j:
            np.fill_diagonal(d2, np.inf)  # not its own neighbour
        found = [(i, nearest(d2, k, 1), rb)] + ([] if i == j else [(j, nearest(d2, k, 0), ra)])
        with lock:
            for c, (dist, pos), rows in found:
                got.setdefault((f, c), []).append((dist, rows[pos]))

    jobs = [(f, i, j) for f, cs in enumerate(chunks) for i in range(len(cs)) for j in range(i, len(cs))]
    with threadpool_limits(limits=1, user_api="blas"):
        Parallel(n_jobs=workers(len(jobs)), prefer="threads")(delayed(block)(*job) for job in jobs)
    return [tuple(np.concatenate([np.concatenate([c[j] for c in got[(f, i)]], axis=1) for i in range(len(cs))])
                  for j in (0, 1)) for f, cs in enumerate(chunks)]


def knn_leave_one_out(X: np.ndarray, k: int, splits: Sequence[Fold] | None = None,
                      found: list[tuple] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` nearest other rows of ``X`` (fewer when ``X`` has no more than ``k`` rows):
    (sorted Euclidean distances, row indices), rows in ``X``'s order, ties by row index.

    With the CV's ``splits`` and its neighbours ``found`` (``knn_neighbours``, for at least ``k``:
    each fold's rows against the other folds), only the rows within each fold are multiplied;
    without them, every pair of rows (in float32 blocks, as the CV).  Squared distances under
    ``NEAR_ZERO`` are recomputed in float64 from the difference (a duplicate row: exactly 0)."""
    n = len(X)
    parts = [np.arange(n)] if splits is None else [np.sort(te) for _, te in splits]
    within = within_parts(X, parts, k)
    rows, d2, ind = [], [], []
    for f, part in enumerate(parts):
        cand_d, cand_i = within[f]
        if found is not None:
            dist, idx = found[f]
            cand_d = np.concatenate([cand_d, (dist[:, :k] ** 2).astype(cand_d.dtype)], axis=1)
            cand_i = np.concatenate([cand_i, idx[:, :k]], axis=1)
        rows.append(part), d2.append(cand_d.astype(np.float64)), ind.append(cand_i)
    width = max(c.shape[1] for c in d2)  # a small fold has fewer candidates: pad (never nearer than a real one)
    d2 = [np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=np.inf) for c in d2]
    ind = [np.hstack([c, np.repeat(part[:, None], width - c.shape[1], 1)]) for c, part in zip(ind, rows)]
    rows, d2, ind = np.concatenate(rows), np.concatenate(d2), np.concatenate(ind)
    r, c = np.nonzero(d2 < NEAR_ZERO)
    if len(r):
        diff = X[rows[r]].astype(np.float64) - X[ind[r, c]].astype(np.float64)
        d2[r, c] = np.einsum("ij,ij->i", diff, diff)
    order = np.lexsort((ind, d2))[:, :min(k, n - 1)]
    out_d, out_i = np.empty((n, order.shape[1])), np.empty((n, order.shape[1]), dtype=np.int64)
    out_d[rows], out_i[rows] = np.sqrt(np.take_along_axis(d2, order, 1)), np.take_along_axis(ind, order, 1)
    return out_d, out_i


def knn_table(y: np.ndarray, grid: Sequence[int], splits: Sequence[Fold], found: list[tuple]) -> np.ndarray:
    """The k-NN head's CV scores ``[fold, k, 4]`` (train columns NaN) from each fold's sorted
    neighbours (``knn_neighbours``, for at least the largest k), every k scored with
    ``KNeighborsClassifier(weights="distance")``'s vote."""
    table = []
    for (tr, te), (dist, ind) in zip(splits, found):
        te = np.sort(te)
        classes = np.unique(y[tr])
        labels = np.searchsorted(classes, y[ind])  # neighbours are training rows: every label is in classes
        table.append([scores(knn_vote(dist, labels, k, len(classes)), y[te], classes) + (np.nan, np.nan)
                      for k in grid])
    return np.asarray(table, dtype=np.float64)


def knn_blocks(splits: Sequence[Fold]) -> int:
    """How many blocks ``knn_neighbours`` multiplies (for the progress bar)."""
    sizes = [len(te) for _, te in splits]
    return sum(-(-sizes[a] // KNN_CHUNK) * (len(sizes) - a - 1) for a in range(len(sizes)))


def plain_task(X, y, grid, make, train_scores: bool):
    """Fold task for any estimator: a fresh fit per grid value, as ``GridSearchCV`` does (rbf-svm)."""

    def task(i: int, fold: Fold, tick) -> FoldScores:
        tr, te = fold
        out = []
        for value in grid:
            est = make(value).fit(X[tr], y[tr])
            test = scores(est.predict_proba(X[te]), y[te], est.classes_)
            train = scores(est.predict_proba(X[tr]), y[tr], est.classes_) if train_scores else (np.nan, np.nan)
            out.append(test + train)
            tick(f"C={value}")
        return out

    return task


class Decisions(ClassifierMixin, BaseEstimator):
    """A "classifier" whose decision values are its input: lets ``CalibratedClassifierCV`` fit and
    apply its sigmoid to decision values computed once (one product with the whole of train per
    SVM) instead of recomputing them from the features for every call."""

    def __init__(self, classes: np.ndarray | None = None):
        self.classes = classes

    def fit(self, X, y=None):
        self.classes_ = np.asarray(self.classes)
        return self

    def decision_function(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X.ravel() if X.shape[1] == 1 else X

    def predict(self, X) -> np.ndarray:
        D = self.decision_function(X)
        return self.classes_[(D > 0).astype(int)] if D.ndim == 1 else self.classes_[D.argmax(1)]


def platt(F: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of scikit-learn's sigmoid calibration (``p = expit(-(a F + b))``): Platt's targets,
    its rescaling of decision values beyond ±30, the same convex objective, solved to its optimum
    by Newton's method (a 2 x 2 system) instead of L-BFGS-B (about 30 ms a call in SciPy 1.17)."""
    from scipy.special import expit

    F = np.asarray(F, dtype=np.float64)
    top = float(np.abs(F).max()) if len(F) else 0.0
    scale = top if top >= 30 else 1.0
    F = F / scale
    n1 = float(positive.sum())
    n0 = len(positive) - n1
    T = np.where(positive, (n1 + 1.0) / (n1 + 2.0), 1.0 / (n0 + 2.0))

    def loss(ab: np.ndarray) -> float:
        r = -(ab[0] * F + ab[1])
        return float((np.logaddexp(0.0, r) - T * r).sum())

    ab = np.array([0.0, np.log((n0 + 1.0) / (n1 + 1.0))])
    value = loss(ab)
    for _ in range(100):
        p = expit(-(ab[0] * F + ab[1]))
        g, h = p - T, p * (1.0 - p)
        grad = np.array([-(g @ F), -g.sum()])
        if np.abs(grad).max() <= 1e-10 * max(1.0, len(F)):
            break
        H = np.array([[h @ (F * F), h @ F], [h @ F, h.sum()]]) + 1e-12 * np.eye(2)
        step, t = -np.linalg.solve(H, grad), 1.0
        while t > 1e-10 and loss(ab + t * step) > value + 1e-4 * t * (grad @ step):
            t /= 2
        ab, value = ab + t * step, loss(ab + t * step)
    return float(ab[0] / scale), float(ab[1])


def sigmoid_proba(D_fit: np.ndarray, y_fit: np.ndarray, classes: np.ndarray, *D_apply: np.ndarray) -> list[np.ndarray]:
    """``CalibratedClassifierCV(method="sigmoid")`` fitted on the decision values ``D_fit`` (labels
    ``y_fit``; one column per one-vs-rest class, one for two classes), its probabilities for each
    of ``D_apply``: scikit-learn's sigmoid (``platt``) and normalisation (two classes: 1 - p; more:
    divided by their sum, uniform where it is 0)."""
    from scipy.special import expit

    if not np.array_equal(np.unique(y_fit), classes):  # a class absent from the calibration rows
        return sigmoid_proba_sklearn(D_fit, y_fit, classes, *D_apply)
    D_fit = D_fit.reshape(len(D_fit), -1)
    hits = (y_fit == classes[1])[:, None] if len(classes) == 2 else y_fit[:, None] == classes[None, :]
    ab = [platt(D_fit[:, j], hits[:, j]) for j in range(D_fit.shape[1])]
    out = []
    for D in D_apply:
        D = D.reshape(len(D), -1)
        P = np.stack([expit(-(a * D[:, j] + b)) for j, (a, b) in enumerate(ab)], axis=1)
        if len(classes) == 2:
            proba = np.column_stack([1.0 - P[:, 0], P[:, 0]])
        else:
            total = P.sum(1, keepdims=True)
            proba = np.divide(P, total, out=np.full_like(P, 1.0 / len(classes)), where=total != 0)
        proba[(1.0 < proba) & (proba <= 1.0 + 1e-5)] = 1.0
        out.append(proba)
    return out


def sigmoid_proba_sklearn(D_fit: np.ndarray, y_fit: np.ndarray, classes: np.ndarray, *D_apply: np.ndarray) -> list[np.ndarray]:
    """``CalibratedClassifierCV(method="sigmoid")`` fitted on the decision values ``D_fit`` (labels
    ``y_fit``), its probabilities for each of ``D_apply``: sklearn's own sigmoid fit and
    normalisation, on precomputed decision values (``Decisions``)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    every = np.arange(len(y_fit))  # one "split" holding every calibration row: no fold-size check
    cal = CalibratedClassifierCV(FrozenEstimator(Decisions(classes).fit(None)), method="sigmoid", cv=[(every, every)])
    cal.fit(D_fit, y_fit)
    return [cal.predict_proba(D) for D in D_apply]


SVM_INNER = 3  # CalibratedClassifierCV(cv=3): the SVMs (and sigmoids) behind each probability


def svm_path(X, y, fold: Fold, inner: Fold, grid, class_weight, train_scores: bool, tick) -> tuple:
    """One of a fold's 3 inner calibration SVMs (fitted on the fold's training rows ``inner[0]``,
    its sigmoid on ``inner[1]``) walking the C grid warm-started: per C, the sigmoid
    probabilities of the fold's test rows (and of its training rows).  The decision values on
    all of train come from one product per C; the sigmoid is ``CalibratedClassifierCV``'s own."""
    tr, te = fold
    a, b = inner
    ytr = y[tr]
    svc = SquaredHingeSVC(C=grid[0], class_weight=class_weight, warm_start=True)
    p_te, p_tr = [], []
    for c in grid:
        svc.set_params(C=c).fit(X[tr[a]], ytr[a])
        D = svc.decisions(X)  # every train row (the fold's train and test) in one product
        probs = sigmoid_proba(D[tr[b]], ytr[b], svc.classes_, D[te], *([D[tr]] if train_scores else []))
        p_te.append(probs[0])
        p_tr.append(probs[1] if train_scores else None)
        tick(f"C={c}")
    return p_te, p_tr


def svm_table(X, y, grid, splits: Sequence[Fold], class_weight, train_scores: bool,
              progress: Progress) -> np.ndarray:
    """The linear SVM head's CV scores ``[fold, C, 4]``: ``CalibratedClassifierCV(LinearSVC-objective,
    cv=3, sigmoid)`` scored as ``GridSearchCV`` scored it; each inner SVM walks the C grid
    warm-started (``svm_path``) and the 3 x folds inner SVMs run in parallel threads (BLAS on one
    thread each); a fold's probabilities are the mean of its 3."""
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    jobs = [(i, inner) for i, (tr, _) in enumerate(splits)
            for inner in StratifiedKFold(n_splits=SVM_INNER).split(np.zeros((len(tr), 1)), y[tr])]

    def one(i: int, inner: Fold) -> tuple:
        return svm_path(X, y, splits[i], inner, grid, class_weight, train_scores, lambda what: progress.tick(i, what))

    try:
        with threadpool_limits(limits=1, user_api="blas"):
            paths = Parallel(n_jobs=workers(len(jobs)), prefer="threads")(delayed(one)(*job) for job in jobs)
    finally:
        progress.close()
    table = []
    for i, (tr, te) in enumerate(splits):
        mine = [p for (f, _), p in zip(jobs, paths) if f == i]
        classes = np.unique(y[tr])
        row = []
        for g in range(len(grid)):
            test = scores(sum(p[0][g] for p in mine) / len(mine), y[te], classes)
            train = scores(sum(p[1][g] for p in mine) / len(mine), y[tr], classes) if train_scores else (np.nan, np.nan)
            row.append(test + train)
        table.append(row)
    return np.asarray(table, dtype=np.float64)


def signs(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One-vs-rest targets ±1 (rows x problems; one problem, class ``classes[1]``, for two classes)."""
    cols = [classes[1]] if len(classes) == 2 else list(classes)
    return np.stack([np.where(y == c, 1.0, -1.0) for c in cols], axis=1)


def penalties(y: np.ndarray, rows: np.ndarray, classes: np.ndarray, C: float, class_weight,
              S: np.ndarray) -> np.ndarray:
    """Per-entry C (rows x problems) as liblinear weights it: two classes, each row by its own
    class's weight; one-vs-rest, the positives by their class's weight, the rest plain C.
    ``class_weight="balanced"`` is computed on ``rows`` (the rows the SVM is fitted on)."""
    from sklearn.utils.class_weight import compute_class_weight

    weight = np.ones(len(classes)) if class_weight is None else compute_class_weight(
        class_weight, classes=classes, y=y[rows])
    if len(classes) == 2:
        return (C * weight[np.searchsorted(classes, y)])[:, None]
    return np.where(S > 0, C * weight[None, :], C)


class HingeProblem:
    """``Σ_columns ½‖[w; b]‖² + Σᵢ Cwᵢ max(0, 1 − Sᵢ (w·xᵢ + b))²``: one squared-hinge SVM per column
    of ``S`` (±1 targets) and ``Cw`` (per-entry C), all on the rows ``X``; products in ``X``'s dtype."""

    def __init__(self, X: np.ndarray, S: np.ndarray, Cw: np.ndarray, fit_intercept: bool):
        self.X, self.S, self.Cw, self.bias = X, S, Cw, fit_intercept
        self.rows = X.shape[1] + int(fit_intercept)

    def lin(self, V: np.ndarray) -> np.ndarray:
        """``[X 1] V`` (rows x columns of ``V``), float64."""
        d = self.X.shape[1]
        Z = (self.X @ V[:d].astype(self.X.dtype)).astype(np.float64)
        return Z + V[d] if self.bias else Z

    def grad(self, W: np.ndarray, Z: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The gradient of the columns ``cols`` at ``W`` (their decision values ``Z``)."""
        S, Cw = self.S[:, cols], self.Cw[:, cols]
        R = -2.0 * Cw * S * np.maximum(1.0 - S * Z, 0.0)  # d loss / d Z
        G = W.copy()
        d = self.X.shape[1]
        G[:d] += (self.X.T @ R.astype(self.X.dtype)).astype(np.float64)
        if self.bias:
            G[d] += R.sum(0)
        return G

    def line_search(self, W, P, Z, Q, cols: np.ndarray) -> np.ndarray:
        """Per column, the exact minimiser ``t ≥ 0`` of the objective along ``W + t P`` (``Q = [X 1] P``):
        the objective is a convex piecewise quadratic in ``t``; safeguarded Newton steps on its
        derivative, no product with ``X``."""
        S, Cw = self.S[:, cols], self.Cw[:, cols]
        wp, pp, SQ, M = (W * P).sum(0), (P * P).sum(0), S * Q, 1.0 - S * Z

        def slope(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            slack = np.maximum(M - t * SQ, 0.0)
            return wp + t * pp - 2.0 * (Cw * SQ * slack).sum(0), pp + 2.0 * (Cw * SQ * SQ * (slack > 0)).sum(0)

        lo, hi, t = np.zeros(len(cols)), np.full(len(cols), np.inf), np.ones(len(cols))
        first = np.abs(slope(lo)[0])
        for _ in range(60):
            d1, d2 = slope(t)
            done = np.abs(d1) <= 1e-10 * first
            if done.all():
                break
            lo, hi = np.where(d1 < 0, t, lo), np.where(d1 > 0, t, hi)
            nt = t - d1 / np.maximum(d2, 1e-300)
            outside = (nt <= lo) | (nt >= hi)
            nt = np.where(outside, np.where(np.isfinite(hi), 0.5 * (lo + hi), 2.0 * t), nt)
            t = np.where(done, t, nt)
        return t


def lbfgs_direction(G: np.ndarray, pairs: list[tuple], gamma: np.ndarray) -> np.ndarray:
    """``−H G`` per column by the L-BFGS two-loop recursion over ``pairs`` (oldest first; each
    ``(s, y, ρ)``, columns as ``G``; ``ρ = 0`` where a column skipped that pair)."""
    q, alphas = G.copy(), []
    for s_, y_, rho in reversed(pairs):
        a = rho * (s_ * q).sum(0)
        alphas.append(a)
        q -= a * y_
    r = gamma * q
    for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
        r += s_ * (a - rho * (y_ * r).sum(0))
    return -r


def solve_per_class(X: np.ndarray, S: np.ndarray, Cw: np.ndarray, W0: np.ndarray | None,
                    fit_intercept: bool, tol: float, max_iter: int, memory: int = 20) -> np.ndarray:
    """Minimise ``Σ_columns ½‖[w; b]‖² + Σᵢ Cwᵢ max(0, 1 − Sᵢ (w·xᵢ + b))²`` from ``W0`` (zeros when
    None); ``W`` is ``(features [+ 1]) x columns``.  Each column (a one-vs-rest problem) is its own
    L-BFGS (own curvature pairs, exact line search) but all columns' products with ``X`` are one
    matrix product per step; a column stops when its largest gradient entry falls below ``tol``
    times the largest entry at zero (of all columns), and drops out of the products."""
    prob, m = HingeProblem(X, S, Cw, fit_intercept), S.shape[1]
    every = np.arange(m)
    scale = max(float(np.abs(prob.grad(np.zeros((prob.rows, m)), np.zeros(S.shape), every)).max()), 1e-12)
    fresh = W0 is None or W0.shape != (prob.rows, m)
    W = np.zeros((prob.rows, m)) if fresh else np.array(W0, dtype=np.float64)
    Z = np.zeros(S.shape) if fresh else prob.lin(W)
    G = prob.grad(W, Z, every)
    pairs: list[tuple] = []  # (s, y, rho), all columns
    gamma = np.full(m, 1.0 / max(float(np.abs(G).max()), 1e-12))
    for step in range(max_iter):
        cols = np.flatnonzero(np.abs(G).max(0) > tol * scale)
        if not len(cols):
            break
        P = lbfgs_direction(G[:, cols], [(s_[:, cols], y_[:, cols], r[cols]) for s_, y_, r in pairs], gamma[cols])
        Q = prob.lin(P)
        t = prob.line_search(W[:, cols], P, Z[:, cols], Q, cols)
        W[:, cols] += t * P
        Z[:, cols] = prob.lin(W[:, cols]) if step % 25 == 24 else Z[:, cols] + t * Q  # no drift
        G_new = prob.grad(W[:, cols], Z[:, cols], cols)
        s_, y_ = np.zeros_like(W), np.zeros_like(W)
        s_[:, cols], y_[:, cols] = t * P, G_new - G[:, cols]
        sy = (s_ * y_).sum(0)
        ok = sy > 1e-12 * np.sqrt((s_ * s_).sum(0) * (y_ * y_).sum(0))
        pairs = (pairs + [(s_, y_, np.where(ok, 1.0 / np.where(ok, sy, 1.0), 0.0))])[-memory:]
        gamma = np.where(ok, sy / np.maximum((y_ * y_).sum(0), 1e-300), gamma)
        G[:, cols] = G_new
    return W


def solve_joint(X: np.ndarray, S: np.ndarray, Cw: np.ndarray, W0: np.ndarray | None,
                        fit_intercept: bool, tol: float, max_iter: int) -> np.ndarray:
    """``solve_squared_hinge`` by one SciPy L-BFGS-B over every column's weights (compiled: the
    cheaper one while the products with ``X`` are small).  Stops when the largest gradient entry
    falls below ``tol`` times its value at zero."""
    from scipy.optimize import minimize

    d, m = X.shape[1], S.shape[1]
    rows = d + int(fit_intercept)

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        W = w.reshape(rows, m)
        Z = (X @ W[:d].astype(X.dtype)).astype(np.float64)
        if fit_intercept:
            Z += W[d]
        slack = np.maximum(1.0 - S * Z, 0.0)
        R = -2.0 * Cw * S * slack  # d loss / d Z
        G = W.copy()
        G[:d] += (X.T @ R.astype(X.dtype)).astype(np.float64)
        if fit_intercept:
            G[d] += R.sum(0)
        return 0.5 * float((W * W).sum()) + float((Cw * slack * slack).sum()), G.ravel()

    zero = np.zeros(rows * m)
    scale = max(float(np.abs(loss_grad(zero)[1]).max()), 1e-12)
    start = zero if W0 is None or W0.size != zero.size else np.asarray(W0, dtype=np.float64).ravel()
    res = minimize(loss_grad, start, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol * scale, "ftol": 1e-15, "maxcor": 20})
    return res.x.reshape(rows, m)


PER_CLASS_MIN = 1e8  # rows x features x classes from which per-class L-BFGS beats one joint L-BFGS-B


def solve_squared_hinge(X: np.ndarray, S: np.ndarray, Cw: np.ndarray, W0: np.ndarray | None,
                        fit_intercept: bool, tol: float, max_iter: int) -> np.ndarray:
    """Minimise ``Σ_columns ½‖[w; b]‖² + Σᵢ Cwᵢ max(0, 1 − Sᵢ (w·xᵢ + b))²`` from ``W0`` (zeros when
    None); ``W`` is ``(features [+ 1]) x columns``.  Large one-vs-rest problems (measured: 10
    classes on 10,667 x 2,048, 1.5x faster) by ``solve_per_class``; smaller ones, where Python's
    per-step overhead outweighs the products (6 classes on 3,200 x 1,024: 1.6x slower), by
    ``solve_joint``.  Both stop at the same rule."""
    if X.shape[0] * (X.shape[1] + 1) * S.shape[1] >= PER_CLASS_MIN:
        return solve_per_class(X, S, Cw, W0, fit_intercept, tol, max_iter)
    return solve_joint(X, S, Cw, W0, fit_intercept, tol, max_iter)


class SquaredHingeSVC(ClassifierMixin, BaseEstimator):
    """Linear SVM with ``LinearSVC``'s objective, solved by L-BFGS so that it can be warm-started.

    Minimises, per class (one-vs-rest; one problem for two classes),
    ``½‖[w; b]‖² + Σᵢ Cᵢ max(0, 1 − sᵢ (w·xᵢ + b))²`` — liblinear's squared hinge with its
    regularised intercept (``intercept_scaling=1``); ``Cᵢ = C`` times the class weight of the
    positive class for its rows, as liblinear weights them.  The optimum is unique (strictly
    convex), so it is liblinear's up to the solvers' tolerances.
    """

    def __init__(self, C: float = 1.0, class_weight=None, tol: float = 1e-4, max_iter: int = 2000,
                 fit_intercept: bool = True, warm_start: bool = False, random_state=None):
        self.C = C
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter
        self.fit_intercept = fit_intercept
        self.warm_start = warm_start
        self.random_state = random_state  # unused (deterministic); kept for LinearSVC's signature

    def fit(self, X, y):
        from sklearn.utils.validation import validate_data

        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], order="C")
        self.classes_ = np.unique(y)
        S = signs(y, self.classes_)
        Cw = penalties(y, np.arange(len(y)), self.classes_, self.C, self.class_weight, S)
        prev = getattr(self, "solution_", None) if self.warm_start else None
        W = solve_squared_hinge(X, S, Cw, prev, self.fit_intercept, self.tol, self.max_iter)
        self.solution_ = W
        d = X.shape[1]
        self.coef_ = W[:d].T.copy()
        self.intercept_ = W[d].copy() if self.fit_intercept else np.zeros(S.shape[1])
        return self

    def decision_function(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        Z = self.decisions(X)
        return Z.ravel() if Z.shape[1] == 1 else Z

    def decisions(self, X: np.ndarray) -> np.ndarray:
        """Decision values, one column per problem (float64), without input validation."""
        return (X @ self.coef_.T.astype(X.dtype, copy=False)).astype(np.float64) + self.intercept_

    def predict(self, X) -> np.ndarray:
        Z = self.decision_function(X)
        return self.classes_[(Z > 0).astype(int)] if Z.ndim == 1 else self.classes_[Z.argmax(1)]
