"""Scores of class probabilities against labels, and the one probability normaliser.

Used by every stage that scores a model: fit-head, fine-tune, baseline, the tuning of the dense
head, and ``tlpipe evaluate``.  scikit-learn is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise_proba(p: np.ndarray) -> np.ndarray:
    """Rows of ``p`` divided by their sums (a sum below 1e-12 counts as 1e-12), so that each row sums to
    1 exactly enough for scikit-learn's checks.  Every model's probabilities go through it."""
    return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)


def accuracy_and_log_loss(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) of probabilities against labels."""
    from sklearn.metrics import log_loss

    return float((proba.argmax(1) == y).mean()), float(log_loss(y, proba, labels=np.arange(proba.shape[1])))


def evaluate(proba: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Scalar metrics of probabilities ``proba`` against labels ``y``."""
    from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

    pred = proba.argmax(1)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "log_loss": float(log_loss(y, proba, labels=np.arange(n_classes))) if len(y) else float("nan"),
    }
    present = np.unique(y)
    try:
        if n_classes == 2 and len(present) == 2:
            out["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
        elif len(present) == n_classes and n_classes > 2:
            out["roc_auc"] = float(roc_auc_score(y, normalise_proba(proba), multi_class="ovr",
                                                 labels=np.arange(n_classes)))
    except ValueError:
        pass
    return out


def per_class(proba: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Confusion matrix (rows: actual) and per-class precision / recall / support."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(class_names)
    pred = proba.argmax(1)
    cm = confusion_matrix(y, pred, labels=np.arange(k))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0)
    return {
        "confusion_matrix": cm.tolist(),
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "support": int(sup[i])} for i, c in enumerate(class_names)},
    }


def split_scores(proba: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """``evaluate`` and ``per_class`` together: one split's entry of evaluation.json."""
    return {**evaluate(proba, y, len(class_names)), **per_class(proba, y, class_names)}


def chance(labels: dict[str, np.ndarray], n_classes: int) -> dict[str, float]:
    """Per split, the accuracy of always answering its most frequent class."""
    return {s: float(np.bincount(y, minlength=n_classes).max() / max(1, len(y))) for s, y in labels.items()}
