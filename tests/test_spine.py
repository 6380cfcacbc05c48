"""End to end on tiny synthetic data: extract (folder and tfds mock) → HDF5 → heads → metrics; CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams, load_head

SPLIT = "60/20/20"
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def _colour_folder(root: Path, per_class: int = 14) -> Path:
    """Three colour classes, odd sizes, JPEG/PNG, a grayscale image and one broken file."""
    rng = np.random.default_rng(0)
    for c, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = 17 + 3 * i, 23 + 5 * (i % 4)
            arr = np.clip(np.array(rgb) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(arr).save(folder / f"{name}_{i:03d}{ext}")
    gray = np.full((31, 29), 128, np.uint8)
    Image.fromarray(gray, "L").save(root / "green" / "gray_extra.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def colour_features(tmp_path_factory):
    root = _colour_folder(tmp_path_factory.mktemp("data") / "colours")
    cache = tmp_path_factory.mktemp("cache")
    # 60/20/20: 8 val images (per-file buckets give 4 at 80/10/10 on 43 images: too few to score)
    out = extract(ExtractConfig(base="vgg16", data=str(root), weights="none", input_size=32, split=SPLIT,
                                batch_size=8, cache_dir=cache, progress=False))
    return root, cache, out


def test_extract_writes_features_and_provenance(colour_features):
    root, cache, out = colour_features
    assert out == cache / "features" / "vgg16.h5"
    assert not list(out.parent.glob(".*partial*"))
    with h5py.File(out, "r") as h5:
        a = dict(h5.attrs)
        total = 0
        for split in ("train", "val", "test"):
            g = h5[split]
            n = g["features"].shape[0]
            total += n
            assert g["features"].shape == (n, 512) and g["features"].dtype == np.float32
            assert g["labels"].shape == (n,) and g["labels"].dtype == np.int64
            assert g["ids"].shape == (n,)
            assert np.isfinite(g["features"][...]).all()
        ids = {i for s in ("train", "val", "test") for i in h5[s]["ids"].asstr()[...]}
    assert total == 3 * 14 + 1  # every decodable image (the grayscale one too), the broken one skipped
    assert "green/gray_extra.png" in ids and "red/broken.jpg" not in ids
    assert a["base"] == "vgg16" and a["weights"] == "none" and a["input_size"] == 32
    assert a["pooling"] == "avg" and a["preprocessing"] == "keras.applications.vgg16.preprocess_input"
    assert json.loads(a["class_names"]) == ["blue", "green", "red"]
    assert a["split_spec"] == SPLIT and a["split_rule"] == "sha1-bucket-10000" and a["data_source"] == str(root.resolve())
    assert a["skipped_count"] == 1
    skipped = json.loads(a["skipped"])
    assert skipped[0]["id"] == "red/broken.jpg" and skipped[0]["reason"]
    assert json.loads((out.parent / "vgg16.skipped.json").read_text()) == skipped
    for key in ("tlpipe_version", "keras_version", "tensorflow_version", "fingerprint", "source_fingerprint"):
        assert a[key]


def test_split_is_deterministic_and_stable(colour_features, tmp_path):
    root, cache, out = colour_features
    again = extract(ExtractConfig(base="vgg16", data=str(root), weights="none", input_size=32, batch_size=8, split=SPLIT,
                                  out=tmp_path / "again.h5", progress=False, force=True))
    with h5py.File(out, "r") as a, h5py.File(again, "r") as b:
        for split in ("train", "val", "test"):
            assert list(a[split]["ids"].asstr()[...]) == list(b[split]["ids"].asstr()[...])
            np.testing.assert_array_equal(a[split]["features"][...], b[split]["features"][...])


@pytest.mark.parametrize("head", ["logistic", "dense", "svm", "rbf-svm", "knn"])
def test_heads_learn_a_learnable_task(colour_features, head, tmp_path):
    root, cache, out = colour_features
    folder = fit_head(FitConfig(features=["vgg16.h5"], head=head, cache_dir=cache, out=tmp_path / head,
                                params=HeadParams(epochs=40, patience=8)))
    m = json.loads((folder / "metrics.json").read_text())
    ev = json.loads((folder / "evaluation.json").read_text())
    assert ev["head"] == head and ev["base"] == "vgg16" and ev["weights"] == ["none"]
    assert ev["chance"]["val"] < 0.5
    assert ev["splits"]["train"]["accuracy"] >= 0.9
    assert m["val"]["accuracy"] >= 0.8, m["val"]
    for split in ("train", "val", "test"):
        assert {"accuracy", "balanced_accuracy", "log_loss", "roc_auc", "n"} <= set(ev["splits"][split])
    assert m["fit_seconds"] > 0 and "untrained" in ev and ev["tuning"]["val_used_for_tuning"] is False
    curve = "history.csv" if head == "dense" else "grid.csv"
    lines = (folder / curve).read_text().splitlines()
    assert lines[0].startswith("epoch,train_accuracy" if head == "dense" else "param,value,cv_accuracy")
    assert len(lines) >= 2
    assert np.array(ev["splits"]["val"]["confusion_matrix"]).shape == (3, 3)
    roc = {line.split(",")[1] for line in (folder / "roc.csv").read_text().splitlines()[1:]}
    assert roc == {"blue", "green", "red", "micro-average", "macro-average"}  # three classes: one-vs-rest
    panels = {line.split(",")[0] for line in (folder / "curves.csv").read_text().splitlines()[1:]}
    assert panels == ({"accuracy per epoch", "loss per epoch"} if head == "dense"
                      else {"accuracy against k", "log loss against k"} if head == "knn"
                      else {"accuracy against log10 C", "log loss against log10 C"})
    loaded = load_head(folder)
    with h5py.File(out, "r") as h5:
        X = h5["val"]["features"][...]
    p = loaded.predict_proba(X)
    assert p.shape == (len(X), 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        out = extract(ExtractConfig(base="mobilenet_0.25", data="tfds:cats_vs_dogs", weights="none",
                                    input_size=32, batch_size=8, out=tmp_path / "m.h5", progress=False))
    with h5py.File(out, "r") as h5:
        assert json.loads(h5.attrs["class_names"]) == ["cat", "dog"]
        assert h5.attrs["data_source"].startswith("tfds:cats_vs_dogs:")
        assert h5["train"]["features"].shape == (12, 256)
        ids = h5["val"]["ids"].asstr()[...]
        assert len(set(ids)) == len(ids) and "train[80%:90%]" in ids[0]


# ----------------------------------------------------------------------------- CLI


def _run(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


def test_cli_unknown_base_lists_choices():
    r = _run(["extract", "--base", "vgg17", "--data", "nowhere"])
    assert r.exit_code == 2
    assert "unknown base 'vgg17'" in r.output and "vgg16" in r.output and "googlenet" in r.output
    assert "Traceback" not in r.output


def test_cli_missing_features_file(tmp_path):
    r = _run(["fit-head", "--features", "resnet50.h5", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2  # a missing input path is a usage error
    assert "features file not found: resnet50.h5" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_offline_imagenet_weights(tmp_path, monkeypatch):
    """No network and nothing cached: one line naming the file, where to put it, and --weights PATH."""
    import urllib.error

    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    data = _colour_folder(tmp_path / "d", per_class=3)
    r = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--out", str(tmp_path / "f.h5"),
              "--no-progress"])
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("tlpipe: error: ImageNet weights for mobilenet_0.25")
    assert "mobilenet_2_5_224_tf_no_top.h5" in last and "--weights PATH" in last
    assert not (tmp_path / "f.h5").exists()


def test_cli_weights_file_and_folder(tmp_path):
    """--weights PATH (a .weights.h5 file) and --weights DIR load into the base; sha256 recorded."""
    import keras

    from pipeline.nets.backbones import get_backbone
    from pipeline.core.util import sha256_file

    wdir = tmp_path / "w"
    wdir.mkdir()
    model = get_backbone("mobilenet_0.25").build(None, 32)
    wfile = wdir / "mobilenet_0.25_32_notop.weights.h5"
    model.save_weights(wfile)
    keras.backend.clear_session()
    data = _colour_folder(tmp_path / "d", per_class=3)
    for spec in (str(wfile), str(wdir)):
        out = tmp_path / f"f{len(spec)}.h5"
        r = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--weights", spec,
                  "--input-size", "32", "--out", str(out), "--no-progress"])
        assert r.exit_code == 0, r.output
        with h5py.File(out, "r") as h5:
            assert h5.attrs["weights_sha256"] == sha256_file(wfile)
            assert h5.attrs["weights"] == str(wfile.resolve())
    r = _run(["extract", "--base", "vgg16", "--data", str(data), "--weights", str(wdir)])
    assert r.exit_code == 2 and "no weights for vgg16 in" in r.output


def test_cli_bases_info_and_report(colour_features, tmp_path):
    root, cache, out = colour_features
    r = _run(["bases"])
    assert r.exit_code == 0 and "inception_v3" in r.output and "googlenet" in r.output
    rows = json.loads(_run(["bases", "--json"]).output)
    assert {"name", "input_size", "feature_size", "weights_cached"} <= set(rows[0])
    r = _run(["info", str(out)])
    assert r.exit_code == 0 and "vgg16" in r.output and "up to date" in r.output
    r = _run(["fit-head", "--features", "vgg16", "--head", "logistic", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    assert "logistic head on vgg16" in r.output
    r = _run(["report", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "| vgg16 | vgg16 | logistic |" in r.output
    report = json.loads((cache / "report.json").read_text())
    assert report["rows"][0]["head"] == "logistic"
    assert (cache / "plots" / "comparison.csv").read_text().startswith("model,features,base,head")


def test_dense_head_is_seeded_and_reproducible(colour_features, tmp_path):
    root, cache, out = colour_features
    runs = []
    for i in range(2):
        folder = fit_head(FitConfig(features=[out], head="dense", out=tmp_path / f"d{i}",
                                    params=HeadParams(seed=7, epochs=4, patience=4)))
        m = json.loads((folder / "metrics.json").read_text())
        ev = json.loads((folder / "evaluation.json").read_text())
        runs.append((m["val"]["log_loss"], ev["splits"]["train"]["log_loss"], ev["tuning"]["chosen"],
                     [line.rsplit(",", 1)[0] for line in (folder / "history.csv").read_text().splitlines()]))
    assert runs[0] == runs[1]


def test_weights_dir_picks_the_base_own_file_not_a_longer_name(tmp_path):
    """mobilenet must not take mobilenet_0.75's file (prefix match), and vice versa."""
    from pipeline.nets.backbones import get_backbone
    from pipeline.core.errors import WeightsUnavailable
    from pipeline.nets.weights import find_weights_in_dir, parse_weights

    (tmp_path / "mobilenet_0.75_224_imagenet_notop.weights.h5").write_bytes(b"x")
    assert find_weights_in_dir(tmp_path, get_backbone("mobilenet")) is None
    assert find_weights_in_dir(tmp_path, get_backbone("mobilenet_0.75")).name.startswith("mobilenet_0.75_")
    with pytest.raises(WeightsUnavailable, match="no weights for mobilenet in"):
        parse_weights(str(tmp_path), get_backbone("mobilenet"))
    (tmp_path / "mobilenet_1_0_224_tf_no_top.h5").write_bytes(b"x")  # Keras' own cache name wins
    assert find_weights_in_dir(tmp_path, get_backbone("mobilenet")).name == "mobilenet_1_0_224_tf_no_top.h5"


def test_report_marks_heads_fitted_on_changed_features(colour_features, tmp_path):
    root, cache, out = colour_features
    heads = tmp_path / "cache"
    folder = fit_head(FitConfig(features=[out], head="LOGISTIC", out=heads / "heads" / "vgg16-logistic"))
    meta = json.loads((folder / "model" / "head.json").read_text())
    assert meta["head"] == "logistic"
    r = _run(["report", "--cache-dir", str(heads)])
    assert r.exit_code == 0 and "| ok |" in r.output and str(root.resolve()) in r.output
    meta["fingerprints"] = ["an older extraction"]
    (folder / "model" / "head.json").write_text(json.dumps(meta))
    r = _run(["report", "--cache-dir", str(heads)])
    assert r.exit_code == 0 and "| stale |" in r.output and "**Stale:** vgg16-logistic" in r.output


def test_predict_refuses_a_model_that_tlpipe_did_not_export(colour_features, tmp_path):
    root, cache, out = colour_features
    folder = fit_head(FitConfig(features=[out], head="dense", out=tmp_path / "dense",
                                params=HeadParams(epochs=1)))
    r = _run(["predict", "--model", str(folder / "model" / "head.keras"), str(root / "red")])
    assert r.exit_code == 2
    assert "not a model written by 'tlpipe export'" in r.output and "AttributeError" not in r.output
