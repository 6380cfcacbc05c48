"""PNG figures with matplotlib (Agg backend, imported only when a figure is drawn).

``write_head_figures(head_dir)`` draws what a fitted head folder holds:
  figures/curves.png     train / tune / val accuracy and loss per epoch (history.csv), two panels,
                         whole epochs, legend below, the restored best epoch marked
  figures/grid.png       cross-validated accuracy and log loss against C or k (grid.csv)
  figures/confusion.png  confusion matrices of val (and test) with class names (evaluation.json)
``write_comparison_figure(rows, path)`` draws val (and test) accuracy per features-head, on an
axis zoomed to the data (not from 0), with the chance level marked when it is in range.
Missing or empty inputs are skipped, never an error. Text in non-Latin scripts (class names) is
drawn with an installed font that has its glyphs (``font_families``), with one warning when none has.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

COLOURS = {"train": "#1f77b4", "tune": "#2ca02c", "val": "#d62728", "test": "#9467bd", "cv": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_FONT_WARNED: list[str] = []  # the missing characters once warned about (one warning per process)


def installed_fonts() -> list[tuple[str, str]]:
    """(family name, file) of the fonts matplotlib knows, DejaVu Sans first; never the "Last Resort"
    font (a box for every character)."""
    from matplotlib import font_manager

    fonts = [(f.name, f.fname) for f in font_manager.fontManager.ttflist if "last resort" not in f.name.lower()]
    return sorted(set(fonts), key=lambda f: (f[0] != "DejaVu Sans", f[0], f[1]))


@functools.cache
def _charmap(fname: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(fname).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def font_families(texts: Iterable[Any]) -> list[str]:
    """Font families (DejaVu Sans, then fallbacks) that draw every character of ``texts``, for
    matplotlib's per-glyph fallback; warns once when no installed font has some of them (they
    would show as empty boxes)."""
    chars = {ord(c) for t in texts for c in str(t) if ord(c) > 0x7F and not c.isspace()}
    families = ["DejaVu Sans"]
    if not chars:
        return families
    fonts = installed_fonts()
    missing = set(chars)
    for name, fname in fonts:  # DejaVu Sans first, then any font that adds a missing character
        have = missing & _charmap(fname)
        if have and (name == "DejaVu Sans" or name not in families):
            if name not in families:
                families.append(name)
            missing -= have
        if not missing:
            break
    if missing and not _FONT_WARNED:
        sample = "".join(chr(c) for c in sorted(missing)[:8])
        _FONT_WARNED.append(sample)
        log.warning("no installed font has the characters %r (e.g. in class names): they show as empty boxes "
                    "in the figures; install a font that covers them (e.g. Noto Sans CJK: fonts-noto-cjk) "
                    "and run again", sample)
    return families


@contextlib.contextmanager
def text_fonts(texts: Iterable[Any]):
    """Draw with fonts that have the glyphs of ``texts`` (see ``font_families``); matplotlib's own
    "Glyph missing" warnings are silenced (``font_families`` said it once)."""
    import matplotlib

    with matplotlib.rc_context({"font.family": font_families(texts)}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from (current )?font")
        warnings.filterwarnings("ignore", message=r"findfont: Font family")
        yield


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _column(rows: list[dict[str, str]], name: str) -> list[float] | None:
    """The column as floats, or None when it is absent or has no number at all."""
    if not rows or name not in rows[0]:
        return None
    out = []
    for r in rows:
        try:
            out.append(float(r[name]))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out if any(not math.isnan(v) for v in out) else None


PNG_SOFTWARE = "tlpipe"  # the PNG's Software text: how a later run knows the file is tlpipe's (``is_tlpipe_png``)


def is_tlpipe_png(path: Path) -> bool:
    """True for a PNG that tlpipe drew (its ``Software`` text chunk, written by ``_save``)."""
    with open(path, "rb") as fh:
        start = fh.read(1 << 16)
    return start.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in start


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": f"{PNG_SOFTWARE} (Matplotlib)"})
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def _title(evaluation: dict[str, Any], head_dir: Path) -> str:
    base, head = evaluation.get("base"), evaluation.get("head")
    title = f"{base} + {head}" if base and head else head_dir.name
    weights = evaluation.get("weights")
    if weights:
        title += f"  (weights: {', '.join(sorted(set(map(str, weights))))})"
    return title


def curves_figure(history: list[dict[str, str]], path: Path, title: str = "", best: Any = None) -> Path | None:
    """Accuracy and loss per epoch for train, tune and val (two panels, whole epochs on the x axis,
    the legend below them), the restored ``best`` epoch marked; None if nothing to draw."""
    epochs = _column(history, "epoch")
    if epochs is None:
        return None
    with text_fonts([title]):
        return _curves_figure(history, epochs, path, title, best)


def _curves_figure(history, epochs: list[float], path: Path, title: str, best: Any) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    drawn = False
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, style in (("train", "-"), ("tune", "--"), ("val", "-")):
            ys = _column(history, f"{split}_{metric}")
            if ys is not None:
                label = {"tune": "tune (early-stopping slice of train)"}.get(split, split)
                ax.plot(epochs, ys, style, color=COLOURS[split], marker="o", markersize=3, label=label)
                drawn = True
        if isinstance(best, (int, float)) and not isinstance(best, bool):
            ax.axvline(best, color="grey", linestyle=":", linewidth=1.5, label=f"restored best epoch ({best})")
            ax.annotate(f"best epoch {best}", (best, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="dimgrey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric.capitalize()} per epoch")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def grid_figure(grid: list[dict[str, str]], path: Path, title: str = "", chosen: Any = None) -> Path | None:
    """Cross-validated (and train) accuracy and log loss against the grid parameter."""
    values = _column(grid, "value")
    if values is None:
        return None
    with text_fonts([title]):
        return _grid_figure(grid, values, path, title, chosen)


def _grid_figure(grid: list[dict[str, str]], values: list[float], path: Path, title: str, chosen: Any) -> Path:
    param = (grid[0].get("param") or "value").strip()
    order = sorted(range(len(values)), key=lambda i: values[i])
    xs = [values[i] for i in order]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    positive = all(v > 0 for v in xs)
    log_x = positive and (param.lower() == "c" or (len(xs) > 1 and xs[-1] / xs[0] >= 100))
    for ax, metric, label in zip(axes, ("accuracy", "log_loss"), ("accuracy", "log loss")):
        for split, name in (("cv", "cross-validated on train"), ("train", "train (fit on all of train)")):
            col = _column(grid, f"{split}_{metric}" if split == "cv" else f"train_{metric.replace('log_', '')}")
            if col is None:
                continue
            ys = [col[i] for i in order]
            ax.plot(xs, ys, "-" if split == "cv" else "--", marker="o", markersize=4, color=COLOURS[split],
                    label=name)
        if chosen is not None:
            try:
                ax.axvline(float(chosen), color="grey", linestyle=":", label=f"chosen {param}={chosen}")
            except (TypeError, ValueError):
                pass
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(param + (" (log scale)" if log_x else ""))
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} against {param}")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def confusion_figure(evaluation: dict[str, Any], path: Path, title: str = "") -> Path | None:
    """Confusion matrices (rows: true class, columns: predicted) of val and test (else of every
    split but train), counts in cells,
    colour by the share of the true class so that small classes stay readable."""
    with text_fonts([*(evaluation.get("classes") or []), title]):
        return _confusion_figure(evaluation, path, title)


def _confusion_figure(evaluation: dict[str, Any], path: Path, title: str) -> Path | None:
    import numpy as np

    classes = [str(c) for c in evaluation.get("classes") or []]
    splits = evaluation.get("splits") or {}
    drawable = {name: s for name, s in splits.items() if isinstance(s, dict) and s.get("confusion_matrix")}
    panels = [(name, drawable[name]) for name in ("val", "test") if name in drawable]
    if not panels:  # e.g. 'tlpipe evaluate' on a folder without splits: its one entry
        panels = [(name, s) for name, s in drawable.items() if name != "train"]
    if not panels:
        return None
    k = len(np.asarray(panels[0][1]["confusion_matrix"]))
    if len(classes) != k:
        classes = [str(i) for i in range(k)]
    cell = 0.45 if k > 10 else 0.9
    side = max(3.6, cell * k + 1.8)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 0.6, side + 1.2), squeeze=False,
                             layout="constrained")
    for ax, (name, s) in zip(axes[0], panels):
        cm = np.asarray(s["confusion_matrix"], dtype=float)
        share = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=10 if k <= 10 else 7,
                            color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        fs = 10 if k <= 10 else 7
        ax.set_xticklabels(classes, rotation=45 if k > 2 else 0, ha="right" if k > 2 else "center", fontsize=fs)
        ax.set_yticklabels(classes, fontsize=fs)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = s.get("accuracy")
        n = s.get("n", int(cm.sum()))
        ax.set_title(f"{name}: n={n}" + (f", accuracy {100 * acc:.1f} %" if isinstance(acc, (int, float)) else ""))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def write_head_figures(head_dir: str | Path) -> list[Path]:
    """Draw ``figures/curves.png``, ``grid.png`` and ``confusion.png`` of a head folder from its
    history.csv, grid.csv and evaluation.json; return the files written (missing inputs skipped; the
    folder is made even when empty, since dvc.yaml lists it as an output)."""
    head_dir = Path(head_dir)
    figures = head_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)  # always there: dvc.yaml lists it as an output
    evaluation: dict[str, Any] = {}
    eval_path = head_dir / "evaluation.json"
    if eval_path.is_file():
        try:
            evaluation = json.loads(eval_path.read_text())
        except ValueError:
            log.warning("%s: not JSON; no confusion figure", eval_path)
    title = _title(evaluation, head_dir)
    written = []
    tuning = evaluation.get("tuning") or {}
    chosen = tuning.get("chosen")
    best = chosen if tuning.get("param") == "epochs" else None  # the epoch whose weights were restored
    for make in (lambda: curves_figure(_read_csv(head_dir / "history.csv"), figures / "curves.png", title, best),
                 lambda: grid_figure(_read_csv(head_dir / "grid.csv"), figures / "grid.png", title, chosen),
                 lambda: confusion_figure(evaluation, figures / "confusion.png", title)):
        path = make()
        if path is not None:
            written.append(path)
    log.debug("%d figures -> %s", len(written), figures)  # head_dir is often the temporary folder
    return written


def _bar_label(row: dict[str, Any]) -> str:
    """A comparison bar's label: the model, or features-head; marked when its weights were random."""
    label = row.get("model") or f"{row.get('features')}-{row.get('head')}"
    if "none" in str(row.get("weights") or "").split(", "):
        label += "  [RANDOM WEIGHTS]"
    return label


def _zoomed_range(values) -> tuple[float, float]:
    """An accuracy axis zoomed to ``values`` (padded, within 0..1, at least 2 points wide)."""
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.01, 0.15 * (hi - lo))
    x0, x1 = max(0.0, lo - pad), min(1.0, hi + pad)
    if x1 - x0 < 0.02:
        x0, x1 = max(0.0, x1 - 0.02), max(x1, 0.02)
    return x0, x1


def write_comparison_figure(rows: Iterable[dict[str, Any]], path: str | Path) -> Path | None:
    """Horizontal bars of val (and test) accuracy per features-head, best on top.

    Each row needs ``val_accuracy`` and a label (``model``, or ``features`` and ``head``); optional
    ``test_accuracy``, ``chance_val`` and ``weights`` (rows with weights ``none`` are marked).
    The axis is zoomed to the data, so small differences show; it is labelled as such."""
    rows = [r for r in rows if isinstance(r.get("val_accuracy"), (int, float))]
    if not rows:
        return None
    rows.sort(key=lambda r: r["val_accuracy"])  # barh draws bottom up: best on top
    labels = [_bar_label(r) for r in rows]
    with text_fonts(labels):
        return _comparison_figure(rows, labels, Path(path))


def _comparison_figure(rows: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """The bars of ``write_comparison_figure``."""
    import numpy as np

    val = np.array([r["val_accuracy"] for r in rows], dtype=float)
    test = np.array([r.get("test_accuracy") if isinstance(r.get("test_accuracy"), (int, float)) else np.nan
                     for r in rows], dtype=float)
    has_test = bool(np.isfinite(test).any())
    x0, x1 = _zoomed_range(np.concatenate([val, test[np.isfinite(test)]]))
    chance = [r.get("chance_val") for r in rows if isinstance(r.get("chance_val"), (int, float))]
    plt = _pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.45 * n * (1.6 if has_test else 1) + 1.4)), layout="constrained")
    y = np.arange(n)
    h = 0.38 if has_test else 0.6
    bars = [("val", val, y + (h / 2 if has_test else 0))]
    if has_test:
        bars.append(("test", test, y - h / 2))
    for name, vals, ys in bars:
        ok = np.isfinite(vals)
        ax.barh(ys[ok], vals[ok] - x0, left=x0, height=h, color=COLOURS[name], label=f"{name} accuracy")
        for v, yy in zip(vals[ok], ys[ok]):
            ax.text(v + 0.004 * (x1 - x0), yy, f"{100 * v:.1f} %",
                    va="center", ha="left", fontsize=8)
    if chance:
        c = max(chance)
        if x0 <= c <= x1:
            ax.axvline(c, color="black", linestyle="--", linewidth=1, label=f"chance (majority class) {100 * c:.1f} %")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    for tick, label in zip(ax.get_yticklabels(), labels):
        if label.endswith("[RANDOM WEIGHTS]"):
            tick.set_color("#b00000")
    ax.set_xlim(x0, x1 + 0.08 * (x1 - x0))  # room for the value labels
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f} %" if x1 - x0 > 0.05
                                                   else f"{100 * v:.1f} %"))
    ax.set_xlabel(f"accuracy (axis from {100 * x0:.1f} %, not 0)" if x0 > 0 else "accuracy")
    ax.set_title("Accuracy by features and head")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def learning_curve_figure(summary: list[dict[str, Any]], runs: list[dict[str, Any]], path: str | Path,
                          title: str = "") -> Path | None:
    """Validation accuracy against the number of training images (log axis): each run as a dot, the
    mean per size as a line with min-max band; the size that is all of train is marked (one fit)."""
    if not summary:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    ns = [s["n_train"] for s in summary]
    ax.fill_between(ns, [s["min"] for s in summary], [s["max"] for s in summary], color=COLOURS["val"],
                    alpha=0.15, label="min-max over seeds")
    ax.plot(ns, [s["mean"] for s in summary], "-o", color=COLOURS["val"], label="mean val accuracy")
    ax.scatter([r["n_train"] for r in runs], [r["val_accuracy"] for r in runs], s=12, color="black", alpha=0.5,
               label="one run (seed)", zorder=3)
    whole = [s["n_train"] for s in summary if s.get("whole_train")]
    if whole:
        ax.axvline(whole[0], color="grey", linestyle=":", label=f"all of train ({whole[0]}): one fit")
    if len(ns) > 1 and ns[-1] / ns[0] >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("training images" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("val accuracy")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, Path(path))
