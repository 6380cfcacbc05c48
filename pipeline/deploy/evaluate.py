"""Score an exported model on a labelled folder: metrics, confusion matrix, mistakes worst first.

The folder holds one subfolder per class (named as the model's classes), or ``train/ val/ test/``
subfolders that each hold class subfolders; then the ``test`` split is scored (``val`` when there
is no test), or the one named by ``split``. Images are decoded and predicted by
``pipeline.deploy.predict.predict``, exactly as ``tlpipe predict`` does.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataLayoutError, DataNotFound, UsageError
from pipeline.core.safety import OutputExists, check_out_path
from pipeline.core.util import atomic_write_text, write_json
from pipeline.data.sources import PER_CLASS_HINT, SPLIT_DIRS, class_dirs, list_images, loose_images
from pipeline.deploy.predict import load_exported, predict, zip_metadata
from pipeline.heads.metrics import normalise_proba, split_scores
from pipeline.reporting.plots import confusion_figure

log = logging.getLogger(__name__)



@dataclass
class EvaluateConfig:
    """What to score on what."""

    model: Path  # a model written by 'tlpipe export'
    data: Path  # a folder of class subfolders, or of train/ val/ test/ subfolders
    split: str | None = None  # train | val | test (only for a split folder; default test, else val)
    out: Path | None = None  # write metrics.json, evaluation.json, mistakes.csv, figures/confusion.png here
    batch_size: int = 32
    force: bool = False  # replace files of those names in ``out`` that tlpipe evaluate did not write
    runtime: str = "auto"  # as for predict
    precision: str = "auto"


@dataclass
class EvaluateResult:
    """Scores of one model on one labelled folder."""

    model: str
    data: str
    split: str | None
    classes: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float
    log_loss: float
    confusion_matrix: list[list[int]]
    per_class: dict[str, dict[str, float]]
    chance: float
    roc_auc: float | None = None
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    out: Path | None = None


def labelled_files(data: Path, split: str | None = None) -> tuple[dict[str, list[Path]], str | None]:
    """``{class: [image files]}`` of the folder (or of its chosen split) and the split's name; files
    listed as ``tlpipe extract`` lists them (``pipeline.data.sources.list_images``)."""
    data = Path(data)
    if not data.exists():
        raise DataNotFound(f"--data folder not found: {data}")
    if not data.is_dir():
        raise UsageError(f"--data must be a folder of class subfolders, not a file: {data}")
    splits = {SPLIT_DIRS[p.name.lower()]: p for p in class_dirs(data) if p.name.lower() in SPLIT_DIRS}
    if split is not None:
        split = SPLIT_DIRS.get(split.lower(), split.lower())
        if not splits:
            raise UsageError(f"--split {split} given, but {data} has no train/ val/ test/ subfolders")
        if split not in splits:
            raise UsageError(f"{data} has no {split}/ folder (it has {', '.join(sorted(splits))})")
    elif splits:
        split = "test" if "test" in splits else "val" if "val" in splits else None
        if split is None:
            raise UsageError(f"{data} has {', '.join(sorted(splits))}/ but no test/ or val/; pass --split")
    folder = splits[split] if split else data
    classes = {}
    for sub in class_dirs(folder):
        files = list_images(sub)
        if files:
            classes[sub.name] = files
    if not classes:
        loose = len(loose_images(folder))
        found = f"; {loose} image(s) sit directly in it" if loose else ""
        raise DataLayoutError(f"no images in class subfolders of {folder}{found} ({PER_CLASS_HINT}, "
                              f"e.g. {folder}/cat/1.jpg)")
    return classes, split


def evaluate_model(cfg: EvaluateConfig) -> EvaluateResult:
    """Predict every image of the labelled folder with the exported model and score it."""
    if cfg.out:
        guard_out(Path(cfg.out), cfg.force)  # before any work
    per_class, split = labelled_files(cfg.data, cfg.split)
    if split == "train":
        log.warning("scoring the train split of %s: if the model was fitted on these images, its accuracy here "
                    "is higher than on new photos (val or test say that)", cfg.data)
    meta = zip_metadata(cfg.model)  # the classes, before TensorFlow is imported
    if meta is None:  # an older export: they are in the model
        _, meta = load_exported(cfg.model)
    model_classes = [str(c) for c in meta["class_names"]]
    unknown = sorted(set(per_class) - set(model_classes))
    if unknown:
        raise UsageError(f"the class folders of {cfg.data} ({', '.join(sorted(per_class))}) are not the model's "
                         f"classes ({', '.join(model_classes)}); not known to the model: {', '.join(unknown)}")
    missing = [c for c in model_classes if c not in per_class]
    if missing:
        log.warning("%s has no images of %s: scoring the other classes only", cfg.data, ", ".join(missing))
    truth = {str(p): c for c, files in per_class.items() for p in files}
    files = [Path(p) for p in truth]
    result = predict(cfg.model, files, batch_size=cfg.batch_size, runtime=cfg.runtime, precision=cfg.precision)
    index = {c: i for i, c in enumerate(result.class_names)}
    rows = result.rows
    y = np.array([index[truth[r["path"]]] for r in rows])
    proba = np.array([[r["probabilities"][c] for c in result.class_names] for r in rows], dtype=np.float64)
    k = len(result.class_names)
    proba = np.clip(proba, 1e-15, 1)
    proba = normalise_proba(proba)  # float32 softmax outputs sum to 1 only within ~1e-7
    s = split_scores(proba, y, result.class_names)
    mistakes = [{"path": r["path"], "true": truth[r["path"]], "predicted": r["class"],
                 "probability": r["probability"], "p_true": r["probabilities"][truth[r["path"]]]}
                for r in rows if r["class"] != truth[r["path"]]]
    mistakes.sort(key=lambda m: (-m["probability"], m["path"]))
    res = EvaluateResult(
        model=str(cfg.model), data=str(cfg.data), split=split, classes=result.class_names, n=len(rows),
        accuracy=s["accuracy"], balanced_accuracy=s["balanced_accuracy"], log_loss=s["log_loss"],
        confusion_matrix=s["confusion_matrix"],
        per_class=s["per_class"],
        chance=float(np.bincount(y, minlength=k).max() / len(y)), roc_auc=s.get("roc_auc"),
        mistakes=mistakes, failed=result.failed)
    if cfg.out:
        res.out = write_outputs(res, Path(cfg.out))
    log.info("%s on %s: accuracy %.4f on %d images (%d mistakes, %d unreadable)", cfg.model, cfg.data,
             res.accuracy, res.n, len(mistakes), len(res.failed))
    return res


def _scalars(res: EvaluateResult) -> dict[str, Any]:
    out = {"n": res.n, "accuracy": res.accuracy, "balanced_accuracy": res.balanced_accuracy,
           "log_loss": res.log_loss}
    if res.roc_auc is not None:
        out["roc_auc"] = res.roc_auc
    return out


def to_json(res: EvaluateResult) -> dict[str, Any]:
    """Everything, JSON-ready."""
    d = asdict(res)
    d["out"] = str(res.out) if res.out else None
    return d


OUTPUT_FILES = ("metrics.json", "evaluation.json", "mistakes.csv", "figures/confusion.png")


def _is_evaluation(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"model", "data", "split", "classes", "splits", "chance"} <= set(data)


def guard_out(out: Path, force: bool) -> None:
    """Refuse (exit 2) an --out that is a file, or a folder holding files of our names that an earlier
    ``tlpipe evaluate`` did not write (its evaluation.json says so), unless ``force``."""
    check_out_path(out, "folder")
    if force or not out.is_dir() or _is_evaluation(out / "evaluation.json"):
        return
    clash = [name for name in OUTPUT_FILES if (out / name).exists()]
    if clash:
        raise OutputExists(f"{out} holds {', '.join(clash)}, not written by tlpipe evaluate; not replacing them: "
                           "pass --force to replace them, or --out to write elsewhere")


def write_outputs(res: EvaluateResult, out: Path) -> Path:
    """metrics.json (the figures to compare), evaluation.json (all), mistakes.csv, figures/confusion.png."""
    out.mkdir(parents=True, exist_ok=True)
    name = res.split or Path(res.data).name or "data"
    write_json(out / "metrics.json", {name: {"accuracy": res.accuracy, "log_loss": res.log_loss}})
    evaluation = {"model": res.model, "data": res.data, "split": res.split, "classes": res.classes,
                  "splits": {name: {**_scalars(res), "confusion_matrix": res.confusion_matrix,
                                    "per_class": res.per_class}},
                  "chance": {name: res.chance}, "failed": res.failed}
    write_json(out / "evaluation.json", evaluation)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "true", "predicted", "probability", "p_true"], lineterminator="\n")
    w.writeheader()
    w.writerows(res.mistakes)
    atomic_write_text(out / "mistakes.csv", buf.getvalue())
    try:
        confusion_figure(evaluation, out / "figures" / "confusion.png",
                         title=f"{Path(res.model).name} on {res.data}" + (f" ({res.split})" if res.split else ""))
    except ImportError as exc:
        log.warning("no confusion.png (%s)", exc)
    return out


def format_result(res: EvaluateResult, fmt: str = "table", max_mistakes: int = 20) -> str:
    """``table`` for people (mistakes: the ``max_mistakes`` worst) or ``json`` (everything)."""
    if fmt == "json":
        return json.dumps(to_json(res), indent=2) + "\n"
    if fmt != "table":
        raise UsageError(f"unknown format '{fmt}': table or json")
    lines = [f"{res.model} on {res.data}" + (f" ({res.split} split)" if res.split else "") + f": {res.n} images",
             f"  accuracy          {res.accuracy:.4f}   (chance {res.chance:.4f})",
             f"  balanced accuracy {res.balanced_accuracy:.4f}",
             f"  log loss          {res.log_loss:.4f}"]
    if res.roc_auc is not None:
        lines.append(f"  ROC AUC           {res.roc_auc:.4f}")
    corner = "true \\ predicted"
    width = max(len(c) for c in res.classes + [corner])
    cell = max(6, max(len(c) for c in res.classes))
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              f"  {corner:{width}s} " + " ".join(f"{c:>{cell}s}" for c in res.classes)]
    lines += [f"  {c:{width}s} " + " ".join(f"{v:>{cell}d}" for v in row)
              for c, row in zip(res.classes, res.confusion_matrix)]
    lines += ["", f"  {'class':{width}s} precision recall support"]
    lines += [f"  {c:{width}s} {p['precision']:9.4f} {p['recall']:6.4f} {p['support']:7d}"
              for c, p in res.per_class.items()]
    lines.append("")
    if res.mistakes:
        shown = res.mistakes[:max_mistakes]
        lines.append(f"mistakes ({len(res.mistakes)}, most confident first"
                     + (f"; the first {len(shown)}, all in mistakes.csv with --out" if len(shown) < len(res.mistakes)
                        else "") + "):")
        pw = max(len(m["path"]) for m in shown)
        tw, qw = max(cell, 4), max(cell, 9)
        lines.append(f"  {'path':{pw}s}  {'true':{tw}s}  {'predicted':{qw}s}  probability")
        lines += [f"  {m['path']:{pw}s}  {m['true']:{tw}s}  {m['predicted']:{qw}s}  {m['probability']:.4f}"
                  for m in shown]
    else:
        lines.append("no mistakes")
    if res.failed:
        lines.append(f"\nunreadable ({len(res.failed)}):")
        lines += [f"  {f['path']}: {f['reason']}" for f in res.failed]
    if res.out:
        lines.append(f"\n-> {res.out}")
    return "\n".join(lines) + "\n"
