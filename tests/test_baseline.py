"""The from-scratch baseline and --tensorboard, on tiny synthetic images (32 px, 1-2 epochs)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.stage3.baseline import BaselineConfig, baseline, data_name
from pipeline.cli import cli
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HISTORY_COLUMNS, HeadParams
from tests.test_finetune import _colour_folder

SCHEMA = ["model.keras", "metrics.json", "evaluation.json", "history.csv", "grid.csv", "predictions.csv",
          "roc.csv", "model/head.json", "figures/curves.png", "figures/confusion.png"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _colour_folder(tmp_path_factory.mktemp("data") / "colours")


def _cfg(data, tmp_path, **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 8)
    return BaselineConfig(data=str(data), split="60/20/20", input_size=32, cache_dir=tmp_path / "cache", **kw)


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_baseline_writes_the_head_folder_schema_and_a_standalone_model(data, tmp_path):
    out = baseline(_cfg(data, tmp_path, epochs=2, patience=5))
    assert out == tmp_path / "cache" / "baseline" / "colours"
    for name in SCHEMA:
        assert (out / name).is_file(), name
    assert not (out / ".checkpoint").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"val", "test", "fit_seconds"} and set(m["val"]) == {"accuracy", "log_loss"}
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["base"] == ev["head"] == "scratch-cnn" and ev["weights"] == ["scratch"]
    assert ev["tuning"]["method"] == "early stopping on a 10% stratified slice of train"
    assert ev["tuning"]["val_used_for_tuning"] is False and ev["tuning"]["param"] == "epochs"
    assert ev["baseline"]["augment"] == "flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1"
    assert [s["id"] for s in ev["baseline"]["skipped"]] == ["red/broken.jpg"]  # skipped as extract does
    assert sum(ev["splits"][s]["n"] for s in ("train", "val", "test")) == 36
    hist = _history(out)
    assert list(hist[0]) == HISTORY_COLUMNS and [int(r["epoch"]) for r in hist] == [0, 1, 2]

    # the same split as extract: the same ids per split as a features file of the same source
    feats = extract(ExtractConfig(base="vgg16", data=str(data), weights="none", input_size=32, batch_size=16,
                                  split="60/20/20", cache_dir=tmp_path / "cache", progress=False))
    from pipeline.store.features import load_features

    fs = load_features(feats)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    for split in ("val", "test"):
        assert sorted(r["id"] for r in rows if r["split"] == split) == sorted(fs.splits[split].ids)

    # model.keras: uint8 images of any size in, probabilities out, loads without tlpipe
    from pipeline.data.images import decode_image
    from tests.test_export_formats import run_without_tlpipe

    files = sorted((data / "blue").iterdir())[:4]
    batch = np.stack([decode_image(f, 32) for f in files])
    got = run_without_tlpipe("keras", out / "model.keras", {"image": batch}, tmp_path)
    assert got.shape == (4, 3) and np.allclose(got.sum(1), 1, atol=1e-5)
    r = CliRunner().invoke(cli, ["predict", "--model", str(out / "model.keras"), str(files[0]), "--format", "csv"])
    assert r.exit_code == 0, r.output
    pred = list(csv.DictReader(line for line in r.output.splitlines() if "," in line))
    assert abs(float(pred[0]["probability"]) - got[0].max()) < 1e-4


def test_resume_after_a_kill_and_finish_with_fewer_epochs(data, tmp_path):
    out = tmp_path / "bl"

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        baseline(_cfg(data, tmp_path, out=out, epochs=3, patience=5, after_epoch=stop))
    state = json.loads((out / ".checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / "metrics.json").exists()
    seen = []
    baseline(_cfg(data, tmp_path, out=out, epochs=2, patience=5, after_epoch=seen.append))
    assert seen == [2]  # resumed at epoch 2 (a smaller --epochs finishes a run stopped for time)
    assert [int(r["epoch"]) for r in _history(out)] == [0, 1, 2]
    assert json.loads((out / "evaluation.json").read_text())["baseline"]["epochs_run"] == 2


def test_other_settings_are_refused_without_force(data, tmp_path):
    args = ["baseline", "--data", str(data), "--split", "60/20/20", "--input-size", "32", "--epochs", "1",
            "--batch-size", "8", "--augment", "none", "--cache-dir", str(tmp_path / "cache")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "scratch-cnn from scratch" in r.output and "best epoch" in r.output
    r = CliRunner().invoke(cli, args + ["--lr", "0.01"])
    assert r.exit_code == 2 and "--force" in r.output and "lr 0.0003 -> 0.01" in r.output
    r = CliRunner().invoke(cli, args + ["--lr", "0.01", "--force"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, args[:-2] + ["--input-size", "8"])
    assert r.exit_code == 2


def test_tensorboard_logs_for_baseline_and_the_dense_head(data, tmp_path, caplog):
    baseline(_cfg(data, tmp_path, augment="none", tensorboard=tmp_path / "tb_baseline"))
    assert list((tmp_path / "tb_baseline").rglob("events.out.tfevents.*"))
    feats = extract(ExtractConfig(base="vgg16", data=str(data), weights="none", input_size=32, batch_size=16,
                                  cache_dir=tmp_path / "cache", progress=False))
    with caplog.at_level(logging.WARNING):  # (before the CLI, which sets up logging its own way)
        fit_head(FitConfig(features=[feats], head="logistic", cache_dir=tmp_path / "cache",
                           tensorboard=tmp_path / "tb_logistic"))
    assert "--tensorboard ignored" in caplog.text and not (tmp_path / "tb_logistic").exists()
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(feats), "--head", "dense", "--epochs", "2",
                                 "--cache-dir", str(tmp_path / "cache"), "--tensorboard", str(tmp_path / "tb_dense")])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "tb_dense").rglob("events.out.tfevents.*"))


def test_report_shows_baseline_beside_frozen_and_finetuned_rows(data, tmp_path):
    from pipeline.stage3.finetune import FineTuneConfig, fine_tune
    from pipeline.reporting.report import ReportConfig, report

    cache = tmp_path / "cache"
    feats = extract(ExtractConfig(base="mobilenet_0.25", data=str(data), weights="none", input_size=32,
                                  batch_size=16, cache_dir=cache, split="60/20/20", progress=False))
    head = fit_head(FitConfig(features=[feats], head="logistic", cache_dir=cache))
    fine_tune(FineTuneConfig(head=head, cache_dir=cache, unfreeze="3", epochs=1, batch_size=8, augment="none"))
    baseline(_cfg(data, tmp_path, augment="none"))
    md = report(ReportConfig(cache_dir=cache)).read_text()
    rows = json.loads((cache / "report.json").read_text())["rows"]
    assert {r["head"] for r in rows} == {"logistic", "logistic+ft", "scratch-cnn"}
    base = next(r for r in rows if r["head"] == "scratch-cnn")
    assert base["weights"] == "scratch" and base["base"] == "scratch-cnn" and base["status"] == "ok"
    assert "early stopping" in base["tuned_on"] and base["test_accuracy"] is not None
    assert len({r["data_index"] for r in rows}) == 1  # the same data as the heads: one legend entry
    assert "| scratch-cnn | scratch-cnn | scratch |" in md and "**Baseline:**" in md


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        out = baseline(BaselineConfig(data="tfds:cats_vs_dogs", input_size=32, epochs=1, batch_size=8,
                                      augment="none", cache_dir=tmp_path / "cache"))
    assert out.name == "cats_vs_dogs"
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["data_source"].startswith("tfds:cats_vs_dogs") and ev["classes"] == ["cat", "dog"]


def test_data_name():
    assert data_name("tfds:cats_vs_dogs") == "cats_vs_dogs"
    assert data_name("../shared/data/trashnet/") == "trashnet"
