"""The ``ensemble`` head: stacks other heads' out-of-fold probabilities, every choice made on train.

1. Each member head (``MEMBERS``: logistic, svm, knn) is fitted on train as it always is (its C or k
   chosen by its own CV on train).
2. With that value fixed, each member is refitted on the training part of every fold of a
   stratified (grouped, with views) K-fold split of train and predicts the held-out part: out-of-fold
   probabilities for every training row.
3. A multinomial logistic regression on the members' out-of-fold log-probabilities (the stack), its C
   chosen by CV on those rows (the same folds).
4. The stack is kept only if its CV log loss beats the best member's out-of-fold log loss; otherwise
   the best member alone predicts.  ``tuning.candidates`` records every score.

Val and test are only scored.  Not exportable (``tlpipe export`` names the heads it exports).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.heads.fastcv import fold_splits
from pipeline.heads.models import Head, HeadParams, cv_folds, get_head

log = logging.getLogger(__name__)

MEMBERS = ("logistic", "svm", "knn")
META_C = (0.01, 0.1, 1.0, 10.0)


def _aligned(proba: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` probabilities from an estimator that saw only ``classes`` (a class absent from a fold)."""
    full = np.full((len(proba), k), 1e-9)
    full[:, np.asarray(classes, dtype=int)] = proba
    return full / full.sum(1, keepdims=True)


def _log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1)).mean())


def _stack_features(probas: list[np.ndarray]) -> np.ndarray:
    return np.log(np.clip(np.concatenate(probas, axis=1), 1e-9, 1))


class EnsembleHead(Head):
    """Stacked logistic regression over the members' out-of-fold probabilities (or the best member)."""

    name = "ensemble"
    description = ("stacking of the logistic, svm and knn heads: a logistic regression on their out-of-fold "
                   "probabilities on train, kept only when CV on train prefers it to the best member")
    file = "head.joblib"

    def __init__(self, n_classes: int, params: HeadParams):
        super().__init__(n_classes, params)
        self.members: dict[str, Head] = {}
        self.meta = None  # the stacking logistic regression, or None: ``self.single`` predicts
        self.single: str | None = None

    def fit(self, train, val=None, groups=None):
        X, y = train
        folds = cv_folds(y, self.params.cv_folds, max(get_head(n).min_per_class for n in MEMBERS))
        if groups is not None:
            folds = min(folds, len(np.unique(groups)))
        if folds < 2:
            raise UsageError("ensemble: too few training rows per class for cross-validation on train")
        splits = fold_splits(y, folds, self.params.seed, groups)
        oof = {name: self._member_oof(name, X, y, groups, splits) for name in MEMBERS}
        alone = {n: {"cv_accuracy": float((p.argmax(1) == y).mean()), "cv_log_loss": _log_loss(p, y)}
                 for n, p in oof.items()}
        Z = _stack_features(list(oof.values()))
        rows = [self._meta_row(Z, y, splits, c) for c in META_C]
        best = min(range(len(rows)), key=lambda i: rows[i]["cv_log_loss"])
        best_member = min(alone, key=lambda n: alone[n]["cv_log_loss"])
        stack = rows[best]["cv_log_loss"] < alone[best_member]["cv_log_loss"]
        if stack:
            self.meta = self._meta(META_C[best]).fit(Z, y)
        else:
            self.single = best_member
        kind = f"stack C={META_C[best]}" if stack else f"{best_member} alone"
        score = rows[best] if stack else alone[best_member]
        self.chosen = {"ensemble": kind, "members": {n: h.chosen for n, h in self.members.items()}}
        self.tuning = {"method": f"{folds}-fold stratified{' group' if groups is not None else ''} CV on train "
                                 "(members' out-of-fold probabilities; the stack's C by CV on them)",
                       "param": "ensemble", "chosen": kind, "cv_accuracy": score["cv_accuracy"],
                       "cv_log_loss": score["cv_log_loss"], "candidates": {**alone, "stack": rows[best]},
                       "folds": folds, "val_used_for_tuning": False}
        log.info("ensemble: %s (CV accuracy %.4f, log loss %.4f on train)", kind, score["cv_accuracy"],
                 score["cv_log_loss"])
        return rows

    def _member_oof(self, name: str, X, y, groups, splits) -> np.ndarray:
        """Fit member ``name`` on train (its own CV) and return its out-of-fold probabilities."""
        head = get_head(name)(self.n_classes, self.params)
        head.fit((X, y), None, groups)
        self.members[name] = head
        value = head.chosen[head.grid_name]
        out = np.zeros((len(y), self.n_classes))
        for tr, te in splits:
            model = head.make(value).fit(X[tr], y[tr])
            out[te] = _aligned(model.predict_proba(X[te]), model.classes_, self.n_classes)
        return out

    def _meta(self, c: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, max_iter=2000)

    def _meta_row(self, Z, y, splits, c: float) -> dict[str, Any]:
        """CV accuracy and log loss of the stack at ``c`` (a ``GRID_COLUMNS`` row)."""
        held = np.zeros((len(y), self.n_classes))
        for tr, te in splits:
            model = self._meta(c).fit(Z[tr], y[tr])
            held[te] = _aligned(model.predict_proba(Z[te]), model.classes_, self.n_classes)
        return {"param": "C", "value": c, "cv_accuracy": float((held.argmax(1) == y).mean()),
                "cv_log_loss": _log_loss(held, y), "train_accuracy": None, "train_loss": None}

    def predict_proba(self, X):
        if self.meta is None:
            return self.members[self.single].predict_proba(X)
        Z = _stack_features([self.members[n].predict_proba(X) for n in MEMBERS])
        return _aligned(self.meta.predict_proba(Z), self.meta.classes_, self.n_classes)

    def save(self, folder):
        import joblib

        path = Path(folder) / self.file
        joblib.dump({"head": self.name, "n_classes": self.n_classes, "chosen": self.chosen, "tuning": self.tuning,
                     "members": {n: h.model for n, h in self.members.items()}, "meta": self.meta,
                     "single": self.single}, path)
        return path

    @classmethod
    def load(cls, folder):
        import joblib

        data = joblib.load(Path(folder) / cls.file)
        head = cls(data["n_classes"], HeadParams())
        head.chosen, head.tuning, head.meta, head.single = data["chosen"], data["tuning"], data["meta"], data["single"]
        for name, model in data["members"].items():
            member = get_head(name)(data["n_classes"], HeadParams())
            member.model = model
            head.members[name] = member
        return head
