"""Export (image -> probabilities Keras model) and predict, on tiny synthetic data; acceptance on ../shared."""

from __future__ import annotations

import csv
import io
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
from pipeline.data.images import decode_image

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
BASE = "vgg16"  # random vgg16 at 32 px gives learnable features (mobilenet_0.25 collapses them: k-NN ties)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _colour_folder(root: Path, classes=COLOURS, per_class: int = 14) -> Path:
    rng = np.random.default_rng(1)
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 29 + 3 * i, 37 + 5 * (i % 4)
            arr = np.clip(np.array(rgb) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{name}_{i:03d}{'.png' if i % 2 else '.jpg'}")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = _colour_folder(tmp_path_factory.mktemp("data") / "colours")
    cache = tmp_path_factory.mktemp("cache")
    out = extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=32,
                                batch_size=8, cache_dir=cache, progress=False))
    return root, cache, out


@pytest.fixture(scope="module")
def two_colours(tmp_path_factory):
    root = _colour_folder(tmp_path_factory.mktemp("data2") / "two",
                          {k: v for k, v in COLOURS.items() if k != "green"}, per_class=12)
    cache = tmp_path_factory.mktemp("cache2")
    out = extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=32,
                                batch_size=8, cache_dir=cache, progress=False))
    return root, cache, out


def _val(root: Path, features: Path):
    with h5py.File(features, "r") as h5:
        X = h5["val"]["features"][...]
        ids = list(h5["val"]["ids"].asstr()[...])
    images = np.stack([decode_image(root / i, 32) for i in ids])
    return X, ids, images


def _head_and_predict(folder: Path, files: list[Path], model: Path, root: Path, **kwargs):
    """The head's probabilities on the cached val features (files fused in order) and what
    'predict' gives from the val images with the exported model: (expected, got, ids, result)."""
    from pipeline.deploy.predict import predict

    Xs, ids = [], None
    for f in files:
        with h5py.File(f, "r") as h5:
            Xs.append(h5["val"]["features"][...])
            these = list(h5["val"]["ids"].asstr()[...])
        assert ids is None or these == ids
        ids = these
    expected = load_head(folder).predict_proba(np.concatenate(Xs, 1))
    result = predict(model, [root / i for i in ids], **kwargs)
    got = np.array([[row["probabilities"][c] for c in result.class_names] for row in result.rows])
    return expected, got, ids, result


def _export_and_compare(data, head, tmp_path):
    import keras

    root, cache, features = data
    folder = fit_head(FitConfig(features=[str(features)], head=head, cache_dir=cache, out=tmp_path / head,
                                params=HeadParams(epochs=30, patience=5, k_grid=(1, 5))))
    out = tmp_path / f"{head}.keras"
    r = CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(out), "--weights", "none",
                                 "--cache-dir", str(cache)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    model = keras.saving.load_model(out)
    X, ids, images = _val(root, features)
    expected = load_head(folder).predict_proba(X)
    got = np.asarray(model.predict(images, verbose=0))
    k = len(json.loads((folder / "model" / "head.json").read_text())["classes"])
    assert got.shape == (len(ids), k)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999
    np.testing.assert_allclose(got, expected, atol=1e-3)
    return model, out, folder


@pytest.mark.parametrize("head", ["logistic", "dense", "svm", "rbf-svm", "knn"])
def test_export_round_trip_matches_cached_head(colours, head, tmp_path):
    from pipeline.deploy.export import read_metadata

    model, out, folder = _export_and_compare(colours, head, tmp_path)
    meta = read_metadata(out)
    assert meta["class_names"] == ["blue", "green", "red"] and meta["base"] == BASE
    # any image size and a uint8 input: the Resizing layer inside the model handles it
    big = np.random.default_rng(0).integers(0, 255, (2, 57, 41, 3), dtype=np.uint8)
    p = np.asarray(model.predict(big, verbose=0))
    assert p.shape == (2, 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("head", ["logistic", "dense", "rbf-svm"])
def test_export_binary_gives_two_columns(two_colours, head, tmp_path):
    model, _, _ = _export_and_compare(two_colours, head, tmp_path)
    assert model.output_shape[-1] == 2


def test_rbf_svm_export_layer_matches_sklearn_decisions(colours):
    """The one-vs-one to one-vs-rest rewrite inside CalibratedRbfSVC is scikit-learn's, not just close."""
    from pipeline.deploy.export import rbf_svm_layer

    root, cache, features = colours
    with h5py.File(features, "r") as h5:
        X, y = h5["train"]["features"][...], h5["train"]["labels"][...]
    head = load_head(fit_head(FitConfig(features=[str(features)], head="rbf-svm", cache_dir=cache,
                                        out=Path(cache) / "rbf3")))
    layer = rbf_svm_layer(head.model, 3, X.shape[1])
    probe = np.concatenate([X, X[:5] * 1.7, X[:5][::-1] * 0.3])
    np.testing.assert_allclose(np.asarray(layer(probe)), head.predict_proba(probe), atol=1e-6)


@pytest.mark.parametrize("head", ["rbf-svm", "logistic"])
def test_export_fused_sizes_and_bases(colours, head, tmp_path):
    """A head on fused features exports as one model: one branch per features file, one image input
    per input size; 'tlpipe predict' feeds each input and matches the head on the cached features."""
    import keras

    root, cache, f32 = colours
    f40 = extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=40, batch_size=8,
                                cache_dir=cache, out=Path(cache) / "features" / f"{BASE}_40.h5", progress=False))
    f32b = extract(ExtractConfig(base="mobilenet_0.25", data=str(root), weights="none", input_size=32, batch_size=8,
                                 cache_dir=cache, progress=False))
    for files, inputs in (([f32, f40], ["image_32", "image_40"]), ([f32, f32b], ["image"])):
        folder = fit_head(FitConfig(features=[str(f) for f in files], head=head, cache_dir=cache,
                                    out=tmp_path / f"{head}-{len(inputs)}", params=HeadParams(k_grid=(1, 5))))
        out = tmp_path / f"fused{len(inputs)}.keras"
        r = CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(out), "--weights", "none",
                                     "--cache-dir", str(cache)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        model = keras.saving.load_model(out)
        assert [t.name for t in model.inputs] == inputs
        expected, got, _, _ = _head_and_predict(folder, files, out, root)
        assert (got.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(got, expected, atol=1e-3)
    r = CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(tmp_path / "x.keras"),
                                 "--base", "resnet50", "--weights", "none", "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "vgg16 + mobilenet_0.25" in r.output


def test_export_errors(colours, tmp_path):
    root, cache, features = colours
    folder = fit_head(FitConfig(features=[str(features)], head="logistic", cache_dir=cache, out=tmp_path / "h"))
    run = CliRunner().invoke
    r = run(cli, ["export", "--head", str(folder), "--out", str(tmp_path / "m.keras"), "--base", "resnet50",
                  "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "does not match the head" in r.output and BASE in r.output
    r = run(cli, ["export", "--head", str(tmp_path), "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 2 and "not a fitted head folder" in r.output
    r = run(cli, ["export", "--head", str(folder), "--out", str(tmp_path / "m.h5"), "--cache-dir", str(cache)])
    assert r.exit_code == 2 and ".keras" in r.output
    r = run(cli, ["export", "--head", str(folder), "--out", str(tmp_path / "m.keras"), "--weights", "imagenet",
                  "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "does not match the features file" in r.output


def test_predict_cli_reports_broken_files(colours, tmp_path):
    root, cache, features = colours
    folder = fit_head(FitConfig(features=[str(features)], head="logistic", cache_dir=cache, out=tmp_path / "h"))
    model = tmp_path / "m.keras"
    assert CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(model),
                                    "--cache-dir", str(cache)]).exit_code == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("red", "blue"):
        src = sorted((root / name).iterdir())[0]
        (imgs / f"{name}{src.suffix}").write_bytes(src.read_bytes())
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    missing = tmp_path / "missing.png"
    r = CliRunner().invoke(cli, ["predict", "--model", str(model), str(imgs), str(missing), "--format", "csv"])
    assert r.exit_code == 2 and "no such file or folder" in r.output  # a path typo is a usage error

    r = CliRunner().invoke(cli, ["predict", "--model", str(model), str(imgs), "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    by = {Path(row["path"]).name: row for row in rows}
    assert by["red.jpg"]["class"] == "red" and by["blue.jpg"]["class"] == "blue"
    assert float(by["red.jpg"]["probability"]) > 0.5
    assert by["broken.jpg"]["error"] and "missing.png" not in by
    assert "unreadable" in r.stderr

    out = tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["predict", "--model", str(model), str(imgs), "--format", "json", "--out", str(out)])
    assert r.exit_code == 0
    data = json.loads(out.read_text())
    assert data["classes"] == ["blue", "green", "red"] and len(data["predictions"]) == 2
    assert data["failed"][0]["path"].endswith("broken.jpg") and data["failed"][0]["reason"]
    p = data["predictions"][0]
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5

    r = CliRunner().invoke(cli, ["predict", "--model", str(model), str(imgs)])
    assert r.exit_code == 0 and "unreadable (1)" in r.stdout

    r = CliRunner().invoke(cli, ["predict", "--model", str(model), str(imgs / "broken.jpg")])
    assert r.exit_code == 1 and "no image could be predicted" in r.output
    r = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "nope.keras"), str(imgs)])
    assert r.exit_code == 2 and "model file not found" in r.output


# ----------------------------------------------------------------------------- acceptance (real data)

WEIGHTS = SHARED / "weights" / "mobilenet_0.75_224_imagenet_notop.weights.h5"
CATS_DOGS = SHARED / "data" / "cats_vs_dogs_small"


@pytest.mark.acceptance
@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS.is_file() and CATS_DOGS.is_dir()), reason="../shared data and weights absent")
def test_acceptance_mobilenet_export_agrees(tmp_path):
    """MobileNet-0.75, real weights, cats vs dogs: the best head reaches >= 0.99 val accuracy; the
    exported model reproduces the head's predictions from the images (>= 99.9 %, within 1e-3).

    The best head fuses the base's features at two input sizes (256 and 288: the 180 px photos
    upscaled) and fits an RBF-kernel SVM; measured: rbf-svm 0.992, svm 0.987, logistic 0.985 (only
    rbf-svm is fitted here: the others took 15 s and were never the one exported)."""
    cache = tmp_path / "cache"
    files = [extract(ExtractConfig(base="mobilenet_0.75", data=str(CATS_DOGS), weights=str(WEIGHTS.parent),
                                   input_size=size, out=cache / "features" / f"mobilenet_0.75_{size}.h5",
                                   cache_dir=cache, progress=False)) for size in (256, 288)]
    best = "rbf-svm"
    folder = fit_head(FitConfig(features=[str(f) for f in files], head=best, cache_dir=cache))
    accuracy = json.loads((folder / "metrics.json").read_text())["val"]["accuracy"]
    print(f"val accuracy ({best}): {accuracy:.4f}")
    assert accuracy >= 0.99, accuracy

    model = tmp_path / "model.keras"
    assert CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(model), "--cache-dir",
                                    str(cache)], catch_exceptions=False).exit_code == 0
    expected, got, ids, result = _head_and_predict(folder, files, model, CATS_DOGS, batch_size=64)
    assert not result.failed
    assert [Path(r["path"]).relative_to(CATS_DOGS).as_posix() for r in result.rows] == ids
    same = float((got.argmax(1) == expected.argmax(1)).mean())
    diff = float(np.abs(got - expected).max())
    within = float((np.abs(got - expected).max(1) <= 1e-3).mean())
    print(f"export agreement ({best}): same class {same:.4%}, max |dp| {diff:.2e}, within 1e-3 {within:.4%}")
    assert same >= 0.999 and within >= 0.999
