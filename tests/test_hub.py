"""KerasHub bases (``hub:PRESET``): tiny randomly initialised backbones of each family, saved as preset
folders (no download), through extract, fit-head, export and predict; the listing; the one-line failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

keras_hub = pytest.importorskip("keras_hub")

from pipeline.cli import cli
from pipeline.core.errors import UsageError
from pipeline.nets import hub
from pipeline.nets.backbones import get_backbone
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store.features import read_attrs
from tests.test_export_predict import _colour_folder

REPO = Path(__file__).resolve().parents[1]
M = keras_hub.models
L = keras_hub.layers
IMAGENET = {"scale": [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
            "offset": [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]}


def _text(cls, **kw):
    return cls(vocabulary_size=10, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
               intermediate_dim=32, max_sequence_length=8, **kw)


# preset name -> (input size, tiny backbone, its image converter, expected feature size with auto pooling)
TINY = {
    "dinov2_small": (28, lambda: M.DINOV2Backbone(
        patch_size=14, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3)),
        lambda: L.DINOV2ImageConverter(image_size=(28, 28), **IMAGENET), 32),
    "vit_base_patch16_224_imagenet": (32, lambda: M.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32),
        lambda: L.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0), 16),
    "clip_vit_base_patch32": (32, lambda: M.CLIPBackbone(
        vision_encoder=M.CLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                           intermediate_dim=32, image_shape=(32, 32, 3)),
        text_encoder=_text(M.CLIPTextEncoder), projection_dim=12),
        lambda: L.CLIPImageConverter(image_size=(32, 32), **IMAGENET), 12),
    "siglip_base_patch16_224": (32, lambda: M.SigLIPBackbone(
        vision_encoder=M.SigLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                             intermediate_dim=32, image_shape=(32, 32, 3)),
        text_encoder=_text(M.SigLIPTextEncoder)),
        lambda: L.SigLIPImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0), 16),
    "resnet_18_imagenet": (32, lambda: M.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block"),
        lambda: L.ResNetImageConverter(image_size=(32, 32), **IMAGENET), 16),
    "efficientnet_b0_ra_imagenet": (32, lambda: M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16], stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"], stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False], width_coefficient=1.0, depth_coefficient=1.0),
        # num_features stays 1280: KerasHub 0.32's get_config leaves it out, so a preset reloads with 1280
        lambda: L.EfficientNetImageConverter(image_size=(32, 32), **IMAGENET), 1280),
    "mobilenet_v3_small_050_imagenet": (32, lambda: M.MobileNetBackbone(
        stackwise_expansion=[[1]], stackwise_num_blocks=[1], stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]], stackwise_num_strides=[[2]], stackwise_se_ratio=[[None]],
        stackwise_activation=[["relu"]], stackwise_padding=[[1]], output_num_filters=16, depthwise_filters=8,
        depthwise_stride=2, depthwise_residual=False, last_layer_filter=16, input_num_filters=8),
        lambda: L.MobileNetImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0), 16),
}
FULL = ("dinov2_small", "clip_vit_base_patch32", "resnet_18_imagenet")  # through fit-head, export, predict


def make_preset(root: Path, preset: str) -> Path:
    """``root/PRESET``: a preset folder saved from a tiny random config of the preset's family."""
    import keras

    folder = root / preset
    if not (folder / "config.json").is_file():
        keras.utils.set_random_seed(0)
        _, backbone, converter, _ = TINY[preset]
        backbone().save_to_preset(str(folder))
        converter().save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    return tmp_path_factory.mktemp("presets")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return _colour_folder(tmp_path_factory.mktemp("data") / "colours", per_class=8)


@pytest.fixture(autouse=True)
def _no_download_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))  # nothing downloaded here


def _run(args, **kw):
    return CliRunner().invoke(cli, args, **kw)


# --------------------------------------------------------------------------------------------- listing

def test_every_listed_hub_base_resolves_offline():
    registry = keras_hub.models.Backbone.presets
    assert len(hub.listing()) >= 60
    for b in hub.listing():
        meta = registry[b.preset]  # KerasHub ships it: known offline
        assert meta["metadata"]["path"] == b.family, b.preset
        handle = meta["kaggle_handle"]
        assert handle.startswith(f"kaggle://keras/{hub.kaggle_model(b)}/keras/{b.preset}/"), handle  # download_folder
        assert hasattr(keras_hub.models, b.spec.backbone_class)
        assert get_backbone(b.name) is b and get_backbone(hub.file_stem(b.name)) is b
        assert b.input_size >= 224 and b.feature_size > 0 and b.default_pooling in hub.POOLINGS
        assert b.pooling_for("auto") == b.default_pooling
    families = {b.family for b in hub.listing()}
    assert {"dinov2", "clip", "siglip", "vit", "resnet", "efficientnet", "mobilenet"} <= families


def test_tlpipe_bases_marks_hub_bases():
    r = _run(["bases", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["hub:dinov2_small"]["hub"] and rows["hub:dinov2_small"]["pooling"] == "cls_mean"
    assert rows["hub:dinov2_small"]["feature_size"] == 768 and rows["hub:dinov2_small"]["input_size"] == 224
    assert rows["hub:clip_vit_base_patch16"]["pooling"] == "embed"
    assert not rows["vgg16"]["hub"] and rows["vgg16"]["pooling"] == "avg"
    table = _run(["bases"]).output
    assert "hub:siglip_base_patch16_224" in table and 'tlpipe[hub]' not in table


def test_pooling_fits_the_model():
    assert get_backbone("hub:dinov2_small").pooling_for("auto") == "cls_mean"
    assert get_backbone("hub:vit_base_patch16_224_imagenet").pooling_for("mean") == "mean"
    assert get_backbone("hub:resnet_50_imagenet").pooling_for(None) == "avg"
    assert get_backbone("vgg16").pooling_for("auto") == "avg"
    for base, pooling in [("hub:clip_vit_base_patch16", "cls"), ("hub:resnet_50_imagenet", "embed"),
                          ("vgg16", "cls_mean")]:
        with pytest.raises(UsageError, match="does not fit"):
            get_backbone(base).pooling_for(pooling)


def test_auto_pooling_keeps_keras_applications_fingerprints(colours, tmp_path):
    """--pooling auto (the new default) is avg for a keras.applications base: same fingerprint, settings and
    runtime spec as an explicit avg, so caches made with avg stay up to date."""
    from dataclasses import replace

    from pipeline.stage1.plan import plan

    cfg = ExtractConfig(base="mobilenet_0.25", data=str(colours), weights="none", cache_dir=tmp_path,
                        runtime="keras", progress=False)
    assert cfg.pooling == "auto"
    auto, avg = plan(cfg), plan(replace(cfg, pooling="avg"))
    ids = (("none", ""), ("keras", "f32"))
    assert auto.cfg.pooling == "avg" and auto.spec().pooling == "avg"
    assert auto.fingerprint(*ids) == avg.fingerprint(*ids)
    assert auto.static_attrs("x")["preprocessing"] == "keras.applications.mobilenet.preprocess_input"
    assert auto.static_attrs("x")["constructor"] == "keras.applications.MobileNet"
    assert plan(replace(cfg, pooling="max")).fingerprint(*ids) != avg.fingerprint(*ids)


# --------------------------------------------------------------------------------------------- failures

def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip() and not x.startswith("WARNING")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_unknown_preset_is_one_line_listing_valid_ones(colours):
    line = _one_line_exit_2(_run(["extract", "--base", "hub:dinov2_smal", "--data", str(colours)]))
    assert "unknown hub base 'hub:dinov2_smal'" in line and "did you mean hub:dinov2_small" in line
    assert "hub:clip_vit_base_patch16" in line and "hub:resnet_50_imagenet" in line


def test_without_keras_hub_one_line_names_the_extra(colours, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now raises ImportError
    line = _one_line_exit_2(_run(["extract", "--base", "hub:dinov2_small", "--data", str(colours)]))
    assert 'pip install "tlpipe[hub]"' in line
    assert "not installed" in _run(["bases"]).output  # the listing still works


def test_missing_download_fails_fast_naming_weights_dir(colours, tmp_path, monkeypatch):
    from pipeline.nets import weights

    monkeypatch.setattr(weights, "unreachable", lambda url: "www.kaggle.com: name lookup failed")
    line = _one_line_exit_2(_run(["extract", "--base", "hub:dinov2_small", "--data", str(colours),
                                  "--cache-dir", str(tmp_path), "--no-progress"]))
    assert "KerasHub preset dinov2_small is not downloaded" in line and "--weights DIR" in line
    assert str(hub.download_folder(get_backbone("hub:dinov2_small"))) in line
    assert not list((tmp_path / "features").glob("*.h5"))


def test_weights_folder_without_the_preset_is_one_line(colours, tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_line_exit_2(_run(["extract", "--base", "hub:dinov2_small", "--data", str(colours),
                                  "--weights", str(tmp_path / "empty"), "--cache-dir", str(tmp_path)]))
    assert "no KerasHub preset for hub:dinov2_small" in line and "dinov2_small" in line


def test_pooling_that_does_not_fit_is_one_line(colours, presets, tmp_path):
    make_preset(presets, "clip_vit_base_patch32")
    line = _one_line_exit_2(_run(["extract", "--base", "hub:clip_vit_base_patch32", "--data", str(colours),
                                  "--weights", str(presets), "--pooling", "cls", "--cache-dir", str(tmp_path)]))
    assert "--pooling cls does not fit hub:clip_vit_base_patch32" in line and "embed" in line


# --------------------------------------------------------------------------------------------- extract

def _extract(preset, presets, colours, cache, **kw):
    size = TINY[preset][0]
    make_preset(presets, preset)
    return extract(ExtractConfig(base=f"hub:{preset}", data=str(colours), weights=str(presets), input_size=size,
                                 batch_size=8, cache_dir=cache, progress=False, runtime="keras", **kw))


@pytest.mark.parametrize("preset", sorted(set(TINY) - set(FULL)))
def test_extract_each_family(preset, presets, colours, tmp_path):
    out = _extract(preset, presets, colours, tmp_path)
    a = read_attrs(out)
    b = get_backbone(f"hub:{preset}")
    assert out.name == f"hub_{preset}.h5"
    assert a["base"] == b.name and a["pooling"] == b.default_pooling and a["feature_size"] == TINY[preset][3]
    assert a["preprocessing"] == f"keras_hub image converter of {preset}"
    assert a["constructor"] == f"keras_hub.models.{b.spec.backbone_class}.from_preset"
    assert a["weights"] == str((presets / preset).resolve()) and len(a["weights_sha256"]) == 64
    assert "depths" not in a and "depth_dims" not in a  # --layers last: one depth, not recorded as depths


def test_pooling_is_in_the_attributes_and_the_fingerprint(presets, colours, tmp_path):
    auto = read_attrs(_extract("dinov2_small", presets, colours, tmp_path / "a"))
    cls = read_attrs(_extract("dinov2_small", presets, colours, tmp_path / "c", pooling="cls"))
    assert (auto["pooling"], auto["feature_size"]) == ("cls_mean", 32)
    assert (cls["pooling"], cls["feature_size"]) == ("cls", 16)
    assert auto["fingerprint"] != cls["fingerprint"]
    import h5py

    with h5py.File(tmp_path / "a/features/hub_dinov2_small.h5") as fa, \
            h5py.File(tmp_path / "c/features/hub_dinov2_small.h5") as fc:
        np.testing.assert_allclose(fa["train/features"][:, :16], fc["train/features"][...], rtol=1e-5, atol=1e-5)


def test_openvino_converts_a_hub_base(presets, colours, tmp_path):
    """Every family of TINY converts with KerasHub 0.32 / OpenVINO 2026 (checked by hand); DINOv2 here, the
    hardest (interpolated position embeddings, register-free token slicing)."""
    pytest.importorskip("openvino")
    ref = _extract("dinov2_small", presets, colours, tmp_path / "k")
    out = extract(ExtractConfig(base="hub:dinov2_small", data=str(colours), weights=str(presets), input_size=28,
                                batch_size=8, cache_dir=tmp_path / "o", progress=False, runtime="openvino",
                                precision="f32"))
    assert read_attrs(out)["runtime"] == "openvino"
    import h5py

    with h5py.File(ref) as fk, h5py.File(out) as fo:
        np.testing.assert_allclose(fo["val/features"][...], fk["val/features"][...], rtol=1e-3, atol=1e-3)


def test_openvino_failure_falls_back_in_one_logged_line(presets, colours, tmp_path, monkeypatch, caplog):
    ov = pytest.importorskip("openvino")

    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot create Gelu layer from unsupported opset\nsecond line")

    monkeypatch.setattr(ov, "convert_model", refuse)
    monkeypatch.setenv("TLPIPE_OPENVINO_CACHE", str(tmp_path / "ir"))  # nothing converted before
    make_preset(presets, "dinov2_small")
    cfg = {"base": "hub:dinov2_small", "data": str(colours), "weights": str(presets), "input_size": 28,
           "batch_size": 8, "progress": False, "precision": "f32"}
    with caplog.at_level("WARNING"):
        out = extract(ExtractConfig(cache_dir=tmp_path / "a", runtime="auto", **cfg))
    assert read_attrs(out)["runtime"] == "keras"
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "OpenVINO" in r.getMessage()]
    want = ("OpenVINO could not convert or compile hub:dinov2_small (Cannot create Gelu layer from unsupported "
            "opset); using the keras runtime")
    assert lines == [want]
    line = _one_line_exit_2(_run(["extract", "--base", "hub:dinov2_small", "--data", str(colours), "--weights",
                                  str(presets), "--input-size", "28", "--cache-dir", str(tmp_path / "b"),
                                  "--runtime", "openvino", "--no-progress"]))
    assert "OpenVINO could not convert or compile hub:dinov2_small" in line and "--runtime keras" in line


# --------------------------------------------------------------------------------------------- full route

@pytest.fixture(scope="module")
def full(presets, colours, tmp_path_factory):
    """Per FULL preset: extract -> fit-head (logistic) -> export (.keras), with the CLI."""
    done = {}
    for preset in FULL:
        make_preset(presets, preset)
        cache = tmp_path_factory.mktemp(preset)
        base = f"hub:{preset}"
        r = _run(["extract", "--base", base, "--data", str(colours), "--weights", str(presets), "--input-size",
                  str(TINY[preset][0]), "--batch-size", "8", "--cache-dir", str(cache), "--no-progress",
                  "--runtime", "keras"])
        assert r.exit_code == 0, r.output
        r = _run(["fit-head", "--features", f"hub_{preset}", "--head", "logistic", "--cache-dir", str(cache)])
        assert r.exit_code == 0, r.output
        head = cache / "heads" / f"hub_{preset}-logistic"
        model = cache / f"{preset}.keras"
        r = _run(["export", "--head", str(head), "--out", str(model), "--cache-dir", str(cache)])
        assert r.exit_code == 0, r.output
        done[preset] = (cache, head, model)
    return done


@pytest.mark.parametrize("preset", FULL)
def test_extract_fit_export_predict(full, preset, colours):
    import h5py

    from pipeline.deploy.predict import predict
    from pipeline.heads.models import load_head

    cache, head, model = full[preset]
    meta = json.loads(__import__("zipfile").ZipFile(model).read("tlpipe.json"))
    assert meta["requires"] == ["keras", "keras-hub"] and meta["base"] == f"hub:{preset}"
    with h5py.File(cache / "features" / f"hub_{preset}.h5") as h5:
        X, ids = h5["val/features"][...], list(h5["val/ids"].asstr()[...])
    expected = load_head(head).predict_proba(X)
    result = predict(model, [colours / i for i in ids], runtime="keras")
    got = np.array([[row["probabilities"][c] for c in result.class_names] for row in result.rows])
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_fine_tune_refuses_a_hub_head_in_one_line(full):
    cache, head, _ = full["resnet_18_imagenet"]
    line = _one_line_exit_2(_run(["fine-tune", "--head", str(head), "--cache-dir", str(cache), "--epochs", "1"]))
    assert "hub:resnet_18_imagenet is a KerasHub base" in line and "not supported yet" in line


_FRESH = r"""
import importlib.util, json, sys
sys.modules["pipeline"] = None  # tlpipe must not be needed (the venv may hold an editable install)
import numpy as np, keras, keras_hub
from PIL import Image
model = keras.saving.load_model(sys.argv[1])
images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((40, 30))) for p in sys.argv[2:]])
print(json.dumps({"p": np.asarray(model.predict(images, verbose=0)).tolist(),
                  "tlpipe": any(m.startswith("pipeline.") for m in sys.modules)}))
"""


@pytest.mark.parametrize("preset", FULL)
def test_exported_model_loads_without_tlpipe(full, preset, colours, tmp_path):
    import keras

    from pipeline.deploy.export import import_hub_layers

    _, _, model = full[preset]
    images = sorted(str(p) for p in colours.rglob("*.png"))[:4]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(model), *images], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not fresh["tlpipe"]
    import_hub_layers(model)
    from PIL import Image

    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((40, 30))) for p in images])
    here = keras.saving.load_model(model).predict(batch, verbose=0)
    np.testing.assert_allclose(np.asarray(fresh["p"]), here, atol=1e-5)
    assert np.allclose(np.asarray(fresh["p"]).sum(1), 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------------- DVC

def test_params_may_list_hub_bases_in_dvc_foreach(tmp_path, colours):
    """dvc.yaml's foreach takes hub:PRESET (':' in a stage name, a target and a path works) and hub_PRESET."""
    import yaml

    from tests.conftest import make_dvc_project, run_dvc

    work = tmp_path / "proj"
    params = make_dvc_project(work, colours, "hub:dinov2_small", epochs=1, patience=1)
    params["extract"]["bases"] = ["vgg16", "hub:dinov2_small", "hub_clip_vit_base_patch16"]
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    listed = run_dvc("stage", "list", cwd=work)
    assert listed.returncode == 0, listed.stderr
    assert "extract@hub:dinov2_small" in listed.stdout and "cache/dvc/features/hub:dinov2_small.h5" in listed.stdout
    assert "extract@hub_clip_vit_base_patch16" in listed.stdout
    (work / "cache/dvc").mkdir(parents=True)
    (work / "cache/dvc/manifest.json").write_text("{}")  # the stage's dependency (a dry run hashes it)
    dry = run_dvc("repro", "--dry", "--single-item", "extract@hub:dinov2_small", cwd=work)
    assert dry.returncode == 0, dry.stderr
    assert "--base hub:dinov2_small" in dry.stdout and "--out cache/dvc/features/hub:dinov2_small.h5" in dry.stdout
    assert "vgg16" not in dry.stdout  # the target is the hub stage, not 'extract@hub' with a stage 'dinov2_small'
    assert get_backbone("hub_clip_vit_base_patch16").name == "hub:clip_vit_base_patch16"


def test_feature_pyramid_names_the_depths_kerashub_exposes(presets):
    for preset, want in [("resnet_18_imagenet", ["P2", "P3"]), ("dinov2_small", ["stem", "stage1"]),
                         ("vit_base_patch16_224_imagenet", [])]:
        model = keras_hub.models.Backbone.from_preset(str(make_preset(presets, preset)))
        assert list(hub.feature_pyramid(model))[:len(want) or None] == want, preset


# --------------------------------------------------------------------------------------------- depths (--layers)

PYRAMID = {"dinov2_small": (["stem", "stage1"], [32, 32]), "resnet_18_imagenet": (["P2", "P3"], [64, 16])}


@pytest.mark.parametrize("preset", sorted(PYRAMID))
def test_layers_blocks_stores_the_feature_pyramid(preset, presets, colours, tmp_path):
    from pipeline.nets.depths import depths_of

    a = read_attrs(_extract(preset, presets, colours, tmp_path, layers="blocks"))
    names, dims = PYRAMID[preset]
    assert depths_of(a) == list(zip(names, dims)) and a["feature_size"] == sum(dims)
    assert a["pooling"] == get_backbone(f"hub:{preset}").default_pooling  # DINOv2 stages: its token pooling


def test_layers_names_pick_pyramid_levels_and_the_last_is_the_base_output(presets, colours, tmp_path):
    import h5py

    deep = _extract("resnet_18_imagenet", presets, colours, tmp_path / "d", layers="P3")
    last = _extract("resnet_18_imagenet", presets, colours, tmp_path / "l")
    assert list(read_attrs(deep)["depths"]) == ["P3"]
    with h5py.File(deep) as fd, h5py.File(last) as fl:  # P3 average-pooled is the base's pooled output
        np.testing.assert_allclose(fd["train/features"][...], fl["train/features"][...], rtol=1e-5, atol=1e-5)


def test_hub_depths_fail_in_one_line(presets, colours, tmp_path):
    make_preset(presets, "resnet_18_imagenet")
    common = ["--data", str(colours), "--weights", str(presets), "--cache-dir", str(tmp_path), "--no-progress",
              "--runtime", "keras", "--input-size", "32"]
    line = _one_line_exit_2(_run(["extract", "--base", "hub:vit_base_patch16_224_imagenet", "--layers", "blocks",
                                  *common]))
    assert "hub:vit_base_patch16_224_imagenet exposes no depths" in line and "--layers last" in line
    line = _one_line_exit_2(_run(["extract", "--base", "hub:resnet_18_imagenet", "--layers", "P2,P9", *common]))
    assert "unknown depth 'P9' for hub:resnet_18_imagenet" in line and "P2, P3" in line


def test_no_depths_fails_at_plan_time_before_tensorflow(colours):
    code = ("import sys\nfrom pipeline.stage1.extract import ExtractConfig\nfrom pipeline.stage1.plan import plan\n"
            "try:\n    plan(ExtractConfig(base='hub:clip_vit_base_patch16', data=sys.argv[1], layers='blocks'))\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
            "print(sorted({'tensorflow', 'keras', 'keras_hub'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, str(colours)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("UsageError hub:clip_vit_base_patch16 exposes no depths") and lines[1] == "[]"


def test_openvino_gives_the_same_hub_depths(presets, colours, tmp_path):
    pytest.importorskip("openvino")
    import h5py

    ref = _extract("dinov2_small", presets, colours, tmp_path / "k", layers="blocks")
    out = extract(ExtractConfig(base="hub:dinov2_small", data=str(colours), weights=str(presets), input_size=28,
                                batch_size=8, cache_dir=tmp_path / "o", progress=False, runtime="openvino",
                                precision="f32", layers="blocks"))
    a, b = read_attrs(out), read_attrs(ref)
    assert a["runtime"] == "openvino" and (a["depths"], a["depth_dims"]) == (b["depths"], b["depth_dims"])
    with h5py.File(ref) as fk, h5py.File(out) as fo:
        np.testing.assert_allclose(fo["val/features"][...], fk["val/features"][...], rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def depth_head(presets, colours, tmp_path_factory):
    """hub:resnet_18_imagenet --layers blocks -> fit-head --head auto -> export, with the CLI."""
    preset = "resnet_18_imagenet"
    make_preset(presets, preset)
    cache = tmp_path_factory.mktemp("depths")
    r = _run(["extract", "--base", f"hub:{preset}", "--data", str(colours), "--weights", str(presets), "--input-size",
              "32", "--batch-size", "8", "--cache-dir", str(cache), "--no-progress", "--runtime", "keras",
              "--layers", "blocks"])
    assert r.exit_code == 0, r.output
    head = cache / "heads" / "auto"
    r = _run(["fit-head", "--features", f"hub_{preset}", "--head", "auto", "--cache-dir", str(cache),
              "--out", str(head)])
    assert r.exit_code == 0, r.output
    model = cache / "auto.keras"
    r = _run(["export", "--head", str(head), "--out", str(model), "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    return cache, head, model


def test_auto_head_on_hub_depths_exports_and_predicts(depth_head, colours, tmp_path):
    import h5py

    from pipeline.deploy.predict import predict
    from pipeline.heads.auto import load_any_head

    cache, head, model = depth_head
    meta = json.loads(__import__("zipfile").ZipFile(model).read("tlpipe.json"))
    assert meta["requires"] == ["keras", "keras-hub"] and meta["base"] == "hub:resnet_18_imagenet"
    assert set(meta["depths"]) <= {"P2", "P3"} and meta["depths"]
    with h5py.File(cache / "features" / "hub_resnet_18_imagenet.h5") as h5:
        X, ids = h5["val/features"][...], list(h5["val/ids"].asstr()[...])
    expected = load_any_head(head).predict_proba(X)
    result = predict(model, [colours / i for i in ids], runtime="keras")
    got = np.array([[row["probabilities"][c] for c in result.class_names] for row in result.rows])
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # loads with keras + keras-hub alone, in a fresh process
    images = sorted(str(p) for p in colours.rglob("*.png"))[:2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(model), *images], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not fresh["tlpipe"] and np.allclose(np.asarray(fresh["p"]).sum(1), 1.0, atol=1e-4)


def test_plain_head_on_depths_exports_through_the_depth_graph(depth_head, colours):
    import h5py

    from pipeline.deploy.predict import predict
    from pipeline.heads.models import load_head

    cache, _, _ = depth_head
    head = cache / "heads" / "logit"
    r = _run(["fit-head", "--features", "hub_resnet_18_imagenet", "--head", "logistic", "--cache-dir", str(cache),
              "--out", str(head)])
    assert r.exit_code == 0, r.output
    model = cache / "logit.keras"
    r = _run(["export", "--head", str(head), "--out", str(model), "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    meta = json.loads(__import__("zipfile").ZipFile(model).read("tlpipe.json"))
    assert meta["depths"] == ["P2", "P3"] and meta["requires"] == ["keras", "keras-hub"]
    with h5py.File(cache / "features" / "hub_resnet_18_imagenet.h5") as h5:
        X, ids = h5["val/features"][...], list(h5["val/ids"].asstr()[...])
    expected = load_head(head).predict_proba(X)
    result = predict(model, [colours / i for i in ids], runtime="keras")
    got = np.array([[row["probabilities"][c] for c in result.class_names] for row in result.rows])
    np.testing.assert_allclose(got, expected, atol=2e-3)
