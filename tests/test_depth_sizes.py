"""Input size chosen inside train (issue 19): features files of one base at several input sizes fused
for ``--head auto``, which chooses sizes and depths together by grouped CV on train; the export
computes each chosen depth at its own size."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder
from test_depths import run_cli

BASE = "vgg16"  # random vgg16 at 32-48 px gives features that vary (random mobilenet_0.25's are constant)
SIZES = (32, 48)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("img") / "img", classes=("a", "b", "c"), per_class=12, size=(52, 44))


def _extract(images: Path, out: Path, size: int, *extra: str) -> Path:
    run_cli("extract", "--base", BASE, "--data", str(images), "--split", "60/20/20", "--weights", "none",
            "--input-size", str(size), "--runtime", "keras", "--out", str(out), "--no-progress",
            "--layers", "block3_pool,block4_pool", *extra)
    return out


@pytest.fixture(scope="module")
def sized(images, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sized")
    return [_extract(images, root / f"m{size}.h5", size, "--views", "1") for size in SIZES]


# ----------------------------------------------------------------------------- the choice (toy)

def test_auto_chooses_the_size_that_carries_the_signal():
    """Two depths at two sizes; only the 48 px ones tell the classes apart: auto keeps 48 px only,
    and records it."""
    from pipeline.heads.auto import AutoHead
    from pipeline.heads.models import HeadParams

    rng = np.random.default_rng(3)
    n, k = 240, 3
    y = rng.integers(0, k, n)
    noise = rng.normal(size=(n, 16))
    signal = rng.normal(size=(n, 12)) + np.eye(k)[y].repeat(4, axis=1) * 1.5
    layout = [("p7@32", 8), ("p13@32", 8), ("p7@48", 6), ("p13@48", 6)]
    head = AutoHead(k, HeadParams())
    head.configure(layout, "all")
    head.fit((np.concatenate([noise, signal], axis=1).astype(np.float32), y))
    assert head.names and all(name.endswith("@48") for name in head.names)
    assert head.chosen["input_sizes"] == [48] and head.tuning["depth_choice"]["input_sizes"] == [48]
    sets = {s["added"]: s["set"] for s in head.tuning["depth_choice"]["steps"]}
    assert sets["all@32"] == ["p7@32", "p13@32"]  # every size alone is a candidate (all@48: the best two)


def test_parse_subset_names_a_depth_at_every_size_or_at_one():
    from pipeline.heads.auto import parse_subset

    stored = ["conv_pw_7_relu@32", "conv_pw_13_relu@32", "conv_pw_7_relu@48", "conv_pw_13_relu@48"]
    assert parse_subset("conv_pw_13", stored)[0] == ["conv_pw_13_relu@32", "conv_pw_13_relu@48"]
    assert parse_subset("conv_pw_7@48,conv_pw_13_relu@32", stored)[0] == ["conv_pw_13_relu@32", "conv_pw_7_relu@48"]
    assert parse_subset("conv_pw_7", ["conv_pw_7_relu", "conv_pw_13_relu"])[0] == ["conv_pw_7_relu"]


# ----------------------------------------------------------------------------- fit, record, export

def test_auto_on_two_sizes_records_and_exports(sized, images, tmp_path):
    from pipeline.data.images import decode_image
    from pipeline.heads.auto import load_any_head
    from pipeline.store.features import fuse, load_features, load_fused_views

    head_dir = tmp_path / "auto"
    res = run_cli("fit-head", *[a for f in sized for a in ("--features", str(f))], "--head", "auto",
                  "--out", str(head_dir))
    assert "input sizes" in res.stdout
    ev = json.loads((head_dir / "evaluation.json").read_text())
    d = ev["depths"]
    assert d["stored_input_sizes"] == list(SIZES) and len(d["stored"]) == 4
    assert all("@" in n for n in d["depths"]) and set(d["depths"]) <= set(d["stored"])
    assert d["input_sizes"] == ev["tuning"]["input_sizes"] == sorted({int(n.split("@")[1]) for n in d["depths"]})
    assert d["train_views"] == 1 and ev["tuning"]["val_used_for_tuning"] is False
    assert "every depth at each input size" in ev["tuning"]["depth_choice"]["method"]
    rows = (head_dir / "depths.csv").read_text().splitlines()
    assert any("@32," in r for r in rows) and any("@48," in r for r in rows)

    # a head on both sizes (one depth at each) exports with one input per size and matches the head
    both = tmp_path / "both"
    run_cli("fit-head", "--features", str(sized[0]), "--features", str(sized[1]), "--head", "auto",
            "--layers", "block4", "--out", str(both))
    model_path = tmp_path / "both.keras"
    run_cli("export", "--head", str(both), "--out", str(model_path))
    meta = json.loads(zipfile.ZipFile(model_path).read("tlpipe.json"))
    assert meta["input_sizes"] == list(SIZES) and meta["inputs"] == [f"image_{s}" for s in SIZES]
    assert meta["depths"] == ["block4_pool@32", "block4_pool@48"]
    import keras

    fs = fuse([load_features(f) for f in sized])
    val = fs.splits["val"]
    head = load_any_head(both)
    expected = head.predict_proba(val.X, views=load_fused_views(fs.paths, fs.splits).get("val"))
    batches = [np.stack([decode_image(images / i, s) for i in val.ids]) for s in SIZES]
    got = keras.saving.load_model(model_path).predict(batches, verbose=0)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    pred = json.loads(run_cli("predict", "--model", str(model_path), "--format", "json", "--runtime", "keras",
                              str(images / val.ids[0])).stdout)
    assert pred["predictions"][0]["class"] == fs.class_names[int(expected[0].argmax())]


# ----------------------------------------------------------------------------- refusals

def test_same_size_twice_is_refused_in_one_line(sized, images, tmp_path):
    again = _extract(images, tmp_path / "again.h5", SIZES[0])
    res = run_cli("fit-head", "--features", str(sized[0]), "--features", str(again), "--head", "auto",
                  "--out", str(tmp_path / "h"), check=False)
    assert res.returncode == 2 and "same input size (32) twice" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "h").exists()


def test_auto_refuses_depths_of_other_bases_in_one_line(sized, images, tmp_path):
    other = tmp_path / "other.h5"
    run_cli("extract", "--base", "mobilenet_0.25", "--data", str(images), "--split", "60/20/20", "--weights",
            "none", "--input-size", "32", "--runtime", "keras", "--out", str(other), "--no-progress",
            "--layers", "conv_pw_13")
    res = run_cli("fit-head", "--features", str(sized[0]), "--features", str(other), "--head", "auto",
                  "--out", str(tmp_path / "h"), check=False)
    assert res.returncode == 2 and "one base" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # the other heads fuse them as before
    run_cli("fit-head", "--features", str(sized[0]), "--features", str(other), "--head", "logistic",
            "--out", str(tmp_path / "logit"))


def test_auto_on_last_layer_files_at_two_sizes_exports(images, tmp_path):
    """Files of the last layer only (``--layers last``) at two sizes: candidates ``last@32`` and
    ``last@48``; the exported head computes each at its size."""
    import keras

    from pipeline.data.images import decode_image
    from pipeline.heads.auto import load_any_head
    from pipeline.store.features import fuse, load_features

    files = []
    for size in SIZES:
        out = tmp_path / f"last{size}.h5"
        run_cli("extract", "--base", BASE, "--data", str(images), "--split", "60/20/20", "--weights", "none",
                "--input-size", str(size), "--runtime", "keras", "--out", str(out), "--no-progress")
        files.append(out)
    head_dir = tmp_path / "auto"
    run_cli("fit-head", "--features", str(files[0]), "--features", str(files[1]), "--head", "auto",
            "--layers", "last", "--out", str(head_dir))
    ev = json.loads((head_dir / "evaluation.json").read_text())
    assert ev["depths"]["depths"] == ["last@32", "last@48"] and ev["depths"]["input_sizes"] == list(SIZES)
    model_path = tmp_path / "auto.keras"
    run_cli("export", "--head", str(head_dir), "--out", str(model_path))
    val = fuse([load_features(f) for f in files]).splits["val"]
    expected = load_any_head(head_dir).predict_proba(val.X)
    batches = [np.stack([decode_image(images / i, s) for i in val.ids]) for s in SIZES]
    np.testing.assert_allclose(keras.saving.load_model(model_path).predict(batches, verbose=0), expected, atol=2e-4)
