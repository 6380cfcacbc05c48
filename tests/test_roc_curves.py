"""roc.csv for any number of classes: the binary curve, or one-vs-rest per class plus micro/macro averages."""

from __future__ import annotations

import numpy as np

from pipeline.reporting.curves import MACRO, MICRO, ROC_COLUMNS, roc_rows


def _scores(k: int, n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_binary_roc_is_one_curve_of_the_positive_class():
    y, p = _scores(2)
    rows = roc_rows(y, p, ["cat", "dog"])
    assert rows and list(rows[0]) == ROC_COLUMNS
    assert {r["class"] for r in rows} == {"dog"} and {r["split"] for r in rows} == {"val"}
    assert rows[0]["fpr"] == 0.0 and rows[-1]["fpr"] == 1.0 and rows[-1]["tpr"] == 1.0


def test_multiclass_roc_has_a_curve_per_class_and_averages():
    from sklearn.metrics import auc, roc_auc_score

    classes = ["glass", "metal", "paper", "plastic", "trash", "cardboard"]
    y, p = _scores(6)
    rows = roc_rows(y, p, classes)
    assert {r["class"] for r in rows} == set(classes) | {MICRO, MACRO}
    for name in classes + [MICRO, MACRO]:
        curve = [r for r in rows if r["class"] == name]
        fpr, tpr = [r["fpr"] for r in curve], [r["tpr"] for r in curve]
        assert fpr == sorted(fpr) and tpr == sorted(tpr) and fpr[0] == 0 and fpr[-1] == tpr[-1] == 1.0
    i = classes.index("paper")
    paper = [r for r in rows if r["class"] == "paper"]
    assert abs(auc([r["fpr"] for r in paper], [r["tpr"] for r in paper]) - roc_auc_score(y == i, p[:, i])) < 1e-9
    macro = [r for r in rows if r["class"] == MACRO]
    assert abs(auc([r["fpr"] for r in macro], [r["tpr"] for r in macro])
               - roc_auc_score(y, p, multi_class="ovr", average="macro")) < 0.02


def test_a_class_absent_from_val_has_no_curve_and_one_class_has_none():
    y, p = _scores(3)
    y = np.where(y == 2, 0, y)
    assert {r["class"] for r in roc_rows(y, p, ["a", "b", "c"])} == {"a", "b", MICRO, MACRO}
    assert roc_rows(np.zeros(5, int), p[:5], ["a", "b", "c"]) == []
