"""Exported models run without tlpipe: built-in layers only (logistic, dense), --format keras|savedmodel|tflite,
metadata beside the model, and the in-graph resize agreeing with tlpipe's decode on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from pipeline.cli import cli
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams, load_head
from pipeline.data.images import decode_image
from tests.test_export_predict import _colour_folder

BASE = "vgg16"  # random vgg16 at 32 px gives learnable features; its preprocessing is the caffe Dense(3)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}

# Run in a fresh interpreter, PYTHONPATH without the repository, 'pipeline' imports refused: load the
# exported model the way a machine without tlpipe would, run it on inputs.npz, save the probabilities.
LOADER = r"""
import importlib.abc, json, os, sys
class _NoTlpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError("tlpipe is not installed here")
sys.meta_path.insert(0, _NoTlpipe())
import numpy as np
fmt, path, inputs, out = sys.argv[1:5]
x = dict(np.load(inputs))
if fmt == "keras":
    import keras
    model = keras.saving.load_model(path)
    p = model.predict(x if len(x) > 1 else x["image"], verbose=0)
elif fmt == "savedmodel":
    import tensorflow as tf
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    res = serve(**{k: tf.constant(v) for k, v in x.items()})
    p = list(res.values())[0].numpy()
    meta = json.load(open(os.path.join(path, "assets.extra", "tlpipe.json")))
else:
    import tensorflow as tf
    interp = tf.lite.Interpreter(model_path=path)
    runner = interp.get_signature_runner()
    res = runner(**x)
    p = list(res.values())[0]
    meta = json.load(open(path[:-len(".tflite")] + ".json"))
bad = sorted(m for m in sys.modules if m == "pipeline" or m.startswith("pipeline."))
np.save(out, np.asarray(p, dtype=np.float64))
print(json.dumps({"pipeline_modules": bad}))
"""


# LOADER once per job, all in ONE fresh interpreter (one TensorFlow start for them all).
LOAD_ALL = r"""
import sys
LOADER = open(sys.argv[1]).read()
for fmt, path, inputs, out in zip(*[iter(sys.argv[2:])] * 4):
    sys.argv = ["-", fmt, path, inputs, out]
    exec(LOADER, {"__name__": "__main__"})
"""


def run_all_without_tlpipe(jobs: list[tuple[str, Path, dict[str, np.ndarray]]], tmp: Path) -> list[np.ndarray]:
    """Each job's (format, model path, inputs) probabilities, from one fresh interpreter that refuses to
    import tlpipe."""
    loader, args, outs = tmp / "loader.txt", [], []
    loader.write_text(LOADER)
    for i, (fmt, path, x) in enumerate(jobs):
        npz, out = tmp / f"inputs{i}.npz", tmp / f"probabilities{i}.npy"
        np.savez(npz, **x)
        args += [fmt, str(path), str(npz), str(out)]
        outs.append(out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", LOAD_ALL, str(loader), *args], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [json.loads(line) for line in r.stdout.strip().splitlines()[-len(outs):]]
    assert said == [{"pipeline_modules": []}] * len(outs)
    return [np.load(out) for out in outs]


def run_without_tlpipe(fmt: str, path: Path, inputs: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    """The model's probabilities on ``inputs`` in a fresh interpreter that refuses to import tlpipe."""
    return run_all_without_tlpipe([(fmt, path, inputs)], tmp)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three colour classes, vgg16 features at 32 and 40 px (for the fused case), and two classes at 32 px
    (the dense head's binary sigmoid)."""
    tmp = tmp_path_factory.mktemp("fmt")
    cache = tmp / "cache"
    out = {}
    for key, classes, sizes in (("three", COLOURS, (32, 40)),
                                ("two", {k: v for k, v in COLOURS.items() if k != "green"}, (32,))):
        root = _colour_folder(tmp / key, classes, 12)
        files = [extract(ExtractConfig(base=BASE, data=str(root), weights="none", input_size=size, batch_size=8,
                                       cache_dir=cache, out=cache / "features" / f"{key}_{size}.h5", progress=False))
                 for size in sizes]
        out[key] = (root, files)
    return tmp, cache, out


def _fit(data, key: str, head: str, sizes=(32,)) -> tuple[Path, Path, list[Path]]:
    tmp, cache, sets = data
    root, files = sets[key]
    files = [f for f in files if int(f.stem.split("_")[-1]) in sizes]
    folder = tmp / "heads" / f"{key}-{head}-{'-'.join(map(str, sizes))}"
    if not (folder / "model").is_dir():
        fit_head(FitConfig(features=[str(f) for f in files], head=head, cache_dir=cache, out=folder,
                           params=HeadParams(epochs=20, patience=5, k_grid=(1, 5))))
    return root, folder, files


def _val_inputs(root: Path, files: list[Path]):
    """The head's probabilities on the cached val features, and the val images decoded per input size."""
    Xs, inputs, ids = [], {}, None
    for f in files:
        with h5py.File(f, "r") as h5:
            Xs.append(h5["val"]["features"][...])
            ids = list(h5["val"]["ids"].asstr()[...])
            size = int(h5.attrs["input_size"])
        inputs[f"image_{size}"] = np.stack([decode_image(root / i, size) for i in ids])
    if len(inputs) == 1:
        inputs = {"image": next(iter(inputs.values()))}
    return np.concatenate(Xs, 1), inputs


def _export(folder: Path, cache: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(out), "--weights", "none",
                                    "--cache-dir", str(cache), *extra])


def test_builtin_preprocess_equals_preprocess_input_for_every_base():
    """Every row of BACKBONES: the built-in layers equal the base's own preprocess_input on uint8 input."""
    import keras

    from pipeline.nets.backbones import BACKBONES, PREPROCESS_MODES
    from pipeline.nets.extractor import builtin_preprocess

    x = np.random.default_rng(0).integers(0, 256, (2, 9, 7, 3)).astype("uint8")
    for name, backbone in BACKBONES.items():
        assert backbone.module in PREPROCESS_MODES, name
        want = np.asarray(backbone.preprocess_input(x.astype("float32")))
        got = keras.ops.cast(x, "float32")
        for layer in builtin_preprocess(backbone):
            assert type(layer).__module__.startswith("keras."), (name, type(layer))
            got = layer(got)
        span = max(1.0, float(want.max() - want.min()))
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * span, name


# The exports that the two tests below load without tlpipe: case -> (format, colour set, head, input sizes).
CASES = {
    "keras-three-logistic": ("keras", "three", "logistic", (32,)),
    "keras-two-dense": ("keras", "two", "dense", (32,)),
    "keras-three-logistic-fused": ("keras", "three", "logistic", (32, 40)),
    "savedmodel-two-dense": ("savedmodel", "two", "dense", (32,)),
    "tflite-three-logistic": ("tflite", "three", "logistic", (32,)),
    "savedmodel-three-knn": ("savedmodel", "three", "knn", (32,)),
}
ODD = {"image": np.random.default_rng(0).integers(0, 255, (2, 57, 41, 3), dtype=np.uint8)}  # any size: resized


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """Every case exported with 'tlpipe export' (its result kept for the test to check), then each export
    that succeeded run on the val images (a SavedModel also on ODD) in one interpreter without tlpipe:
    case -> dict(result, out, folder, X, probabilities)."""
    tmp = tmp_path_factory.mktemp("exported")
    runs, jobs = {}, []
    for case, (fmt, key, head, sizes) in CASES.items():
        root, folder, files = _fit(data, key, head, sizes)
        (tmp / case).mkdir()
        out = tmp / case / {"keras": "m.keras", "savedmodel": "model", "tflite": "m.tflite"}[fmt]
        t0 = time.perf_counter()
        r = _export(folder, data[1], out, *(["--format", fmt] if fmt != "keras" else []))
        seconds = time.perf_counter() - t0
        X, inputs = _val_inputs(root, files)
        runs[case] = {"result": r, "out": out, "folder": folder, "X": X, "seconds": seconds, "probabilities": []}
        if r.exit_code == 0:
            jobs += [(case, fmt, out, x) for x in ([inputs, ODD] if fmt == "savedmodel" else [inputs])]
    got = run_all_without_tlpipe([job[1:] for job in jobs], tmp)
    for (case, *_), p in zip(jobs, got):
        runs[case]["probabilities"].append(p)
    return runs


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("keras")])
def test_keras_export_loads_without_tlpipe(exported, case):
    """keras.saving.load_model in a process that never imports tlpipe; equal to the head on cached features."""
    _, key, head, sizes = CASES[case]
    run = exported[case]
    r, out = run["result"], run["out"]
    assert r.exit_code == 0, r.output
    assert "custom layers" not in r.output
    got = run["probabilities"][0]
    expected = load_head(run["folder"]).predict_proba(run["X"])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)

    from pipeline.deploy.export import read_metadata

    meta = read_metadata(out)
    assert meta["class_names"] == sorted({"three": COLOURS, "two": ["blue", "red"]}[key])
    assert meta["head"] == head and meta["input_sizes"] == list(sizes) and not meta["custom_layers"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("keras")])
def test_savedmodel_and_tflite_run_without_tlpipe(exported, case):
    """SavedModel (uint8 images of any size; TF Serving) and TFLite (fixed base input size) run with
    TensorFlow alone and give the head's probabilities on the cached features."""
    fmt, _, head, _ = CASES[case]
    run = exported[case]
    r, out = run["result"], run["out"]
    assert r.exit_code == 0, r.output
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{fmt} {head}: exported in {run['seconds']:.1f} s, {size / 1e6:.2f} MB")
    np.testing.assert_allclose(run["probabilities"][0], load_head(run["folder"]).predict_proba(run["X"]), atol=1e-4)
    if fmt == "tflite":
        assert out.with_suffix(".labels.txt").read_text().split() == sorted(COLOURS)
        assert json.loads(out.with_suffix(".json").read_text())["input_size"] == 32
    else:  # any image size: resized inside
        np.testing.assert_allclose(run["probabilities"][1].sum(1), 1, atol=1e-5)
        assert json.loads((out / "assets.extra" / "tlpipe.json").read_text())["head"] == head


def test_custom_layer_head_says_so_and_predict_works(data, tmp_path):
    """knn (like svm, rbf-svm) keeps its custom layer: export says how to load it; 'tlpipe predict' works."""
    tmp, cache, _ = data
    root, folder, files = _fit(data, "three", "knn")
    out = tmp_path / "knn.keras"
    r = _export(folder, cache, out)
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if "custom layers" in line]
    assert len(notes) == 1 and "import pipeline.deploy.export" in notes[0] and "--format savedmodel" in notes[0]
    X, inputs = _val_inputs(root, files)
    with h5py.File(files[0], "r") as h5:
        ids = list(h5["val"]["ids"].asstr()[...])
    r = CliRunner().invoke(cli, ["predict", "--model", str(out), "--format", "json", *[str(root / i) for i in ids]])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["predictions"]
    got = np.array([[row["probabilities"][c] for c in sorted(COLOURS)] for row in rows])
    np.testing.assert_allclose(got, load_head(folder).predict_proba(X), atol=1e-4)


def test_out_checked_per_format_and_never_silently_replaced(data, tmp_path):
    tmp, cache, _ = data
    _, folder, _ = _fit(data, "three", "logistic")
    for fmt, bad in (("keras", "m.h5"), ("tflite", "m.keras"), ("savedmodel", "m.keras")):
        r = _export(folder, cache, tmp_path / bad, "--format", fmt)
        assert r.exit_code == 2 and "--out" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    out = tmp_path / "m.keras"
    out.write_text("precious")
    r = _export(folder, cache, out)
    assert r.exit_code == 2 and "--force" in r.output and out.read_text() == "precious"
    assert _export(folder, cache, out, "--force").exit_code == 0
    import zipfile

    assert zipfile.is_zipfile(out)
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "keep.txt").write_text("mine")
    r = _export(folder, cache, sm, "--format", "savedmodel")
    assert r.exit_code == 2 and "--force" in r.output and (sm / "keep.txt").read_text() == "mine"
    lite = tmp_path / "m.tflite"
    lite.with_suffix(".labels.txt").write_text("mine")
    r = _export(folder, cache, lite, "--format", "tflite")
    assert r.exit_code == 2 and "m.labels.txt" in r.output
    _, knn, _ = _fit(data, "three", "knn")
    r = _export(knn, cache, tmp_path / "k.tflite", "--format", "tflite")
    assert r.exit_code == 2 and "savedmodel" in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "m.labels.txt", "sm"]


def test_old_exports_still_load_and_give_metadata(tmp_path):
    """A model exported by an older tlpipe (BasePreprocess + Probabilities layers, metadata in the
    layer config) still loads in tlpipe: read_metadata and 'tlpipe predict' work."""
    import keras

    from pipeline.deploy.export import Probabilities, read_metadata
    from pipeline.nets.extractor import BasePreprocess

    inp = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = keras.layers.Resizing(32, 32, name="resize")(inp)
    x = BasePreprocess("mobilenet_0.25", name="preprocess")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1, activation="sigmoid")(x)
    meta = {"base": "mobilenet_0.25", "input_size": 32, "input_sizes": [32], "head": "dense"}
    model = keras.Model(inp, Probabilities(["a", "b"], meta, name="probabilities")(x))
    path = tmp_path / "old.keras"
    model.save(path)
    assert read_metadata(path)["class_names"] == ["a", "b"]
    img = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(img)
    r = CliRunner().invoke(cli, ["predict", "--model", str(path), "--format", "json", str(img)])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["predictions"][0]["probabilities"]) == {"a", "b"}


# ----------------------------------------------------------------------------- real photos (../shared)

WEIGHTS = SHARED / "weights"
REAL = {"cats_vs_dogs_small": (SHARED / "data" / "cats_vs_dogs_small", "80/10/10"),
        "trashnet": (SHARED / "data" / "trashnet", "70/15/15")}


@pytest.mark.acceptance
@pytest.mark.skipif(not (WEIGHTS.is_dir() and all(p.is_dir() for p, _ in REAL.values())),
                    reason="../shared data and weights absent")
@pytest.mark.parametrize("name", list(REAL))
def test_in_graph_resize_agrees_with_tlpipe_decode_on_real_photos(name, tmp_path):
    """The exported model fed the original photo (180 px cats and dogs: enlarged to 224; 341 x 256
    trash: shrunk) gives what 'tlpipe predict' gives (decode and resize to 224 first).

    Measured (MobileNet-0.75 with its ImageNet weights, logistic heads on all the data, 100 photos
    of each set): before (graph: bilinear without antialias, float; decode: OpenCV INTER_LINEAR /
    INTER_AREA to uint8) max |dp| 0.0124 on cats and dogs, 0.0825 and one class flipped in 100 on
    trashnet; now (graph: antialiased bilinear rounded to integer levels; decode: the same filter)
    0.0014 and 0.0035. Here (heads on 100 training photos) measured: see the printed figures."""
    import keras

    from pipeline.deploy.predict import predict

    root, split = REAL[name]
    cache = tmp_path / "cache"
    features = extract(ExtractConfig(base="mobilenet_0.75", data=str(root), weights=str(WEIGHTS), split=split,
                                     limit=100, cache_dir=cache, out=cache / "features" / "m.h5", progress=False))
    folder = fit_head(FitConfig(features=[str(features)], head="logistic", cache_dir=cache, out=tmp_path / "head"))
    out = tmp_path / "m.keras"
    assert CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(out), "--cache-dir",
                                    str(cache)]).exit_code == 0
    with h5py.File(features, "r") as h5:
        ids = list(h5["val"]["ids"].asstr()[...])
    files = [root / i for i in ids]
    originals = [np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB")) for f in files]
    assert all(a.shape[:2] != (224, 224) for a in originals)
    result = predict(out, files, batch_size=32)
    tl = np.array([[row["probabilities"][c] for c in result.class_names] for row in result.rows])
    model = keras.saving.load_model(out)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(originals):
        by_shape.setdefault(a.shape, []).append(i)
    graph = np.zeros_like(tl)
    for idx in by_shape.values():
        graph[idx] = np.asarray(model.predict(np.stack([originals[i] for i in idx]), verbose=0, batch_size=32))
    diff = np.abs(graph - tl).max(1)
    print(f"{name}: {len(files)} photos, same class {(graph.argmax(1) == tl.argmax(1)).mean():.3f}, "
          f"max |dp| {diff.max():.4f}, mean {diff.mean():.5f}")
    top2 = np.sort(tl, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * diff  # a class may flip only where the two best are that close
    assert ((graph.argmax(1) == tl.argmax(1)) | near_tie).all()
    assert diff.max() <= 0.005  # measured here: 0.0009 (cats and dogs), 0.0016 (trashnet); before: 0.012 / 0.083
