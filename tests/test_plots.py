"""PNG figures of a head folder and of the comparison (matplotlib, Agg)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from pipeline.reporting.plots import write_comparison_figure, write_head_figures
from tests.conftest import REPO, subprocess_env
from tests.head_fixtures import write_head


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_dense_head_gets_curves_and_confusion(tmp_path):
    folder = write_head(tmp_path / "vgg16-dense", head="dense")
    written = write_head_figures(folder)
    names = sorted(p.name for p in written)
    assert names == ["confusion.png", "curves.png"]
    w, h = _png(folder / "figures" / "curves.png")
    assert w > 1.8 * h  # two panels side by side: accuracy and loss
    _png(folder / "figures" / "confusion.png")


@pytest.mark.parametrize("head", ["logistic", "knn"])
def test_grid_head_gets_grid_plot(tmp_path, head):
    folder = write_head(tmp_path / f"vgg16-{head}", head=head, classes=["a", "b", "c"], test=None)
    names = sorted(p.name for p in write_head_figures(folder))
    assert names == ["confusion.png", "grid.png"]
    _png(folder / "figures" / "grid.png")


def test_missing_inputs_are_skipped(tmp_path):
    assert write_head_figures(tmp_path / "empty") == [] and (tmp_path / "empty" / "figures").is_dir()
    folder = write_head(tmp_path / "x-logistic")
    (folder / "grid.csv").unlink()
    (folder / "evaluation.json").write_text("{not json")
    assert write_head_figures(folder) == []


def test_comparison_axis_is_zoomed_and_marks_random_weights(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rows = [{"features": "vgg16", "head": "logistic", "val_accuracy": 0.97, "test_accuracy": 0.965,
             "chance_val": 0.5, "weights": "imagenet"},
            {"features": "resnet50", "head": "dense", "val_accuracy": 0.985, "test_accuracy": 0.98,
             "chance_val": 0.5, "weights": "imagenet"},
            {"features": "vgg16", "head": "dense", "val_accuracy": 0.59, "test_accuracy": None,
             "chance_val": 0.5, "weights": "none"}]
    path = write_comparison_figure(rows, tmp_path / "comparison.png")
    _png(path)
    high = write_comparison_figure(rows[:2], tmp_path / "high.png")
    _png(high)
    assert write_comparison_figure([], tmp_path / "none.png") is None


def test_comparison_axis_limits(tmp_path, monkeypatch):
    """The x axis starts near the lowest bar, not at 0; chance is drawn only when in range."""
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def spy(fig=None):
        if fig is not None and hasattr(fig, "axes") and fig.axes:
            ax = fig.axes[0]
            seen["xlim"] = ax.get_xlim()
            seen["lines"] = [ln.get_label() for ln in ax.get_lines()]
            seen["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        return real_close(fig)

    monkeypatch.setattr(plt, "close", spy)
    rows = [{"model": "a-logistic", "val_accuracy": 0.97, "chance_val": 0.5},
            {"model": "b-logistic", "val_accuracy": 0.99, "chance_val": 0.5, "weights": "none"}]
    write_comparison_figure(rows, tmp_path / "c.png")
    assert 0.9 < seen["xlim"][0] < 0.97
    assert not any("chance" in label for label in seen["lines"])
    assert seen["labels"][-1] == "b-logistic  [RANDOM WEIGHTS]"  # best on top
    rows[0]["val_accuracy"] = 0.55
    write_comparison_figure(rows, tmp_path / "c.png")
    assert any("chance" in label for label in seen["lines"])


def test_import_pipeline_plots_does_not_import_matplotlib():
    code = "import sys, pipeline.reporting.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=REPO)


def _drawn(monkeypatch):
    """Figures as they are saved (the spy keeps each figure before it is closed)."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig

    def spy(self, *a, **k):
        figures.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def test_training_curves_are_readable(tmp_path, monkeypatch):
    """Whole epochs on the x axis, the legend outside the panels, the restored best epoch marked."""
    figures = _drawn(monkeypatch)
    folder = write_head(tmp_path / "vgg16-dense", head="dense")  # 8 epochs, best epoch 4
    write_head_figures(folder)
    fig = next(f for f in figures if len(f.axes) == 2 and f.axes[0].get_xlabel() == "epoch")
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_legend() is None  # no legend over the lines
        best = [ln for ln in ax.get_lines() if ln.get_label().startswith("restored best epoch")]
        assert len(best) == 1 and list(best[0].get_xdata()) == [4, 4]
        assert any(t.get_text() == "best epoch 4" for t in ax.texts)
    assert len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "restored best epoch (4)" in labels and "val" in labels


def test_heads_without_epochs_get_no_curves_panel(tmp_path):
    """fit-head writes curves.csv for DVC: the C grid for logistic (no empty epoch panel), epochs for dense."""
    import csv

    from pipeline.reporting.curves import CURVE_COLUMNS, curve_rows

    folder = write_head(tmp_path / "vgg16-logistic")
    grid = list(csv.DictReader((folder / "grid.csv").read_text().splitlines()))
    rows = curve_rows([], grid)
    assert {r["panel"] for r in rows} == {"accuracy against log10 C", "log loss against log10 C"}
    assert sorted({r["x"] for r in rows}) == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    assert set(rows[0]) == set(CURVE_COLUMNS)
    dense = write_head(tmp_path / "vgg16-dense", head="dense")
    rows = curve_rows(list(csv.DictReader((dense / "history.csv").read_text().splitlines())), [])
    assert {r["panel"] for r in rows} == {"accuracy per epoch", "loss per epoch"}
    assert {r["series"] for r in rows} == {"train", "tune", "val"} and {r["x"] for r in rows} == set(range(1, 9))
    knn = write_head(tmp_path / "vgg16-knn", head="knn")
    knn_grid = list(csv.DictReader((knn / "grid.csv").read_text().splitlines()))
    assert {r["panel"] for r in curve_rows([], knn_grid)} == {"accuracy against k", "log loss against k"}
    assert "curves.png" not in [p.name for p in write_head_figures(folder)]


def test_class_names_in_other_scripts(tmp_path, caplog, monkeypatch):
    """Cyrillic (DejaVu Sans has it): no warning. CJK with no font that has it: one warning, figures written."""
    import logging
    import warnings

    from pipeline.reporting import plots

    monkeypatch.setattr(plots, "_FONT_WARNED", [])
    folder = write_head(tmp_path / "ru-logistic", classes=["кошка", "собака"])
    with caplog.at_level(logging.WARNING, logger="pipeline.reporting.plots"):
        assert "confusion.png" in [p.name for p in write_head_figures(folder)]
    assert "font" not in caplog.text
    assert plots.font_families(["кошка"]) == ["DejaVu Sans"]

    dejavu = [f for f in plots.installed_fonts() if f[0] == "DejaVu Sans"]
    monkeypatch.setattr(plots, "installed_fonts", lambda: dejavu)  # as on a machine without a CJK font
    for i in range(2):
        folder = write_head(tmp_path / f"zh{i}-logistic", classes=["猫", "狗"])
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [p.name for p in write_head_figures(folder)]
        assert "confusion.png" in names and _png(folder / "figures" / "confusion.png")
        assert not [w for w in caught if "Glyph" in str(w.message)]  # matplotlib's, once per glyph: silenced
    warned = [r for r in caplog.records if "no installed font has the characters" in r.getMessage()]
    assert len(warned) == 1 and "猫" in warned[0].getMessage()


def test_a_font_that_has_the_glyphs_is_used(monkeypatch):
    """When some installed font covers the characters, it is added after DejaVu Sans (per-glyph fallback)."""
    from pipeline.reporting import plots

    dejavu = [f for f in plots.installed_fonts() if f[0] == "DejaVu Sans"][0]
    monkeypatch.setattr(plots, "installed_fonts", lambda: [dejavu, ("Fake CJK", "/fake/cjk.ttf")])
    real = plots._charmap
    monkeypatch.setattr(plots, "_charmap", lambda f: frozenset({ord("猫"), ord("狗")}) if f == "/fake/cjk.ttf"
                        else real(f))
    monkeypatch.setattr(plots, "_FONT_WARNED", [])
    assert plots.font_families(["猫", "狗", "кошка"]) == ["DejaVu Sans", "Fake CJK"]
    assert plots._FONT_WARNED == []
