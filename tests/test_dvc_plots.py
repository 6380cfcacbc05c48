"""`dvc plots show` with the real dvc.yaml: curves (train/tune/val, accuracy and loss), the C/k grid,
the PNG figures, and a page that draws offline (vega inlined, no CDN script)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.reporting.curves import CURVE_COLUMNS, ROC_COLUMNS, curve_rows, roc_rows
from pipeline.reporting.depth_plot import write_depth_plot
from pipeline.reporting.plots import write_head_figures
from pipeline.reporting.report import ReportConfig, report
from tests.head_fixtures import write_head

REPO = Path(__file__).resolve().parents[1]


def _dvc(*args, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_offline_template_is_configured_and_self_contained():
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"html_template\s*=\s*plots/offline.html", config)
    page = (REPO / ".dvc" / "plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    for lib in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {lib}" in page


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.slow
def test_dvc_plots_show_draws_offline(tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["extract"]["bases"] = ["vgg16"]
    params["fit_head"]["heads"] = ["logistic", "dense"]
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    assert _dvc("init", "-q", cwd=work).returncode == 0
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots")
    assert _dvc("config", "plots.html_template", "plots/offline.html", cwd=work).returncode == 0
    for head in ("logistic", "dense"):
        folder = write_head(work / "cache" / "dvc" / "heads" / f"vgg16-{head}", head=head)
        if head == "dense":  # the head folder has both files: the one that does not apply is header-only
            _write_csv(folder / "grid.csv", ["param", "value", "cv_accuracy", "cv_log_loss", "train_accuracy",
                                             "train_loss"], [])
        else:
            _write_csv(folder / "history.csv", ["epoch", "train_accuracy", "train_loss", "tune_accuracy",
                                                "tune_loss", "val_accuracy", "val_loss", "seconds"], [])
        history, grid = (list(csv.DictReader((folder / name).read_text().splitlines()))
                         for name in ("history.csv", "grid.csv"))
        rows = curve_rows(history, grid)  # as fit_head writes curves.csv
        _write_csv(folder / "curves.csv", CURVE_COLUMNS, [[r[c] for c in CURVE_COLUMNS] for r in rows])
        _write_csv(folder / "predictions.csv", ["split", "id", "actual", "predicted", "probability"],
                   [["val", "a.png", "cat", "cat", 0.9], ["val", "b.png", "dog", "cat", 0.6]])
        y = np.arange(30) % 3  # three classes: one-vs-rest curves and the averages
        p = np.random.default_rng(0).dirichlet(np.ones(3), 30) + np.eye(3)[y]
        roc = roc_rows(y, p / p.sum(1, keepdims=True), ["cat", "dog", "eel"])
        _write_csv(folder / "roc.csv", ROC_COLUMNS, [[r[c] for c in ROC_COLUMNS] for r in roc])
        write_depth_plot(folder, [])  # as fit_head writes it for a head without a depth choice: header only
        assert write_head_figures(folder)
    report(ReportConfig(cache_dir=work / "cache" / "dvc"))

    shown = _dvc("plots", "show", "--json", cwd=work)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    shown = json.loads(shown.stdout)
    assert not shown.get("errors"), shown.get("errors")
    data = shown["data"]
    assert "cache/dvc/heads/vgg16-dense/history.csv" not in data  # drawn from curves.csv
    curves = data["cache/dvc/heads/vgg16-dense/curves.csv"][0]["content"]
    assert curves["facet"]["field"] == "panel"  # one panel per panel value in the data: none empty
    assert {v["panel"] for v in curves["data"]["values"]} == {"accuracy per epoch", "loss per epoch"}
    assert {v["series"] for v in curves["data"]["values"]} == {"train", "tune", "val"}
    grid = data["cache/dvc/heads/vgg16-logistic/curves.csv"][0]["content"]
    assert {v["panel"] for v in grid["data"]["values"]} == {"accuracy against log10 C", "log loss against log10 C"}
    assert len({v["x"] for v in grid["data"]["values"]}) == 6
    roc = data["cache/dvc/heads/vgg16-logistic/roc.csv"][0]["content"]
    assert roc["layer"][1]["encoding"]["color"]["field"] == "curve"
    assert {v["class"] for v in roc["data"]["values"]} == {"cat", "dog", "eel", "micro-average", "macro-average"}
    assert "cache/dvc/heads/vgg16-dense/figures/curves.png" in data
    comparison = data["cache/dvc/plots/comparison.csv"][0]["content"]
    assert comparison["encoding"]["x"]["scale"] == {"zero": False} and comparison["mark"]["type"] == "point"
    assert "cache/dvc/heads/vgg16-logistic/figures/grid.png" in data and "cache/dvc/plots/comparison.png" in data

    html = _dvc("plots", "show", "-o", "out", cwd=work)
    assert html.returncode == 0, html.stdout + html.stderr
    page = (work / "out" / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?https?://", page)
    assert "cdn.jsdelivr" not in page and "/* vega-embed@6" in page and "vegaEmbed(" in page
    assert '"hconcat"' in page and "curves.png" in page
