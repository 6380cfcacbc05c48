"""The report: weights per row (random flagged), data sources once, tuned on, pipeline vs other heads."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.reporting.report import ReportConfig, collect, report, weights_label
from tests.head_fixtures import write_head


def _cache(tmp_path, pipeline: bool = False):
    heads = tmp_path / "cache" / "heads"
    made = tmp_path / "cache" / "dvc" / "heads" if pipeline else heads  # the DVC pipeline's folder
    write_head(made / "vgg16-logistic", val=0.97, data="/data/cats")
    write_head(made / "vgg16-dense", head="dense", val=0.985, data="/data/cats")
    write_head(made / "resnet50-dense", base="resnet50", head="dense", val=0.59, weights="none",
               data="/data/cats", limit=50)
    write_head(heads / "m256+m288-rbf-svm", base="mobilenet_0.75", head="rbf-svm", val=0.992, data="/data/cats",
               weights="file:mobilenet_0.75_224_imagenet_notop.weights.h5", features=["a.h5", "b.h5"])
    return tmp_path / "cache"


def test_rows_carry_weights_data_and_tuning(tmp_path):
    rows = {f"{r['features']}-{r['head']}": r for r in collect(_cache(tmp_path) / "heads")}
    assert rows["vgg16-logistic"]["weights"] == "imagenet"
    assert rows["resnet50-dense"]["weights"] == "none"
    assert rows["m256+m288-rbf-svm"]["weights"] == "file:mobilenet_0.75_224_imagenet_notop.weights.h5"
    assert rows["m256+m288-rbf-svm"]["features"] == "m256+m288"
    assert rows["vgg16-logistic"]["tuned_on"] == "5-fold stratified CV on train (C=1.0)"
    assert rows["vgg16-dense"]["tuned_on"].startswith("early stopping on a 10% stratified slice of train")
    assert rows["vgg16-logistic"]["val_accuracy"] == 0.97 and rows["vgg16-logistic"]["test_accuracy"] == 0.94
    assert rows["vgg16-logistic"]["n_train"] == 160 and rows["vgg16-logistic"]["chance_val"] == 0.5
    # two data sources (the limit makes another one), each numbered once
    assert {r["data_index"] for r in rows.values()} == {1, 2}
    assert rows["resnet50-dense"]["data"] == "/data/cats (limit 50)"


def test_markdown_flags_random_weights_lists_sources_once_and_splits_pipeline(tmp_path, monkeypatch):
    cache = _cache(tmp_path, pipeline=True)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["report", "--cache-dir", "cache"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    md = (cache / "report.md").read_text()
    assert md.count("/data/cats`") == 1 and md.count("/data/cats (limit 50)`") == 1
    assert "1. `" in md and "2. `" in md
    assert "**none (RANDOM)**" in md and "**Random weights:** resnet50-dense" in md
    made, other = md.split("## Made by the DVC pipeline")[1].split("## Other heads")
    assert "| vgg16 | vgg16 | logistic |" in made and "| resnet50 | resnet50 | dense |" in made
    assert "rbf-svm" not in made and "| m256+m288 | mobilenet_0.75 | rbf-svm |" in other
    assert "5-fold stratified CV on train (C=1.0)" in md
    data = json.loads((cache / "report.json").read_text())
    assert data["data_sources"] == {"1": "/data/cats", "2": "/data/cats (limit 50)"}
    assert {r["features"] + "-" + r["head"] for r in data["rows"] if r["pipeline"]} == {
        "vgg16-logistic", "vgg16-dense", "resnet50-dense"}
    assert (cache / "plots" / "comparison.csv").read_text().startswith("model,features,base,head,weights")
    assert (cache / "plots" / "comparison.png").stat().st_size > 1000


def test_without_params_one_table(tmp_path, monkeypatch):
    cache = _cache(tmp_path)
    monkeypatch.chdir(tmp_path)
    report(ReportConfig(cache_dir=cache))
    md = (cache / "report.md").read_text()
    assert "## Made by the DVC pipeline" not in md and "| vgg16 | vgg16 | logistic |" in md


def test_the_report_stage_sees_only_the_pipeline_heads(tmp_path):
    cache = _cache(tmp_path, pipeline=True)
    report(ReportConfig(cache_dir=cache / "dvc"))  # as dvc.yaml's report stage runs it
    data = json.loads((cache / "dvc" / "report.json").read_text())
    assert len(data["rows"]) == 3 and all(r["pipeline"] for r in data["rows"])


def test_weights_label():
    assert weights_label(["imagenet", "imagenet"]) == "imagenet"
    assert weights_label(["/w/mobilenet_notop.h5", "none"]) == "file:mobilenet_notop.h5, none"
    assert weights_label(None) == ""


def test_old_layout_is_still_read(tmp_path):
    """A head folder from before evaluation.json had splits: everything in metrics.json."""
    folder = tmp_path / "heads" / "vgg16-logistic"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "base": "vgg16", "head": "logistic", "val": {"n": 10, "accuracy": 0.9, "log_loss": 0.3, "roc_auc": 0.95},
        "train": {"n": 80, "accuracy": 1.0}, "chance": {"val": 0.5}, "fit_seconds": 0.2}))
    (folder / "evaluation.json").write_text(json.dumps({"classes": ["a", "b"], "val": {"confusion_matrix": []}}))
    (row,) = collect(tmp_path / "heads")
    assert row["head"] == "logistic" and row["val_accuracy"] == 0.9 and row["n_train"] == 80
    assert row["val_roc_auc"] == 0.95 and row["chance_val"] == 0.5
    assert row["tuned_on"].startswith("val (older fit")


def test_comparison_tells_a_dvc_head_from_a_hand_run_one(tmp_path, monkeypatch):
    """The same features-head fitted by DVC (cache/dvc/heads) and by hand (cache/heads): two labels."""
    import csv

    import matplotlib.pyplot as plt

    cache = tmp_path / "cache"
    write_head(cache / "heads" / "mobilenet_0.75-logistic", base="mobilenet_0.75", val=0.90)
    write_head(cache / "dvc" / "heads" / "mobilenet_0.75-logistic", base="mobilenet_0.75", val=0.92)
    seen = []
    real_close = plt.close

    def spy(fig=None):
        if fig is not None and getattr(fig, "axes", None):
            seen.extend(t.get_text() for t in fig.axes[0].get_yticklabels())
        return real_close(fig)

    monkeypatch.setattr(plt, "close", spy)
    report(ReportConfig(cache_dir=cache))
    models = [r["model"] for r in csv.DictReader((cache / "plots" / "comparison.csv").read_text().splitlines())]
    assert sorted(models) == ["mobilenet_0.75-logistic", "mobilenet_0.75-logistic (dvc)"]
    assert sorted(seen) == sorted(models)
    # only pipeline heads (the report stage): no suffix
    report(ReportConfig(cache_dir=cache / "dvc"))
    models = [r["model"] for r in csv.DictReader((cache / "dvc" / "plots" / "comparison.csv").read_text().splitlines())]
    assert models == ["mobilenet_0.75-logistic"]


def test_report_never_replaces_a_comparison_file_of_the_users(tmp_path):
    """Every file report writes (report.md, report.json, plots/comparison.csv and .png) is replaced only
    when tlpipe report wrote it; otherwise one line, exit 2, nothing written; --out and --force work."""
    cache = _cache(tmp_path)
    run = CliRunner().invoke
    assert run(cli, ["report", "--cache-dir", str(cache)]).exit_code == 0
    assert run(cli, ["report", "--cache-dir", str(cache)]).exit_code == 0  # its own files: replaced
    md_before = (cache / "report.md").read_bytes()
    for name, mine in (("comparison.csv", b"my,own\n1,2\n"), ("comparison.png", b"\x89PNG\r\n\x1a\nmine")):
        own = (cache / "plots" / name).read_bytes()
        (cache / "plots" / name).write_bytes(mine)
        r = run(cli, ["report", "--cache-dir", str(cache)])
        assert r.exit_code == 2 and "not a report's comparison" in r.output and "--force" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert (cache / "plots" / name).read_bytes() == mine and (cache / "report.md").read_bytes() == md_before
        (cache / "plots" / name).write_bytes(own)
    (cache / "plots" / "comparison.png").write_bytes(b"mine")
    elsewhere = tmp_path / "elsewhere"
    r = run(cli, ["report", "--cache-dir", str(cache), "--out", str(elsewhere)])
    assert r.exit_code == 0, r.output
    assert (elsewhere / "report.md").is_file() and (elsewhere / "plots" / "comparison.png").stat().st_size > 1000
    assert (cache / "plots" / "comparison.png").read_bytes() == b"mine"
    assert run(cli, ["report", "--cache-dir", str(cache), "--force"]).exit_code == 0
    assert (cache / "plots" / "comparison.png").read_bytes() != b"mine"


def test_dvc_report_skips_heads_left_by_an_earlier_experiment(tmp_path, caplog):
    """After -S 'fit_head.heads=[logistic]': DVC removed the dense head's model/, its metrics stay."""
    import logging
    import shutil

    cache = _cache(tmp_path, pipeline=True)
    shutil.rmtree(cache / "dvc" / "heads" / "vgg16-dense" / "model")
    with caplog.at_level(logging.INFO):
        report(ReportConfig(cache_dir=cache / "dvc"))
    data = json.loads((cache / "dvc" / "report.json").read_text())
    assert {r["features"] + "-" + r["head"] for r in data["rows"]} == {"vgg16-logistic", "resnet50-dense"}
    assert any("vgg16-dense: skipped" in m and "earlier DVC experiment" in m for m in caplog.messages)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
