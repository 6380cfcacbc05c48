"""`tlpipe evaluate`: an exported model scored on a labelled folder (flat or with splits)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.deploy.evaluate import EvaluateConfig, evaluate_model
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams
from tests.test_export_predict import BASE, _colour_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A logistic head on random-weights vgg16 features of coloured images, exported to .keras."""
    root = _colour_folder(tmp_path_factory.mktemp("data") / "colours", per_class=10)
    cache = tmp_path_factory.mktemp("cache")
    features = extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=32, batch_size=8,
                                     cache_dir=cache, progress=False))
    head = fit_head(FitConfig(features=[str(features)], head="logistic", cache_dir=cache,
                              out=cache / "heads" / "h", params=HeadParams()))
    model = cache / "m.keras"
    r = CliRunner().invoke(cli, ["export", "--head", str(head), "--out", str(model), "--weights", "none",
                                 "--cache-dir", str(cache)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root, model


def _run(args):
    return CliRunner().invoke(cli, args)


def test_flat_folder_scores_and_lists_mistakes(exported, tmp_path):
    root, model = exported
    data = tmp_path / "labelled"
    shutil.copytree(root, data)
    # make mistakes certain: blue images filed under red
    for p in sorted((data / "blue").iterdir())[:3]:
        p.rename(data / "red" / ("moved_" + p.name))
    (data / "green" / "broken.jpg").write_bytes(b"not an image")
    r = _run(["evaluate", "--model", str(model), "--data", str(data), "--format", "json", "--out",
              str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["split"] is None and res["classes"] == ["blue", "green", "red"]
    assert res["n"] == 30 and len(res["failed"]) == 1 and "broken.jpg" in res["failed"][0]["path"]
    cm = res["confusion_matrix"]
    assert sum(map(sum, cm)) == 30 and sum(cm[i][i] for i in range(3)) / 30 == pytest.approx(res["accuracy"])
    assert len(res["mistakes"]) == 30 - sum(cm[i][i] for i in range(3)) >= 3
    probs = [m["probability"] for m in res["mistakes"]]
    assert probs == sorted(probs, reverse=True)
    moved = [m for m in res["mistakes"] if "moved_" in m["path"]]
    assert len(moved) == 3 and all(m["true"] == "red" and m["predicted"] == "blue" for m in moved)
    assert set(res["per_class"]["red"]) >= {"precision", "recall"} and 0 < res["log_loss"]
    assert 0 < res["balanced_accuracy"] <= 1
    out = tmp_path / "ev"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["labelled"]) == {"accuracy", "log_loss"}
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["splits"]["labelled"]["confusion_matrix"] == cm
    with open(out / "mistakes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(res["mistakes"]) and set(rows[0]) == {"path", "true", "predicted", "probability",
                                                                  "p_true"}
    assert (out / "figures" / "confusion.png").stat().st_size > 1000
    table = _run(["evaluate", "--model", str(model), "--data", str(data)])
    assert table.exit_code == 0
    assert "balanced accuracy" in table.output and "confusion matrix" in table.output
    assert "mistakes (" in table.output and "moved_" in table.output and "unreadable (1)" in table.output


def test_split_folder_uses_test_then_val_or_the_named_split(exported, tmp_path, caplog):
    root, model = exported
    data = tmp_path / "split"
    for split, classes in (("train", ["blue", "green", "red"]), ("val", ["blue", "red"]), ("test", ["green"])):
        for c in classes:
            (data / split / c).mkdir(parents=True)
            for p in sorted((root / c).iterdir())[:2]:
                shutil.copy(p, data / split / c / p.name)
    res = evaluate_model(EvaluateConfig(model=model, data=data))
    assert res.split == "test" and res.n == 2
    res = evaluate_model(EvaluateConfig(model=model, data=data, split="val"))
    assert res.split == "val" and res.n == 4
    import logging

    with caplog.at_level(logging.WARNING, logger="pipeline.deploy.evaluate"):
        assert evaluate_model(EvaluateConfig(model=model, data=data, split="train")).split == "train"
    assert "scoring the train split" in caplog.text
    shutil.rmtree(data / "test")
    assert evaluate_model(EvaluateConfig(model=model, data=data)).split == "val"
    r = _run(["evaluate", "--model", str(model), "--data", str(data), "--split", "test"])
    assert r.exit_code == 2 and "has no test/ folder" in r.output


def test_usage_errors(exported, tmp_path):
    root, model = exported
    wrong = tmp_path / "wrong"
    for c in ("red", "purple"):
        shutil.copytree(root / "red", wrong / c)
    r = _run(["evaluate", "--model", str(model), "--data", str(wrong)])
    assert r.exit_code == 2
    assert "(purple, red) are not the model's classes (blue, green, red)" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _run(["evaluate", "--model", str(model), "--data", str(tmp_path / "nothere")])
    assert r.exit_code == 2 and "not found" in r.output
    r = _run(["evaluate", "--model", str(model), "--data", str(model)])
    assert r.exit_code == 2 and "not a file" in r.output
    r = _run(["evaluate", "--model", str(tmp_path / "no.keras"), "--data", str(root)])
    assert r.exit_code == 2 and "not found" in r.output
    r = _run(["evaluate", "--model", str(model), "--data", str(root), "--split", "val"])
    assert r.exit_code == 2 and "no train/ val/ test/ subfolders" in r.output


def test_predict_and_evaluate_never_replace_a_file_the_user_made(exported, tmp_path):
    """predict --out replaces an earlier prediction file, not a file the user made (exit 2, unchanged)
    unless --force; evaluate --out likewise for files of its names in the folder; a folder where a
    file goes (or the reverse) is one line, exit 2, before any work."""
    root, model = exported
    mine = tmp_path / "notes.csv"
    mine.write_text("my own notes\n")
    r = _run(["predict", "--model", str(model), str(root), "--out", str(mine), "--format", "csv"])
    assert r.exit_code == 2 and "not a prediction file written by tlpipe" in r.output and "--force" in r.output
    assert mine.read_text() == "my own notes\n"
    for fmt in ("csv", "json", "table"):
        out = tmp_path / f"p.{fmt}"
        for _ in range(2):  # the second run replaces the first run's file
            r = _run(["predict", "--model", str(model), str(root / "red"), "--out", str(out), "--format", fmt])
            assert r.exit_code == 0, r.output
    r = _run(["predict", "--model", str(model), str(root / "red"), "--out", str(mine), "--force"])
    assert r.exit_code == 0 and mine.read_text().startswith("path")
    r = _run(["predict", "--model", str(model), str(root), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"precious": 1}')
    (folder / "other.txt").write_text("kept")
    r = _run(["evaluate", "--model", str(model), "--data", str(root), "--out", str(folder)])
    assert r.exit_code == 2 and "metrics.json, not written by tlpipe evaluate" in r.output
    assert (folder / "metrics.json").read_text() == '{"precious": 1}'
    assert not (folder / "evaluation.json").exists()
    fresh = tmp_path / "fresh"
    for _ in range(2):  # an earlier evaluation is replaced
        r = _run(["evaluate", "--model", str(model), "--data", str(root), "--out", str(fresh)])
        assert r.exit_code == 0, r.output
    r = _run(["evaluate", "--model", str(model), "--data", str(root), "--out", str(folder), "--force",
              "--runtime", "keras"])
    assert r.exit_code == 0 and "precious" not in (folder / "metrics.json").read_text()
    assert (folder / "other.txt").read_text() == "kept"
    r = _run(["evaluate", "--model", str(model), "--data", str(root), "--out", str(mine)])
    assert r.exit_code == 2 and "is a file" in r.output
