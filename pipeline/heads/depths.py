"""Choosing depths inside train: per-depth standardisation and greedy forward selection by exact
grouped cross-validation of a ridge classifier.

Each depth (the pooled output of one layer, pipeline.nets.depths) is standardised column by column
and then scaled by ``1/sqrt(width)``, so that every depth weighs the same in a linear head whatever its
width.  A subset of depths is scored by leave-one-group-out accuracy of a one-vs-rest ridge regression
on centred one-hot labels, computed in closed form from one eigendecomposition per subset (for any
number of ridge strengths): a group is one photo and its augmented views (``--views``), so a photo is
never scored against its own mirror image; its prediction is the mean over its views, as at test time.
Depth choice (``ranked``, the default, as Head2Toe ranks features by relevance): score each depth alone,
rank them, and score the nested sets of the best 1, 2, ... ``max_depths`` depths, the set of every
depth at each input size (features files of one base fused at several sizes: depths ``NAME@SIZE``)
and the set of all; the best-scoring set wins (an earlier, smaller one on ties within ``min_gain``), so
input sizes are chosen with the depths: one size, or a mix of several.  ``greedy`` (forward selection:
add the depth that raises the score most, stop when nothing adds ``min_gain``) costs several times
more.  Only training rows are used: val and test score the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LAMBDAS = tuple(float(x) for x in np.logspace(-2, 3, 11))  # ridge strengths, relative to n / D scaling


@dataclass
class DepthScaler:
    """Per-depth standardisation (fitted on train): ``(x - mean) / std / sqrt(width)`` per depth."""

    names: list[str]
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    scale: dict[str, np.ndarray] = field(default_factory=dict)

    def fit(self, parts: dict[str, np.ndarray]) -> "DepthScaler":
        for name in self.names:
            x = np.asarray(parts[name], np.float64)
            std = x.std(axis=0)
            std[std < 1e-6] = 1.0
            self.mean[name] = x.mean(axis=0).astype(np.float32)
            self.scale[name] = (1.0 / (std * np.sqrt(x.shape[1]))).astype(np.float32)
        return self

    def transform(self, parts: dict[str, np.ndarray], names: list[str] | None = None) -> np.ndarray:
        names = self.names if names is None else names
        return np.concatenate([(np.asarray(parts[n], np.float32) - self.mean[n]) * self.scale[n] for n in names],
                              axis=1)

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "mean": {k: v.tolist() for k, v in self.mean.items()},
                "scale": {k: v.tolist() for k, v in self.scale.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DepthScaler":
        s = cls(list(data["names"]))
        s.mean = {k: np.asarray(v, np.float32) for k, v in data["mean"].items()}
        s.scale = {k: np.asarray(v, np.float32) for k, v in data["scale"].items()}
        return s


def group_matrix(groups: np.ndarray) -> np.ndarray:
    """Row indices of each group as a ``[G, m]`` array (every group must hold ``m`` rows)."""
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    _, counts = np.unique(groups[order], return_counts=True)
    if counts.min() != counts.max():
        raise ValueError("every group must hold the same number of rows (one photo and its views)")
    return order.reshape(len(counts), int(counts[0]))


def ridge_alpha(X: np.ndarray, lam: float) -> float:
    """The absolute ridge penalty of relative strength ``lam`` on rows ``X`` (as ``logo_scores``)."""
    Xc = X - X.mean(axis=0)
    return float(lam * float((Xc.astype(np.float64) ** 2).sum()) / min(X.shape))


def _spectrum(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U, w)``: left singular vectors and squared singular values of centred ``X`` (w > 0 only)."""
    n, d = X.shape
    if d < n:
        w, Q = np.linalg.eigh(X.T @ X)
        keep = w > max(w.max(), 1e-12) * 1e-10
        w, Q = w[keep], Q[:, keep]
        return (X @ Q) / np.sqrt(w), w
    w, U = np.linalg.eigh(X @ X.T)
    keep = w > max(w.max(), 1e-12) * 1e-10
    return U[:, keep], w[keep]


def logo_scores(X: np.ndarray, y: np.ndarray, G: np.ndarray, n_classes: int,
                lambdas: tuple[float, ...] = LAMBDAS, scores_out: dict | None = None,
                positions: tuple[int, ...] | None = None, gram: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Leave-one-group-out accuracy of ridge one-vs-rest for each ridge strength (closed form).

    ``G``: ``[groups, m]`` row indices; a held-out group is predicted by the mean of its rows' scores
    (``scores_out[lam]``: those held-out group scores, ``[groups, classes]``, when a dict is given);
    ``positions``: which rows of a group are averaged (0: the photo, 1: its mirror; default all).
    Exact: equal to refitting ridge with its unpenalised intercept on the one-hot labels without the
    group (the intercept's ``1/n`` belongs in the hat matrix: without it, when rows < features, the
    held-out row leaked into its own prediction and small strengths scored near 100%).
    The ridge strength is ``lam * ||X||_F^2 / min(n, d)`` (``ridge_alpha``).  ``gram=(K, d)``: the Gram
    matrix ``Xc Xc^T`` of the centred rows (and their width) in place of ``X`` (sums of cached per-depth
    Gram matrices: no product over the features again).
    """
    if gram is None:
        X = X - X.mean(axis=0)
        U, w = _spectrum(X.astype(np.float64))
        dims = min(X.shape)
    else:
        w, U = np.linalg.eigh(gram[0])
        keep = w > max(w.max(), 1e-12) * 1e-10
        U, w, dims = U[:, keep], w[keep], min(gram[0].shape[0], int(gram[1]))
    onehot = np.eye(n_classes)[y]
    Y = onehot - onehot.mean(axis=0)  # the unpenalised intercept: centred rows and targets ...
    UtY = U.T @ Y
    unit = float(w.sum()) / dims if w.size else 1.0
    UG = U[G]  # [g, m, k]
    yg = y[G[:, 0]]
    m = G.shape[1]
    out = []
    for lam in lambdas:
        s = w / (w + lam * unit)
        R = (Y - U @ (s[:, None] * UtY))[G]  # residuals per group [g, m, c]
        # ... and the intercept's own 1/n in every entry of the hat matrix's diagonal blocks
        H = np.einsum("gak,k,gbk->gab", UG, s, UG) + 1.0 / len(y)
        loo = onehot[G] - np.linalg.solve(np.eye(m)[None] - H, R)  # held-out predictions [g, m, c]
        held = loo.mean(axis=1) if positions is None else loo[:, list(positions)].mean(axis=1)
        if scores_out is not None:
            scores_out[lam] = held
        out.append(float((held.argmax(axis=1) == yg).mean()))
    return np.asarray(out)


@dataclass
class Selection:
    """What greedy forward selection chose, and the CV accuracy of every step."""

    chosen: list[str]
    lam: float
    cv_accuracy: float
    alone: dict[str, float]  # each depth alone
    steps: list[dict[str, Any]]  # [{"added", "set", "cv_accuracy"}]
    how: str = "ranked depths, nested best-k sets scored by leave-one-group-out ridge accuracy on train"


def select_depths(X: np.ndarray, y: np.ndarray, groups: np.ndarray, names: list[str], widths: list[int],
                  n_classes: int, min_gain: float = 0.002, max_depths: int = 6, strategy: str = "ranked",
                  positions: tuple[int, ...] | None = None,
                  extra: dict[str, list[str]] | None = None) -> Selection:
    """Choose depths on standardised train rows ``X`` (depth blocks side by side): ``ranked`` or ``greedy``.
    ``extra``: more candidate sets for ``ranked``, by label (every depth at one input size: ``all@320``),
    scored after the nested sets and before the set of all."""
    G = group_matrix(groups)
    starts = np.cumsum([0, *widths])
    cols = {n: np.arange(starts[i], starts[i + 1]) for i, n in enumerate(names)}
    cache: dict[tuple[str, ...], np.ndarray] = {}
    grams: dict[str, np.ndarray] = {}

    def gram(name: str) -> np.ndarray:  # per-depth Gram matrix of the centred rows, computed once
        if name not in grams:
            part = X[:, cols[name]].astype(np.float64)
            part -= part.mean(axis=0)
            grams[name] = part @ part.T
        return grams[name]

    def score(subset: tuple[str, ...]) -> np.ndarray:
        key = tuple(sorted(subset, key=names.index))
        if key not in cache:
            width = sum(len(cols[n]) for n in key)
            if width >= X.shape[0]:  # wider than tall: eigendecompose the summed Gram matrices
                cache[key] = logo_scores(None, y, G, n_classes, positions=positions,
                                         gram=(sum(gram(n) for n in key), width))
            else:
                cache[key] = logo_scores(X[:, np.concatenate([cols[n] for n in key])], y, G, n_classes,
                                         positions=positions)
        return cache[key]

    min_gain = max(min_gain, 2.0 / len(G))  # at least two photos more must be right
    alone = {n: float(score((n,)).max()) for n in names}
    if strategy == "ranked":
        return _ranked(score, names, alone, min_gain, max_depths, extra or {})
    chosen: list[str] = []
    best = 0.0
    steps: list[dict[str, Any]] = []
    while len(chosen) < min(max_depths, len(names)):
        trials = {n: float(score((*chosen, n)).max()) for n in names if n not in chosen}
        pick = max(trials, key=lambda n: (trials[n], -names.index(n)))
        if chosen and trials[pick] < best + min_gain:
            break
        chosen.append(pick)
        best = trials[pick]
        steps.append({"added": pick, "set": list(chosen), "cv_accuracy": round(best, 4)})
        log.info("depths: + %s -> %.4f (LOGO ridge on train)", pick, best)
    key = tuple(sorted(chosen, key=names.index))
    scores = score(key)
    lam = LAMBDAS[int(scores.argmax())]
    return Selection(list(key), lam, float(scores.max()), alone, steps,
                     "greedy forward selection, leave-one-group-out ridge accuracy on train")


def _ranked(score, names: list[str], alone: dict[str, float], min_gain: float, max_depths: int,
            extra: dict[str, list[str]]) -> Selection:
    """Nested sets of the best-ranked depths, the ``extra`` sets, and all of them; the best score wins, an
    earlier (smaller) one on ties within ``min_gain``."""
    ranking = sorted(names, key=lambda n: (-alone[n], -names.index(n)))
    sets = [(r[-1], r) for r in (tuple(ranking[:k]) for k in range(1, min(max_depths, len(names)) + 1))]
    sets += [(label, tuple(subset)) for label, subset in extra.items()
             if len(subset) > 1 and tuple(sorted(subset)) not in {tuple(sorted(s)) for _, s in sets}]
    if len(names) > max_depths:
        sets.append(("all", tuple(names)))
    steps, best = [], None
    for label, subset in sets:
        acc = float(score(subset).max())
        steps.append({"added": label, "set": list(subset), "cv_accuracy": round(acc, 4)})
        log.info("depths: %s (%d) -> %.4f (LOGO ridge on train)", label, len(subset), acc)
        if best is None or acc >= best[0] + min_gain:
            best = (acc, subset)
    key = tuple(sorted(best[1], key=names.index))
    scores = score(key)
    how = ("ranked depths, nested best-k sets and every depth at each input size scored by leave-one-group-out "
           "ridge accuracy on train") if extra else Selection.how
    return Selection(list(key), LAMBDAS[int(scores.argmax())], float(scores.max()), alone, steps, how)
