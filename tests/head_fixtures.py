"""Head folders in the agreed schema (metrics.json, evaluation.json, history.csv, grid.csv), written by
hand so that report and plot tests do not depend on fit_head."""

from __future__ import annotations

import csv
import json
from pathlib import Path

CLASSES = ["cat", "dog"]


def write_head(folder: Path, base: str = "vgg16", head: str = "logistic", val: float = 0.95,
               test: float | None = 0.94, weights: str = "imagenet", data: str = "/data/cats",
               limit: int = 0, classes=CLASSES, features: list[str] | None = None) -> Path:
    """A head folder of the new schema: dense heads get history.csv, the others grid.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    metrics = {"val": {"accuracy": val, "log_loss": 0.2}, "fit_seconds": 1.5}
    if test is not None:
        metrics["test"] = {"accuracy": test, "log_loss": 0.25}
    dense = head == "dense"
    tuning = ({"method": "early stopping on a 10% stratified slice of train", "param": "epochs", "chosen": 4,
               "cv_accuracy": None, "cv_log_loss": None, "val_used_for_tuning": False} if dense else
              {"method": "5-fold stratified CV on train", "param": "k" if head == "knn" else "C",
               "chosen": 5 if head == "knn" else 1.0, "cv_accuracy": 0.93, "cv_log_loss": 0.21,
               "val_used_for_tuning": False})

    def split(n, acc):
        right = round(n * acc)
        cm = [[0] * k for _ in range(k)]
        for i in range(k):
            cm[i][i] = right // k
        cm[0][1 % k] += n - right
        cm[0][0] += right - k * (right // k)
        return {"n": n, "accuracy": acc, "balanced_accuracy": acc, "log_loss": 0.2, "confusion_matrix": cm,
                "per_class": {c: {"precision": acc, "recall": acc, "f1": acc, "support": n // k} for c in classes}}

    splits = {"train": split(160, 0.99), "val": split(100, val)}
    if test is not None:
        splits["test"] = split(100, test)
    evaluation = {
        "base": base, "head": head, "features": features or [f"cache/features/{base}.h5"],
        "weights": [weights] * len(features or [1]), "data_source": data, "limit": limit, "classes": list(classes),
        "feature_size": 512, "fit_seconds": 1.5, "extract_images_per_second": 40.0, "tuning": tuning,
        "splits": splits, "chance": {"val": 1 / k, "test": 1 / k}, "untrained": {"val": {"accuracy": 0.5}},
    }
    (folder / "model").mkdir(exist_ok=True)  # what fit-head records (no fingerprints: status ok)
    (folder / "model" / "head.json").write_text(json.dumps({"head": head, "features": [], "fingerprints": []}))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    if dense:
        with open(folder / "history.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["epoch", "train_accuracy", "train_loss", "tune_accuracy", "tune_loss", "val_accuracy",
                        "val_loss", "seconds"])
            for e in range(1, 9):
                w.writerow([e, 0.7 + 0.03 * e, 0.6 / e, 0.68 + 0.028 * e, 0.62 / e + 0.01 * e,
                            0.69 + 0.027 * e, 0.63 / e + 0.012 * e, 0.1])
    else:
        grid = [1, 3, 5, 11, 21] if head == "knn" else [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]
        with open(folder / "grid.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["param", "value", "cv_accuracy", "cv_log_loss", "train_accuracy", "train_loss"])
            for i, v in enumerate(grid):
                w.writerow([tuning["param"], v, 0.85 + 0.02 * i - 0.004 * i * i, 0.4 - 0.03 * i + 0.006 * i * i,
                            0.86 + 0.025 * i, 0.38 - 0.06 * i])
    return folder
