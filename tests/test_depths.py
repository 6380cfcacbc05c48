"""Several pooled depths in one pass (extract --layers), views (--views), and the auto head that
chooses depths, C and test-time mirror by grouped CV inside train (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, make_folder
from pipeline.store.features import read_attrs

BASE = "mobilenet_0.25"
SIZE = 32


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"tlpipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("img") / "img", classes=("a", "b", "c"), per_class=14, size=(40, 36))


def extract(images: Path, out: Path, *extra: str) -> Path:
    run_cli("extract", "--base", BASE, "--data", str(images), "--split", "60/20/20", "--weights", "none",
            "--input-size", str(SIZE), "--runtime", "keras", "--out", str(out), "--no-progress", *extra)
    return out


@pytest.fixture(scope="module")
def files(images, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feats")
    return {"last": extract(images, root / "last.h5"),
            "blocks": extract(images, root / "blocks.h5", "--layers", "blocks", "--views", "2")}


# ----------------------------------------------------------------------------- the depth table

FAMILY_SMALLEST = ["vgg16", "resnet50", "resnet50_v2", "inception_v3", "inception_resnet_v2", "xception",
                   "mobilenet_0.25", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "nasnet_mobile",
                   "efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny"]


def _check_blocks(name: str) -> None:
    import keras

    from pipeline.nets.backbones import get_backbone
    from pipeline.nets.depths import BLOCKS

    b = get_backbone(name)
    size = {"nasnet_mobile": 224, "nasnet_large": 331}.get(name, max(b.min_size, 96))
    model = getattr(keras.applications, b.constructor)(include_top=False, weights=None,
                                                       input_shape=(size, size, 3), **b.kwargs)
    have = {layer.name for layer in model.layers}
    missing = [n for n in BLOCKS[name] if n not in have]
    assert not missing, f"{name}: {missing} not in the model"
    keras.backend.clear_session()


def test_every_base_has_blocks():
    from pipeline.nets.backbones import names
    from pipeline.nets.depths import BLOCKS

    assert sorted(BLOCKS) == sorted(names())
    assert all(len(v) >= 2 and len(set(v)) == len(v) for v in BLOCKS.values())


@pytest.mark.parametrize("name", FAMILY_SMALLEST)
def test_blocks_exist_in_family(name):
    _check_blocks(name)


@pytest.mark.skipif(not os.environ.get("TLPIPE_ALL_BASES"), reason="every row (slow): TLPIPE_ALL_BASES=1")
def test_blocks_exist_in_every_base():
    from pipeline.nets.backbones import names

    for name in names():
        _check_blocks(name)


def test_parse_and_resolve_layers():
    from pipeline.core.errors import UsageError
    from pipeline.nets.depths import parse_layers, resolve_layers

    assert resolve_layers(BASE, "last") is None
    assert resolve_layers(BASE, "blocks")[-1] == "conv_pw_13_relu"
    assert resolve_layers(BASE, "conv_pw_7,conv_pw_13") == ("conv_pw_7_relu", "conv_pw_13_relu")
    with pytest.raises(UsageError, match="conv_pw_1_relu"):
        resolve_layers(BASE, "conv_pw_99")
    with pytest.raises(UsageError):
        parse_layers(" , ")


# ----------------------------------------------------------------------------- stage one

def test_blocks_file_layout(files):
    from pipeline.nets.depths import depth_slices
    from pipeline.store.features import load_features, read_attrs

    a, b = read_attrs(files["last"]), read_attrs(files["blocks"])
    assert "depths" not in a and "layers" not in a  # --layers last: today's file
    assert b["layers"] == "blocks" and b["depths"][-1] == "conv_pw_13_relu"
    assert sum(b["depth_dims"]) == b["feature_size"]
    assert a["fingerprint"] != b["fingerprint"]
    last = load_features(files["last"]).splits
    blocks = load_features(files["blocks"]).splits
    cols = depth_slices(b)["conv_pw_13_relu"]
    for split in ("train", "val", "test"):
        assert list(last[split].ids) == list(blocks[split].ids)
        np.testing.assert_allclose(blocks[split].X[:, cols], last[split].X, rtol=1e-5, atol=1e-5)


def test_views_are_stored_beside(files):

    attrs = read_attrs(files["blocks"])
    counts = attrs["counts"]
    assert counts["train_view1"] == counts["train_view2"] == counts["train"]
    assert counts["val_view1"] == counts["val"] and "val_view2" not in counts
    with h5py.File(files["blocks"], "r") as h5:
        assert list(h5["train_view1"]["ids"].asstr()[...]) == list(h5["train"]["ids"].asstr()[...])
        assert not np.allclose(h5["train_view1"]["features"][...], h5["train"]["features"][...])


def test_depths_and_views_through_shards_merge_and_resume(images, tmp_path):
    """Shards carry the depths and the view splits; their merge equals the local file; a rerun of a
    finished file is up to date (the fingerprint holds layers and views)."""
    from test_shards import assert_equal_files

    from pipeline.stage1.extract import ExtractConfig, extract as run
    from pipeline.store.shards import merge_shards

    common = dict(base=BASE, data=str(images), split="60/20/20", weights="none", input_size=SIZE,
                  runtime="keras", batch_size=8, progress=False, layers="conv_pw_7,conv_pw_13", views=1)
    local = run(ExtractConfig(out=tmp_path / "local.h5", **common))
    parts = [run(ExtractConfig(out=tmp_path / "sh" / f"p{i}.h5", shard=f"{i}/2", **common)) for i in range(2)]
    merged = merge_shards(parts, tmp_path / "merged.h5", copy=True)
    assert_equal_files(local, merged, atol=1e-5)
    attrs = read_attrs(merged)
    assert attrs["depths"] == ["conv_pw_7_relu", "conv_pw_13_relu"] and attrs["counts"]["train_view1"] > 0
    stamp = local.stat().st_mtime_ns
    assert run(ExtractConfig(out=local, **common)) == local and local.stat().st_mtime_ns == stamp


def test_mirror_view_is_the_flipped_image():
    from pipeline.data.views import apply_view

    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(apply_view(img, 1), img[:, ::-1])
    assert apply_view(np.zeros((20, 20, 3), np.uint8), 3).shape == (20, 20, 3)


def test_unknown_layer_fails_in_one_line(images, tmp_path):
    proc = run_cli("extract", "--base", BASE, "--data", str(images), "--weights", "none", "--input-size", "32",
                   "--layers", "conv_pw_99", "--out", str(tmp_path / "x.h5"), check=False)
    assert proc.returncode == 2
    assert "conv_pw_13_relu" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_info_shows_depths(files):
    out = run_cli("info", str(files["blocks"]), "--no-check").stdout
    assert "depths" in out and "conv_pw_7_relu" in out and "views" in out


# ----------------------------------------------------------------------------- stage two

def test_auto_head_through_cli(files, tmp_path):
    out = tmp_path / "auto"
    res = run_cli("fit-head", "--features", str(files["blocks"]), "--head", "auto", "--out", str(out))
    assert "depths" in res.stdout
    ev = json.loads((out / "evaluation.json").read_text())
    d = ev["depths"]
    assert d["depths"] and set(d["depths"]) <= set(d["stored"])
    assert ev["tuning"]["val_used_for_tuning"] is False
    assert "ranked depths" in ev["tuning"]["depth_choice"]["method"]
    assert d["train_views"] == 2
    assert (out / "depths.csv").read_text().startswith("step,depth,set,cv_accuracy,kind")
    assert (out / "figures" / "depths.png").stat().st_size > 0


def test_layers_subset_for_a_plain_head(files, tmp_path):
    out = tmp_path / "logit"
    run_cli("fit-head", "--features", str(files["blocks"]), "--head", "logistic", "--layers", "conv_pw_13",
            "--out", str(out))
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["feature_size"] == 256 and ev["depths"]["depths"] == ["conv_pw_13_relu"]
    bad = run_cli("fit-head", "--features", str(files["last"]), "--head", "logistic", "--layers", "conv_pw_7",
                  "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "--layers" in bad.stderr


# ----------------------------------------------------------------------------- the selection maths

def _brute_logo(X, y, G, k, lams, positions):
    """Leave-one-group-out by definition: refit ridge (with its intercept, on the one-hot labels, the
    absolute strength of ``ridge_alpha`` on all rows, as the final fit) without the group, score it."""
    from sklearn.linear_model import Ridge

    from pipeline.heads.depths import ridge_alpha

    out = []
    for lam in lams:
        held = []
        for rows in G:
            keep = np.ones(len(y), bool)
            keep[rows] = False
            model = Ridge(alpha=ridge_alpha(X, lam), fit_intercept=True).fit(X[keep], np.eye(k)[y[keep]])
            held.append(model.predict(X[rows])[list(positions)].mean(0))
        out.append(np.asarray(held))
    return out


@pytest.mark.parametrize("n,d", [(40, 300), (60, 8)])  # wider than tall (the real trashnet case) and taller
@pytest.mark.parametrize("views", [0, 1])  # groups of one photo, of a photo and its mirror view
def test_logo_scores_match_brute_force(n, d, views):
    from pipeline.heads.depths import group_matrix, logo_scores

    rng = np.random.default_rng(n + views)
    k = 3
    y = rng.choice(k, n, p=[0.5, 0.3, 0.2])  # unbalanced: the intercept's class means matter
    X = rng.normal(size=(n, d)) + y[:, None] * 0.3
    Xall = np.concatenate([X] + [X + rng.normal(scale=0.3, size=X.shape)] * views)
    yall, g = np.tile(y, views + 1), np.tile(np.arange(n), views + 1)
    G, lams = group_matrix(g), (0.01, 1.0, 100.0)
    for positions in ([(0,), (0, 1)] if views else [(0,)]):
        held: dict = {}
        fast = logo_scores(Xall, yall, G, k, lams, scores_out=held, positions=positions)
        brute = _brute_logo(Xall, yall, G, k, lams, positions)
        for i, lam in enumerate(lams):
            np.testing.assert_allclose(held[lam], brute[i], atol=1e-7)
            assert fast[i] == pytest.approx(float((brute[i].argmax(1) == y).mean()))
        # the same from the Gram matrix (the path of depth sets wider than the rows)
        Xc = Xall - Xall.mean(0)
        via_gram: dict = {}
        logo_scores(None, yall, G, k, lams, scores_out=via_gram, positions=positions, gram=(Xc @ Xc.T, d))
        for lam in lams:
            np.testing.assert_allclose(via_gram[lam], held[lam], atol=1e-7)


def test_selection_finds_the_informative_depth():
    from pipeline.heads.depths import select_depths

    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 3, n)
    noise = rng.normal(size=(n, 10))
    signal = rng.normal(size=(n, 6)) + np.eye(3)[y].repeat(2, axis=1) * 2.0
    sel = select_depths(np.concatenate([noise, signal], 1), y, np.arange(n), ["noise", "signal"], [10, 6], 3)
    assert sel.chosen == ["signal"] and sel.alone["signal"] > sel.alone["noise"]


# ----------------------------------------------------------------------------- export

def test_export_auto_head_loads_without_tlpipe(files, images, tmp_path):
    from pipeline.data.images import decode_image
    from pipeline.heads.auto import load_any_head, load_views
    from pipeline.store.features import load_features

    head_dir = tmp_path / "auto"
    run_cli("fit-head", "--features", str(files["blocks"]), "--head", "auto", "--out", str(head_dir))
    model_path = tmp_path / "auto.keras"
    run_cli("export", "--head", str(head_dir), "--out", str(model_path))
    fs = load_features(files["blocks"])
    val = fs.splits["val"]
    batch = np.stack([decode_image(images / i, SIZE) for i in val.ids])
    np.save(tmp_path / "batch.npy", batch)
    code = ("import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1]); "
            "assert 'pipeline' not in sys.modules; "
            "np.save(sys.argv[3], np.asarray(m.predict(np.load(sys.argv[2]), verbose=0)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, str(model_path), str(tmp_path / "batch.npy"),
                    str(tmp_path / "p.npy")], check=True, cwd=tmp_path, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    exported = np.load(tmp_path / "p.npy")
    head = load_any_head(head_dir)
    expected = head.predict_proba(val.X, views=load_views(files["blocks"], fs.splits).get("val"))
    np.testing.assert_allclose(exported, expected, atol=2e-4)
    # tlpipe predict and evaluate take it as any exported model (Keras runtime: no resize difference)
    first = images / val.ids[0]
    pred = json.loads(run_cli("predict", "--model", str(model_path), "--format", "json", "--runtime", "keras",
                              str(first)).stdout)
    row = pred[0] if isinstance(pred, list) else pred["predictions"][0]
    assert row["class"] == fs.class_names[int(expected[0].argmax())]
    ev = json.loads(run_cli("evaluate", "--model", str(model_path), "--data", str(images), "--format", "json",
                            "--runtime", "keras").stdout)
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_plain_head_on_some_depths_exports_with_the_mirror(files, images, tmp_path):
    """A logistic head on one stored depth of a file with views: the export computes that depth and
    averages the probabilities of the image and its mirror, as fit-head scored it."""
    from pipeline.data.images import decode_image
    from pipeline.heads.auto import load_views
    from pipeline.heads.models import load_head
    from pipeline.store.features import load_features

    head_dir = tmp_path / "logit"
    run_cli("fit-head", "--features", str(files["blocks"]), "--head", "logistic", "--layers", "conv_pw_7",
            "--out", str(head_dir))
    model_path = tmp_path / "logit.keras"
    run_cli("export", "--head", str(head_dir), "--out", str(model_path))
    meta = json.loads(__import__("zipfile").ZipFile(model_path).read("tlpipe.json"))
    assert meta["depths"] == ["conv_pw_7_relu"] and meta["test_time_mirror"] is True
    import keras

    from pipeline.nets.depths import split_columns

    fs = load_features(files["blocks"])
    val = fs.splits["val"]
    mirror = load_views(files["blocks"], fs.splits)["val"][0]
    head = load_head(head_dir)
    expected = (head.predict_proba(split_columns(val.X, fs.attrs, ["conv_pw_7_relu"])["conv_pw_7_relu"])
                + head.predict_proba(split_columns(mirror, fs.attrs, ["conv_pw_7_relu"])["conv_pw_7_relu"])) / 2
    batch = np.stack([decode_image(images / i, SIZE) for i in val.ids])
    got = keras.saving.load_model(model_path).predict(batch, verbose=0)
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_openvino_runtime_gives_the_same_depths(files, images, tmp_path):
    pytest.importorskip("openvino")
    from pipeline.store.features import load_features, read_attrs

    ov = tmp_path / "ov.h5"
    run_cli("extract", "--base", BASE, "--data", str(images), "--split", "60/20/20", "--weights", "none",
            "--input-size", str(SIZE), "--runtime", "openvino", "--layers", "blocks", "--out", str(ov),
            "--no-progress")
    a, b = read_attrs(ov), read_attrs(files["blocks"])
    assert a["depths"] == b["depths"] and a["depth_dims"] == b["depth_dims"] and a["runtime"] == "openvino"
    x, y = load_features(ov).splits["train"].X, load_features(files["blocks"]).splits["train"].X
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)


def test_layers_and_views_enter_the_fingerprint_only_when_not_default():
    from types import SimpleNamespace

    from pipeline.nets.backbones import get_backbone
    from pipeline.store import schema

    src = SimpleNamespace(fingerprint="abc", split_spec="80/10/10")
    args = (get_backbone(BASE), ("none", ""), SIZE, "avg", src)
    plain = schema.fingerprint_fields(*args)
    assert "layers" not in plain and "views" not in plain
    assert schema.fingerprint(*args) == schema.fingerprint(*args, layers=None, views=0)
    assert schema.fingerprint_fields(*args, layers=("conv_pw_7_relu",))["layers"] == ["conv_pw_7_relu"]
    assert len({schema.fingerprint(*args), schema.fingerprint(*args, layers=("conv_pw_7_relu",)),
                schema.fingerprint(*args, views=1)}) == 3


# ----------------------------------------------------------------------------- the ensemble head

def test_ensemble_head_stacks_members_chosen_on_train(tmp_path):
    from pipeline.heads.auto import get_any_head, load_any_head
    from pipeline.heads.ensemble import MEMBERS, EnsembleHead
    from pipeline.heads.models import HeadParams

    assert get_any_head("Ensemble") is EnsembleHead
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    X = rng.normal(size=(150, 12)) + np.eye(3)[y].repeat(4, axis=1) * 1.5
    head = EnsembleHead(3, HeadParams(cv_folds=3))
    rows = head.fit((X, y), (X[:5], y[:5]))
    t = head.tuning
    assert set(t["candidates"]) == {*MEMBERS, "stack"} and t["val_used_for_tuning"] is False
    best_member = min(MEMBERS, key=lambda n: t["candidates"][n]["cv_log_loss"])
    if t["chosen"].startswith("stack"):  # kept only when CV on train prefers it to the best member
        assert t["candidates"]["stack"]["cv_log_loss"] < t["candidates"][best_member]["cv_log_loss"]
    else:
        assert t["chosen"] == f"{best_member} alone"
    assert [r["param"] for r in rows] == ["C"] * len(rows) and t["cv_accuracy"] > 0.8
    proba = head.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    (tmp_path / "model").mkdir()
    head.save(tmp_path / "model")
    (tmp_path / "model" / "head.json").write_text(json.dumps({"head": "ensemble"}))
    np.testing.assert_allclose(load_any_head(tmp_path).predict_proba(X), proba)


def test_ensemble_head_through_fit_head(files, tmp_path):
    from pipeline.stage2.fit_head import FitConfig, fit_head, summary

    out = fit_head(FitConfig(features=[files["last"]], head="ensemble", out=tmp_path / "ens", progress=False))
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["head"] == "ensemble" and ev["tuning"]["val_used_for_tuning"] is False
    assert "ensemble=" in summary(out) and (out / "grid.csv").is_file()
