"""Stage three on tiny synthetic data: fine-tune from a fitted head (mobilenet_0.25, random weights, 32 px)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage3.finetune import FineTuneConfig, block_names, build_models, fine_tune, unfreeze_start
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
BASE = "mobilenet_0.25"


def _colour_folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = 17 + 3 * i, 23 + 5 * (i % 4)
            arr = np.clip(np.array(rgb) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{name}_{i:03d}{'.png' if i % 2 else '.jpg'}")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # skipped at extraction
    return root


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = _colour_folder(tmp_path_factory.mktemp("data") / "colours")
    cache = tmp_path_factory.mktemp("cache")
    feats = extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=32, batch_size=16,
                                  cache_dir=cache, split="60/20/20", progress=False))
    dense = fit_head(FitConfig(features=[feats], head="dense", cache_dir=cache,
                               params=HeadParams(epochs=3, patience=2)))
    logistic = fit_head(FitConfig(features=[feats], head="logistic", cache_dir=cache))
    return {"root": root, "cache": cache, "features": feats, "dense": dense, "logistic": logistic}


def _cfg(heads, head="dense", **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 8)
    return FineTuneConfig(head=heads[head], cache_dir=heads["cache"], unfreeze=kw.pop("unfreeze", "3"), **kw)


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("head", ["dense", "logistic"])
def test_epoch0_matches_head_and_outputs(heads, head, tmp_path):
    out = fine_tune(_cfg(heads, head, out=tmp_path / "ft", epochs=1))
    ev = json.loads((out / "evaluation.json").read_text())
    head_ev = json.loads((heads[head] / "evaluation.json").read_text())
    f = ev["fine_tune"]
    # before any training step, the model on the images scores what the head scored on the cached features
    assert abs(f["epoch0_val_accuracy"] - head_ev["splits"]["val"]["accuracy"]) <= 0.005
    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[0]["val_accuracy"]) == pytest.approx(f["epoch0_val_accuracy"])
    assert ev["head"] == f"{head}+ft" and ev["tuning"]["method"] == "early stopping on a 10% stratified slice of train"
    assert ev["tuning"]["param"] == "epochs" and ev["tuning"]["val_used_for_tuning"] is False
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"val", "test", "fit_seconds"}
    for name in ("model.keras", "predictions.csv", "roc.csv", "grid.csv", "figures/curves.png"):
        assert (out / name).is_file(), name
    assert (out / "grid.csv").read_text().count("\n") == 1
    assert not (out / ".checkpoint").exists()


def test_unfreeze_by_number_block_and_all_keeps_batchnorm_frozen(heads):
    import keras

    from pipeline.heads.folder import read_head_info
    from pipeline.store.features import read_attrs

    model_dir, info = read_head_info(heads["dense"])
    attrs = read_attrs(heads["features"])

    def trainable(spec):
        b = build_models(model_dir, info, attrs, None, spec, "none", 0, {})
        layers = b.base.layers
        bn = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert bn and not any(layer.trainable for layer in bn)
        return b, [layer.name for layer in layers if layer.trainable and layer.weights]

    b, names = trainable("5")  # conv_dw_13_relu, conv_pw_13, conv_pw_13_bn, conv_pw_13_relu, pool
    assert names == ["conv_pw_13"]
    b, names = trainable("conv_dw_13")
    assert names == ["conv_dw_13", "conv_pw_13"]
    b, names = trainable("all")
    assert len(names) == len([layer for layer in b.base.layers if layer.weights
                              and not isinstance(layer, keras.layers.BatchNormalization)])
    assert "conv_dw_13" in block_names(b.base) and "conv1" in block_names(b.base)
    with pytest.raises(Exception, match="out of range"):
        unfreeze_start(b.base, "9999")


def test_unknown_block_lists_valid_names(heads):
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(heads["dense"]), "--cache-dir", str(heads["cache"]),
                                 "--unfreeze", "block42"])
    assert r.exit_code == 2, r.output
    assert "unknown block 'block42'" in r.output and "conv_dw_13" in r.output and "conv_pw_13" in r.output


def test_augmentation_only_in_training(heads):
    from pipeline.heads.folder import read_head_info
    from pipeline.store.features import read_attrs

    model_dir, info = read_head_info(heads["dense"])
    b = build_models(model_dir, info, read_attrs(heads["features"]), None, "3", "flip,rotate=0.2,zoom=0.2,shift=0.2,"
                     "contrast=0.3", 0, {})
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    a, c = np.asarray(b.train(x, training=False)), np.asarray(b.train(x, training=False))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, np.asarray(b.core(x, training=False)), rtol=1e-5, atol=1e-6)
    xf = x.astype("float32")
    stack = [layer for layer in b.train.layers if layer.name.startswith("aug_")]
    assert len(stack) == 5
    y = xf
    for layer in stack:
        y = layer(y, training=True)
    assert not np.allclose(np.asarray(y), xf)  # in training they do change the images


def test_resume_after_interrupt(heads, tmp_path):
    out = tmp_path / "ft"

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(_cfg(heads, out=out, epochs=2, patience=5, after_epoch=stop))
    state = json.loads((out / ".checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / "metrics.json").exists()
    seen = []
    fine_tune(_cfg(heads, out=out, epochs=2, patience=5, after_epoch=seen.append))
    assert seen == [2]  # resumed at epoch 2
    assert [int(r["epoch"]) for r in _history(out)] == [0, 1, 2]
    assert json.loads((out / "evaluation.json").read_text())["fine_tune"]["epochs_run"] == 2


def test_model_works_with_predict_and_refuses_replace_without_force(heads, tmp_path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(heads["dense"]), "--cache-dir", str(heads["cache"]),
                                 "--unfreeze", "conv_pw_13", "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "dense+ft" in r.output
    r = CliRunner().invoke(cli, ["predict", "--model", str(out / "model.keras"), str(heads["root"] / "blue"),
                                 "--format", "csv"])
    assert r.exit_code == 0, r.output
    preds = list(csv.DictReader(line for line in r.output.splitlines() if "," in line))
    assert len(preds) == 12
    # built-in layers only: loads and gives the same probabilities in a process without tlpipe
    from pipeline.data.images import decode_image
    from tests.test_export_formats import run_without_tlpipe

    files = sorted((heads["root"] / "blue").iterdir())[:4]
    batch = np.stack([decode_image(f, 32) for f in files])
    got = run_without_tlpipe("keras", out / "model.keras", {"image": batch}, tmp_path)
    by_path = {Path(row["path"]).name: row for row in preds}
    for f, p in zip(files, got):
        assert abs(p.max() - float(by_path[f.name]["probability"])) < 1e-4
    # other settings: refused without --force, exit 2
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(heads["dense"]), "--cache-dir", str(heads["cache"]),
                                 "--unfreeze", "all", "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.output


def test_bad_heads_refused(heads, tmp_path):
    svm = fit_head(FitConfig(features=[heads["features"]], head="knn", cache_dir=heads["cache"]))
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(svm), "--cache-dir", str(heads["cache"])])
    assert r.exit_code == 2 and "starts from a dense, logistic or auto head (on any depths), not 'knn'" in r.output
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(heads["dense"]), "--cache-dir", str(heads["cache"]),
                                 "--unfreeze", "0"])
    assert r.exit_code == 2 and "out of range" in r.output


def test_report_lists_finetuned_rows(heads):
    from pipeline.reporting.report import ReportConfig, report

    out = fine_tune(_cfg(heads, "logistic", augment="none"))
    assert out == heads["cache"] / "finetuned" / "mobilenet_0.25-logistic"
    report(ReportConfig(cache_dir=heads["cache"]))
    rows = json.loads((heads["cache"] / "report.json").read_text())["rows"]
    ft = [r for r in rows if r["head"] == "logistic+ft"]
    assert len(ft) == 1 and ft[0]["features"] == "mobilenet_0.25" and ft[0]["status"] == "ok"
    assert "early stopping" in ft[0]["tuned_on"]
    assert {"dense", "logistic"} <= {r["head"] for r in rows}


def test_stale_or_missing_features_refused(heads, tmp_path):
    import shutil

    stale = tmp_path / "stale-dense"
    shutil.copytree(heads["dense"], stale)
    meta = json.loads((stale / "model" / "head.json").read_text())
    meta["fingerprints"] = ["0" * 64]
    (stale / "model" / "head.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(stale), "--cache-dir", str(heads["cache"])])
    assert r.exit_code == 2 and "stale" in r.output
    meta["features"] = [str(tmp_path / "gone.h5")]
    (stale / "model" / "head.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(stale), "--cache-dir", str(heads["cache"])])
    assert r.exit_code == 2 and "features file" in r.output


def test_tensorboard_logs(heads, tmp_path):
    fine_tune(_cfg(heads, out=tmp_path / "ft", augment="none", tensorboard=tmp_path / "tb"))
    assert any(p.is_file() for p in (tmp_path / "tb").rglob("*"))


def test_bad_unfreeze_and_weights_end_before_tensorflow_and_before_the_existing_out(heads, tmp_path):
    """issue 20: --unfreeze block99 (and a layer count out of range, weights that are not the features')
    is one line, exit 2, TensorFlow never imported, and never the 'made from other settings' line."""
    from tests.test_finetune_depths import _refused_before_tensorflow

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    base = ["fine-tune", "--head", heads["dense"], "--cache-dir", heads["cache"], "--out", mine]
    line = _refused_before_tensorflow([*base, "--unfreeze", "block99"], tmp_path)
    assert "unknown block 'block99' for mobilenet_0.25" in line and "conv_pw_13" in line and "--force" not in line
    line = _refused_before_tensorflow([*base, "--unfreeze", "9999"], tmp_path)
    assert "--unfreeze 9999 is out of range: mobilenet_0.25 has 86 layers; give 1..86" in line
    line = _refused_before_tensorflow([*base, "--weights", "imagenet"], tmp_path)
    assert "does not match the features file, extracted with weights none" in line
