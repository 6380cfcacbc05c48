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
