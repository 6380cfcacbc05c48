"""fine-tune from heads fitted on several pooled depths (extract --layers), with and without stored views
(the head then predicts with the mean over each image and its mirror), on tiny synthetic images
(mobilenet_0.25, random weights, 32 px); --unfreeze checked from the table before TensorFlow starts."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, make_folder
from pipeline.cli import cli
from pipeline.heads.models import HeadParams
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.stage3.finetune import FineTuneConfig, build_models, fine_tune, split_rows

BASE = "mobilenet_0.25"
DEPTHS = "conv_pw_7,conv_pw_13"


@pytest.fixture(scope="module")
def depth_heads(tmp_path_factory):
    """Heads on a file of two depths with a mirror view (``mirror``) and on one without views (``plain``)."""
    root = tmp_path_factory.mktemp("depths")
    # noisy classes: probabilities well inside (0, 1); seed 1: the exact leave-one-photo-out CV prefers the
    # test-time mirror on these images (on seed 0 it does not), and the tests below need a head that uses it
    data = make_folder(root / "data", per_class=12, size=(40, 30), seed=1)
    cache = root / "cache"
    common = dict(base=BASE, data=str(data), weights="none", input_size=32, batch_size=16, split="60/20/20",
                  progress=False, layers=DEPTHS)
    mirror = extract(ExtractConfig(**common, out=cache / "features" / "mirror.h5", views=1))
    plain = extract(ExtractConfig(**common, out=cache / "features" / "plain.h5"))
    out = {"data": data, "cache": cache, "mirror": mirror, "plain": plain}

    def fit(features, head, name, **kw):
        out[name] = fit_head(FitConfig(features=[features], head=head, cache_dir=cache, out=root / "heads" / name,
                                       **kw))

    fit(mirror, "auto", "auto")
    fit(mirror, "logistic", "logistic", layers="conv_pw_13")  # one of the two stored depths
    fit(mirror, "dense", "dense", params=HeadParams(epochs=3, patience=2))
    fit(plain, "auto", "auto_plain")
    fit(plain, "knn", "knn")
    return out


SPLITS = ("train", "val", "test")


def _rows(features: Path):
    """(the features file, its attributes, every row of its splits with the rows' mirror views, the rows'
    images decoded at 32 px), splits in the order train, val, test."""
    from pipeline.data.sources import decode_item, open_source
    from pipeline.store.features import load_features, load_views, read_attrs

    attrs = read_attrs(features)
    fs = load_features(features)
    items, rows, _, _ = split_rows(fs, open_source(str(attrs["data_source"]), str(attrs["split_spec"])))
    images = np.stack([decode_item(items[i], 32) for s in SPLITS for i in rows[s]])
    X = np.concatenate([fs.splits[s].X for s in SPLITS])
    views = load_views(features, fs.splits)
    mirror = [np.concatenate([views[s][0] for s in SPLITS])] if views else []
    return attrs, X, mirror, images


def _expected(name: str, head_dir: Path, attrs, X: np.ndarray, mirror: list[np.ndarray]) -> np.ndarray:
    """The head's probabilities on the rows, as fit-head scores them (with the mean over the mirror view)."""
    from pipeline.heads.auto import columns, load_any_head
    from pipeline.nets.depths import depths_of

    head = load_any_head(head_dir / "model")
    if name.startswith("auto"):
        return head.predict_proba(X, views=mirror[:1])
    used = json.loads((head_dir / "evaluation.json").read_text())["depths"]["depths"]

    def cols(M):
        parts = columns(depths_of(attrs), M)
        return np.concatenate([parts[d] for d in used], axis=1)

    return (head.predict_proba(cols(X)) + head.predict_proba(cols(mirror[0]))) / 2


@pytest.mark.parametrize("name", ["auto", "logistic", "dense", "auto_plain"])
def test_model_at_step_0_gives_the_heads_probabilities(depth_heads, name):
    """Before any step, the model on the images gives the probabilities the head gives on the cached
    features (compared as log-probabilities down to 1e-6, so that confident rows count too)."""
    from pipeline.heads.folder import read_head_info

    attrs, X, mirror, images = _rows(depth_heads["plain" if name.endswith("plain") else "mirror"])
    model_dir, info = read_head_info(depth_heads[name])
    built = build_models(model_dir, info, attrs, None, "block", "none", 0, {})
    got = np.asarray(built.core(images, training=False), np.float64)
    want = _expected(name, depth_heads[name], attrs, X, mirror)
    if name != "auto_plain":  # (that one is sure of every row here: its softmax temperature at the grid's top)
        assert ((want > 1e-3) & (want < 1 - 1e-3)).any()  # not every row saturated: a real comparison
    np.testing.assert_allclose(np.log(np.clip(got, 1e-6, 1)), np.log(np.clip(want, 1e-6, 1)), atol=1e-3)
    names = {layer.name for layer in built.core.layers}
    assert ("mean_with_mirror" in names) == (name != "auto_plain")


def test_fine_tune_an_auto_head_end_to_end(depth_heads, tmp_path):
    """The same loop and outputs as a plain head: epoch 0 scores the head, model.keras computes the depths
    and the mirror with built-in layers, predict takes it, a kill resumes."""
    out = tmp_path / "ft"

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = dict(head=depth_heads["auto"], cache_dir=depth_heads["cache"], unfreeze="block", epochs=2, patience=5,
               batch_size=8, out=out)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(FineTuneConfig(**cfg, after_epoch=stop))
    seen: list[int] = []
    fine_tune(FineTuneConfig(**cfg, after_epoch=seen.append))
    assert seen == [2]  # resumed at epoch 2
    ev = json.loads((out / "evaluation.json").read_text())
    head_ev = json.loads((depth_heads["auto"] / "evaluation.json").read_text())
    f = ev["fine_tune"]
    assert ev["head"] == "auto+ft" and f["from_head_name"] == "auto"
    assert f["depths"] == head_ev["depths"]["depths"] and f["test_time_mirror"] is True
    assert abs(f["epoch0_val_accuracy"] - head_ev["splits"]["val"]["accuracy"]) <= 0.005
    assert ev["tuning"]["val_used_for_tuning"] is False
    r = CliRunner().invoke(cli, ["predict", "--model", str(out / "model.keras"), str(depth_heads["data"] / "cat"),
                                 "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(ln for ln in r.output.splitlines() if "," in ln))) == 12
    from pipeline.deploy.export import read_metadata

    meta = read_metadata(out / "model.keras")
    assert meta["depths"] == f["depths"] and meta["test_time_mirror"] is True


def test_fine_tune_a_depth_head_with_cached_views(depth_heads, tmp_path):
    """--views K on a head of two depths (no mirror): the top is trained on cached activations of the trunk."""
    out = fine_tune(FineTuneConfig(head=depth_heads["auto_plain"], cache_dir=depth_heads["cache"], unfreeze="block",
                                   epochs=1, batch_size=8, views=2, out=tmp_path / "ft"))
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]
    assert f["views"] == 2 and f["views_cache"]["check_max_abs_diff"] < 1e-4
    head_ev = json.loads((depth_heads["auto_plain"] / "evaluation.json").read_text())
    assert abs(f["epoch0_val_accuracy"] - head_ev["splits"]["val"]["accuracy"]) <= 0.005


def _imported(stderr: str) -> set[str]:
    """Top-level modules named by ``python -X importtime`` on stderr."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", stderr, re.M)}


def _refused_before_tensorflow(args: list, cwd: Path) -> str:
    """Run the CLI with ``-X importtime``: one line, exit 2, TensorFlow and Keras never imported; the line."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=str(cwd))
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("import time:", "WARNING pipeline.data"))]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("tlpipe: error: "), (args, r.stderr[-2000:])
    assert not {"tensorflow", "keras"} & _imported(r.stderr), (args, lines)
    return lines[0]


def test_bad_values_are_refused_before_tensorflow_and_before_the_existing_output(depth_heads, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")  # an --out made from other settings
    auto, cache = depth_heads["auto"], depth_heads["cache"]

    def refused(head, *extra):
        return _refused_before_tensorflow(["fine-tune", "--head", head, "--cache-dir", cache, "--out", mine, *extra],
                                          tmp_path)

    line = refused(auto, "--unfreeze", "block99")
    assert "unknown block 'block99' for mobilenet_0.25" in line and "conv_pw_13" in line and "--force" not in line
    line = refused(auto, "--unfreeze", "0")
    assert "--unfreeze 0 is out of range" in line
    line = refused(depth_heads["logistic"], "--unfreeze", "89")  # conv_pw_13's trunk: 85 + its pool = 86 layers
    assert "--unfreeze 89 is out of range: mobilenet_0.25 has 86 layers up to the depths the head reads" in line
    line = refused(depth_heads["knn"])
    assert "dense, logistic or auto head" in line and "'knn'" in line
    line = refused(auto, "--views", "2")
    assert "--views with a head that predicts with the mean over each image and its mirror" in line
    line = refused(auto, "--weights", str(depth_heads["mirror"]))
    assert "features file, not weights" in line
    head_ev = json.loads((auto / "evaluation.json").read_text())
    if head_ev["depths"]["depths"] == ["conv_pw_7_relu"]:  # auto reads conv_pw_7 only: conv_pw_13 is past it
        line = refused(auto, "--unfreeze", "conv_pw_13")
        assert "reads depths up to conv_pw_7_relu" in line and "conv_pw_7" in line
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_block_past_the_heads_depths_is_refused(depth_heads):
    from pipeline.core.errors import UsageError
    from pipeline.stage3.start import check_unfreeze

    check_unfreeze(BASE, "conv_pw_7", ["conv_pw_7_relu"])
    check_unfreeze(BASE, "conv_dw_7", ["conv_pw_7_relu", "conv_pw_13_relu"])
    with pytest.raises(UsageError, match="reads depths up to conv_pw_7_relu.*blocks it can train: conv1, .*conv_pw_7 "):
        check_unfreeze(BASE, "conv_dw_8", ["conv_pw_7_relu"])
    with pytest.raises(UsageError, match="out of range: mobilenet_0.25 has 86 layers; give 1..86"):
        check_unfreeze(BASE, "87", None)


@pytest.mark.parametrize("base", ["mobilenet_0.25", "inception_v3"])
def test_unfreeze_table_is_the_built_base(base):
    """``UNFREEZE`` (layers, blocks and where each starts, depth indices) of a base, as built (every base:
    TLPIPE_ALL_BASES=1 on test_unfreeze_table_of_every_base)."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_unfreeze_table import row

    from pipeline.stage3.unfreeze_table import UNFREEZE

    layers, blocks, depths = row(base)
    assert UNFREEZE[base] == (layers, tuple(blocks), depths)


@pytest.mark.skipif(not os.environ.get("TLPIPE_ALL_BASES"), reason="builds every base (minutes): TLPIPE_ALL_BASES=1")
def test_unfreeze_table_of_every_base():
    from pipeline.nets.backbones import BACKBONES

    for name, b in BACKBONES.items():
        if not b.hub:
            test_unfreeze_table_is_the_built_base(name)
