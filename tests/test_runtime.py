"""Stage-one runtime (pipeline/stage1/runtime.py): keras | openvino, f32 | bf16, choice, cache, fallbacks.

Offline and small: random weights (``weights="none"``), 32-48 px inputs, tiny synthetic folders.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.stage1 import runtime as rt
from pipeline.cli import cli
from pipeline.core.errors import UsageError
from pipeline.stage1.extract import ExtractConfig, extract
from tests.test_export_predict import _colour_folder

openvino = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return _colour_folder(tmp_path_factory.mktemp("data") / "colours", per_class=10)


def _one_line(output: str) -> str:
    lines = [x for x in output.strip().splitlines() if x.strip()]
    assert len(lines) == 1, output
    return lines[0]


# ------------------------------------------------------------------------------------------- choice

CPU = dict(accelerator=None, backend="tensorflow", x86=True, openvino_ok=True, bf16_ok=True)


@pytest.mark.parametrize("overrides, expected", [
    ({}, "openvino"),                                   # x86-64 CPU with openvino: OpenVINO
    ({"openvino_ok": False}, "keras"),                  # openvino not installed
    ({"x86": False}, "keras"),                          # ARM / other CPUs
    ({"accelerator": "gpu"}, "keras"),                  # GPUs
    ({"backend": "jax"}, "keras"),                      # KERAS_BACKEND=jax falls back cleanly
])
def test_auto_runtime_choice(overrides, expected):
    got, precision = rt.resolve("auto", "auto", **{**CPU, **overrides})
    assert got == expected
    if expected == "openvino":
        assert precision == ("bf16" if rt.AUTO_PRECISION_BF16 else "f32")
    else:
        assert precision == ("fp16" if overrides.get("accelerator") else "f32")


def test_explicit_choices_and_bad_requests():
    assert rt.resolve("openvino", "bf16", **CPU) == ("openvino", "bf16")
    assert rt.resolve("openvino", "f32", **CPU) == ("openvino", "f32")
    assert rt.resolve("keras", "auto", **CPU) == ("keras", "f32")
    assert rt.resolve("keras", "auto", "on", **CPU) == ("keras", "fp16")
    assert rt.resolve("OpenVINO", "F32", **CPU) == ("openvino", "f32")
    bad = [
        (("tensorrt", "auto"), {}, "unknown runtime 'tensorrt'"),
        (("auto", "int8"), {}, "unknown precision 'int8'"),
        (("openvino", "bf16"), {"bf16_ok": False}, "no native bfloat16"),
        (("openvino", "auto"), {"openvino_ok": False}, "openvino package is not installed"),
        (("openvino", "auto"), {"backend": "jax"}, "KERAS_BACKEND=jax"),
        (("keras", "bf16"), {}, "needs --runtime openvino"),
        (("openvino", "fp16"), {}, "--precision fp16 is Keras float16; with --runtime openvino"),
    ]
    for args, overrides, message in bad:
        with pytest.raises(UsageError, match=message):
            rt.resolve(*args, **{**CPU, **overrides})


def test_bf16_probe_reads_cpu_flags(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    real_read = Path.read_text

    def fake(self, *a, **k):
        return flags.read_text() if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake)
    for text, expected in (("flags : fpu avx512f amx_bf16 amx_tile", True), ("flags : avx512_bf16", True),
                           ("flags : fpu sse avx2 avx512f", False)):
        flags.write_text(text)
        rt.bf16_supported.cache_clear()
        assert rt.bf16_supported() is expected
    rt.bf16_supported.cache_clear()


def test_missing_openvino_falls_back_to_keras(colours, tmp_path, monkeypatch, caplog):
    """openvino not importable: auto extracts with Keras and says so; --runtime openvino is one line, exit 2."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    assert rt.openvino_available() is False
    rt._said.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.stage1.runtime"):
        out = extract(ExtractConfig(base="vgg16", data=str(colours), weights="none", input_size=32, batch_size=8,
                                    out=tmp_path / "f.h5", progress=False))
    with h5py.File(out, "r") as h5:
        assert h5.attrs["runtime"] == "keras" and h5.attrs["precision"] == "f32"
    assert "runtime: keras f32 (openvino is not installed)" in caplog.text
    r = CliRunner().invoke(cli, ["extract", "--base", "vgg16", "--data", str(colours), "--weights", "none",
                                 "--input-size", "32", "--runtime", "openvino", "--out", str(tmp_path / "g.h5")])
    assert r.exit_code == 2 and "openvino package is not installed" in _one_line(r.output)


def test_bad_runtime_or_precision_is_one_line_exit_2(colours, tmp_path, monkeypatch):
    base = ["extract", "--base", "vgg16", "--data", str(colours), "--weights", "none", "--input-size", "32",
            "--out", str(tmp_path / "f.h5")]
    r = CliRunner().invoke(cli, [*base, "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "unknown runtime 'tensorrt'" in _one_line(r.output)
    r = CliRunner().invoke(cli, [*base, "--precision", "int4"])
    assert r.exit_code == 2 and "unknown precision 'int4'" in _one_line(r.output)
    # bf16 on a CPU without native bfloat16: one line naming the fallback, not a silent slowdown
    monkeypatch.setattr(rt, "bf16_supported", lambda: False)
    r = CliRunner().invoke(cli, [*base, "--runtime", "openvino", "--precision", "bf16"])
    assert r.exit_code == 2 and "use --precision f32" in _one_line(r.output)
    r = CliRunner().invoke(cli, [*base, "--runtime", "auto", "--precision", "bf16"])
    assert r.exit_code == 2 and "no native bfloat16" in _one_line(r.output)
    assert not (tmp_path / "f.h5").exists()
    r = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "m.keras"), str(colours), "--runtime", "x"])
    assert r.exit_code == 2 and "unknown runtime 'x'" in _one_line(r.output)


# ------------------------------------------------------------------------------------------- features

@pytest.mark.parametrize("base, size", [("vgg16", 32), ("mobilenet_0.25", 48)])
def test_openvino_f32_matches_keras(base, size, tmp_path):
    batch = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    keras_rt = rt.build_runtime(base, "none", size, runtime="keras", batch_size=4)
    ov_rt = rt.build_runtime(base, "none", size, runtime="openvino", precision="f32", batch_size=4,
                             cache_dir=tmp_path)
    assert (keras_rt.name, ov_rt.name, ov_rt.precision) == ("keras", "openvino", "f32")
    assert ov_rt.feature_size == keras_rt.feature_size and ov_rt.weights == keras_rt.weights
    ref = np.concatenate([keras_rt(batch[:4]), keras_rt(batch[4:])])  # the short last batch is padded
    got = np.concatenate([ov_rt(batch[:4]), ov_rt(batch[4:])])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_conversion_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    calls = []
    real = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    first = rt.build_runtime("vgg16", "none", 32, runtime="openvino", precision="f32", batch_size=2,
                             cache_dir=tmp_path)
    ref = first(batch)
    assert len(calls) == 1
    again = rt.build_runtime("vgg16", "none", 32, runtime="openvino", precision="f32", batch_size=2,
                             cache_dir=tmp_path)
    assert len(calls) == 1  # read back, not converted again
    np.testing.assert_array_equal(again(batch), ref)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert {"model.xml", "model.bin", "meta.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # corrupt weights (same size, other bytes): detected by the sha256, rebuilt, features still right
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x7f" * 64
    (folder / "model.bin").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.stage1.runtime"):
        rebuilt = rt.build_runtime("vgg16", "none", 32, runtime="openvino", precision="f32", batch_size=2,
                                   cache_dir=tmp_path)
    assert len(calls) == 2 and "is unusable" in caplog.text
    np.testing.assert_array_equal(rebuilt(batch), ref)
    # a truncated graph file is rebuilt too
    (folder / "model.xml").write_text("<net")
    rt.build_runtime("vgg16", "none", 32, runtime="openvino", precision="f32", batch_size=2, cache_dir=tmp_path)
    assert len(calls) == 3


def test_conversion_failure_falls_back_under_auto_only(tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("unsupported operation Foo\nmore detail")

    monkeypatch.setattr(openvino, "convert_model", broken)
    monkeypatch.setattr(rt, "resolve", lambda *a, **k: ("openvino", "f32"))  # as on an x86-64 CPU
    with caplog.at_level(logging.WARNING, logger="pipeline.stage1.runtime"):
        got = rt.build_runtime("vgg16", "none", 32, runtime="auto", batch_size=2, cache_dir=tmp_path)
    assert got.name == "keras" and "using the keras runtime" in caplog.text
    with pytest.raises(UsageError, match=r"could not convert or compile vgg16 \(unsupported operation Foo\); "
                                         r"use --runtime keras"):
        rt.build_runtime("vgg16", "none", 32, runtime="openvino", batch_size=2, cache_dir=tmp_path)


def test_runtime_and_precision_are_in_fingerprint_attrs_and_info(colours, tmp_path, monkeypatch):
    from pipeline.data.sources import open_source
    from pipeline.nets.backbones import get_backbone
    from pipeline.store.schema import fingerprint

    source = open_source(str(colours), "80/10/10")
    bb = get_backbone("vgg16")
    prints = {(r, p): fingerprint(bb, ("none", ""), 32, "avg", source, (r, p))
              for r, p in (("keras", "f32"), ("openvino", "f32"), ("openvino", "bf16"))}
    assert len(set(prints.values())) == 3

    cfg = dict(base="vgg16", data=str(colours), weights="none", input_size=32, batch_size=8, progress=False)
    k = extract(ExtractConfig(**cfg, runtime="keras", out=tmp_path / "k.h5"))
    o = extract(ExtractConfig(**cfg, runtime="openvino", precision="f32", out=tmp_path / "o.h5"))
    with h5py.File(k, "r") as hk, h5py.File(o, "r") as ho:
        assert (hk.attrs["runtime"], hk.attrs["precision"]) == ("keras", "f32")
        assert (ho.attrs["runtime"], ho.attrs["precision"]) == ("openvino", "f32")
        assert ho.attrs["openvino_version"] == openvino.__version__
        assert hk.attrs["fingerprint"] != ho.attrs["fingerprint"]
        a, b = hk["train/features"][...], ho["train/features"][...]
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a))
    # the openvino file is not taken for the keras one: replacing it needs --force and names the change
    r = CliRunner().invoke(cli, ["extract", "--base", "vgg16", "--data", str(colours), "--weights", "none",
                                 "--input-size", "32", "--runtime", "keras", "--out", str(o)])
    assert r.exit_code != 0 and "runtime openvino -> keras" in r.output
    r = CliRunner().invoke(cli, ["info", str(o), "--no-check"])
    assert r.exit_code == 0 and "runtime              openvino" in r.output and "precision            f32" in r.output


def test_fusion_refuses_mixed_precisions(colours, tmp_path, caplog):
    f32 = extract(ExtractConfig(base="vgg16", data=str(colours), weights="none", input_size=32, batch_size=8,
                                runtime="keras", out=tmp_path / "f32.h5", progress=False))
    bf16 = tmp_path / "bf16.h5"
    bf16.write_bytes(f32.read_bytes())
    with h5py.File(bf16, "a") as h5:  # as a bf16 extraction records itself
        h5.attrs["runtime"], h5.attrs["precision"] = "openvino", "bf16"
    args = ["fit-head", "--features", str(f32), "--features", str(bf16), "--head", "logistic"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "h1")])
    assert r.exit_code == 2 and "different precisions" in _one_line(r.output)
    assert "--allow-mixed-precision" in r.output
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "h2"), "--allow-mixed-precision"])
    assert r.exit_code == 0, r.output
    # exporting a head fitted on bf16 features says that the float32 model can differ from its metrics
    from pipeline.deploy.export import ExportConfig, export_model

    logging.getLogger().addHandler(caplog.handler)  # the CLI runs above reset the root logger's handlers
    with caplog.at_level(logging.WARNING, logger="pipeline.deploy.export"):
        export_model(ExportConfig(head=tmp_path / "h2", out=tmp_path / "m.keras", weights="none"))
    assert "fitted on bf16 features" in caplog.text
    # the report tells a head on bf16 features apart from its f32 twin
    from pipeline.reporting.report import head_row

    assert head_row(tmp_path / "h2")["weights"].endswith("(bf16 features)")
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(f32), "--head", "logistic", "--out", str(tmp_path / "h3")])
    assert r.exit_code == 0 and "features)" not in head_row(tmp_path / "h3")["weights"]


# ------------------------------------------------------------------------------------------- predict

def test_predict_with_openvino_matches_the_exported_keras_model(colours, tmp_path):
    from pipeline.stage2.fit_head import FitConfig, fit_head
    from pipeline.deploy.predict import predict

    cache = tmp_path / "cache"
    feats = extract(ExtractConfig(base="vgg16", data=str(colours), weights="none", input_size=32, batch_size=8,
                                  cache_dir=cache, progress=False))
    folder = fit_head(FitConfig(features=[str(feats)], head="logistic", cache_dir=cache, out=tmp_path / "h"))
    model = tmp_path / "m.keras"
    r = CliRunner().invoke(cli, ["export", "--head", str(folder), "--out", str(model), "--weights", "none",
                                 "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    with h5py.File(feats, "r") as h5:
        ids = list(h5["val"]["ids"].asstr()[...]) + list(h5["test"]["ids"].asstr()[...])
    files = [colours / i for i in ids]
    ref = predict(model, files, runtime="keras")
    got = predict(model, files, runtime="openvino", precision="f32")
    assert (ref.runtime, got.runtime, got.precision) == ("keras", "openvino", "f32")
    assert [x["class"] for x in got.rows] == [x["class"] for x in ref.rows]
    p = np.array([[x["probabilities"][c] for c in got.class_names] for x in got.rows])
    q = np.array([[x["probabilities"][c] for c in ref.class_names] for x in ref.rows])
    np.testing.assert_allclose(p, q, atol=1e-3)
    r = CliRunner().invoke(cli, ["predict", "--model", str(model), *map(str, files[:2]), "--runtime", "openvino",
                                 "--format", "json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["predictions"]) == 2


# ------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("wh, reduced", [((200, 160), (100, 80)), ((130, 300), (65, 150)), ((120, 100), None)])
def test_jpeg_reduced_size_decode_only_from_twice_the_target(tmp_path, wh, reduced):
    """JPEGs at least twice the target size on both sides are decoded at 1/2..1/8 scale (libjpeg DCT
    scaling), then resized as always; smaller ones are decoded in full.  Deterministic either way."""
    from PIL import Image

    from pipeline.data.images import decode_image, resize_image

    rng = np.random.default_rng(0)
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as img:
        img.draft("RGB", (64, 64))
        img.load()
        assert img.size == (reduced or wh)
        expected = resize_image(img.convert("RGB"), 64)
    got = decode_image(path, 64)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 64), got)


def test_mixed_precision_on_is_never_silently_dropped(caplog):
    """--mixed-precision on and --precision fp16 are the same request, Keras float16: auto honours both
    (on a CPU with a warning that it is slower there), openvino refuses both in one line."""
    from pipeline.core.errors import UsageError

    rt._said.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.stage1.runtime"):
        assert rt.resolve("auto", "auto", "on", **CPU) == ("keras", "fp16")
        assert rt.resolve("auto", "fp16", **CPU) == ("keras", "fp16")
        assert rt.resolve("keras", "fp16", **CPU) == ("keras", "fp16")
        assert rt.resolve("auto", "fp16", accelerator="gpu", **{k: v for k, v in CPU.items() if k != "accelerator"}) \
            == ("keras", "fp16")
    assert "slower than float32" in caplog.text
    for args in (("openvino", "auto", "on"), ("openvino", "fp16")):
        with pytest.raises(UsageError, match="is Keras float16; with --runtime openvino"):
            rt.resolve(*args, **CPU)


def test_the_runtime_is_said_once_with_its_reason(caplog):
    """One line says which runtime runs, and why when auto did not pick OpenVINO."""
    rt._said.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.stage1.runtime"):
        choice = rt.resolve_choice("auto", "auto", "on", **CPU)
        rt.say_runtime(choice.runtime, choice.precision, why=choice.why)
        choice = rt.resolve_choice("auto", "auto", **{**CPU, "openvino_ok": False})
        rt.say_runtime(choice.runtime, choice.precision, why=choice.why)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime:")]
    assert lines == ["runtime: keras fp16 (--mixed-precision on)", "runtime: keras f32 (openvino is not installed)"]


# ------------------------------------------------------------------------------------------- pipelining

def test_openvino_map_queues_the_next_batch_and_keeps_the_order(tmp_path):
    """``map`` starts batch i+1 before handing back batch i: same features, same order as one call
    per batch; a caller that stops early leaves the runtime usable."""
    ov_rt = rt.build_runtime("vgg16", "none", 32, runtime="openvino", precision="f32", batch_size=4,
                             cache_dir=tmp_path, streams=2)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (4, 4, 4, 4, 3)]
    one_by_one = [ov_rt(b) for b in batches]
    tol = 1e-5 * float(np.max(np.abs(one_by_one[0])))

    def same(a, b):
        return a.shape == b.shape and float(np.max(np.abs(a - b))) <= tol

    mapped = list(ov_rt.map(iter(batches)))
    assert len(mapped) == 5 and all(same(m, o) for m, o in zip(mapped, one_by_one))
    assert not same(one_by_one[0], one_by_one[1])  # distinct batches: an order mix-up would show
    early = ov_rt.map(iter(batches))
    assert same(next(early), one_by_one[0])
    early.close()  # batch 1 was already running
    assert same(ov_rt(batches[2]), one_by_one[2])


def test_writer_keeps_rows_in_order_with_a_lagging_runtime_and_all_skipped_batches(tmp_path):
    """The writer pairs each output of an asynchronous runtime (one batch behind) with its batch,
    including batches where every input was skipped (first, middle, last)."""
    from pipeline.stage1.sink import State, write_batches
    from pipeline.store.writer import FeaturesWriter

    class Lagging(rt.Runtime):
        def __call__(self, batch):
            return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

        def map(self, batches):  # yields batch i only after pulling batch i+1, as OpenVINO's does
            previous = None
            for batch in batches:
                if previous is not None:
                    yield self(previous)
                previous = batch
            if previous is not None:
                yield self(previous)

    def batch(split, index, values, skipped=()):
        arr = np.zeros((4, 2, 2, 3), dtype=np.uint8)
        for i, v in enumerate(values):
            arr[i] = v
        return split, index, arr, [f"{split}/{v}" for v in values], [v % 2 for v in values], \
            [(f"{split}/bad{s}", "not an image") for s in skipped]

    batches = [batch("train", 2, [], skipped=(0, 1)), batch("train", 6, [1, 2, 3, 4]), batch("train", 9, [5], (2, 3)),
               batch("train", 11, [], (4, 5)), batch("train", 15, [6, 7, 8, 9]), batch("val", 2, [], (0, 1)),
               batch("val", 5, [10, 11, 12]), batch("val", 7, [], (2, 3))]
    forward = Lagging(4, 2, 2, None)
    state = State(fingerprint="x", batch_size=4)
    seen = []
    with FeaturesWriter(tmp_path / "f.h5", "w") as writer:
        t_model, t_write, images = write_batches(
            writer, iter(batches), forward, state,
            lambda split, index, rows, n, s: seen.append((split, index, rows, n)))
        h5 = writer.h5
        got = {s: (h5[s]["features"][:, 0].tolist(), [i.decode() for i in h5[s]["ids"][:]]) for s in ("train", "val")}
    assert got["train"] == ([1, 2, 3, 4, 5, 6, 7, 8, 9], [f"train/{v}" for v in range(1, 10)])
    assert got["val"] == ([10, 11, 12], ["val/10", "val/11", "val/12"])
    assert seen == [("train", 2, 0, 2), ("train", 6, 4, 4), ("train", 9, 5, 3), ("train", 11, 5, 2),
                    ("train", 15, 9, 4), ("val", 2, 0, 2), ("val", 5, 3, 3), ("val", 7, 3, 2)]
    assert images == 22 and state.next_index == {"train": 15, "val": 7} and state.rows == {"train": 9, "val": 3}
    assert [s["id"] for s in state.skipped][:2] == ["train/bad0", "train/bad1"] and len(state.skipped) == 10


def test_decode_threads_share_and_priority_follow_the_runtime(monkeypatch, colours, tmp_path):
    """Keras on the CPU: a quarter of the cores, at nice 10 (TensorFlow's ops stall when a thread is
    preempted); OpenVINO (next batch queued) and an accelerator: every core, at normal priority.
    The run records what it used."""
    from pipeline.stage1 import reader as ex

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr(rt, "detect_accelerator", lambda: None)
    assert (ex.default_decode_threads("keras"), ex.decode_nice(None, "keras")) == (2, ex.DECODE_NICE_CPU)
    assert (ex.default_decode_threads("openvino"), ex.decode_nice(None, "openvino")) == (8, 0)
    assert ex.decode_nice(5, "openvino") == 5
    monkeypatch.setattr(rt, "detect_accelerator", lambda: "gpu")
    assert (ex.default_decode_threads("keras"), ex.decode_nice(None, "keras")) == (8, 0)
    monkeypatch.undo()
    out = extract(ExtractConfig(base="mobilenet_0.25", data=str(colours), weights="none", input_size=32,
                                batch_size=4, runtime="openvino", precision="f32", out=tmp_path / "f.h5",
                                progress=False))
    with h5py.File(out, "r") as h5:
        timing = json.loads(h5.attrs["timing"])
    assert timing["decode_nice"] == 0 and timing["decode_threads"] == ex.default_decode_threads("openvino")


def test_contradicting_precision_flags_and_fp16_for_predict_are_refused():
    from pipeline.core.errors import UsageError

    for precision in ("f32", "bf16"):
        with pytest.raises(UsageError, match=f"--precision {precision} contradicts --mixed-precision on"):
            rt.resolve("auto", precision, "on", **CPU)
    with pytest.raises(UsageError, match="fp16 is for extract"):
        rt.compile_keras_model(None, "auto", "fp16")


# ------------------------------------------------------------------------------- compiled-model cache

def _tiny_ov_model():
    import openvino.opset8 as ops

    x = ops.parameter([2, 8], np.float32)
    w = ops.constant(np.arange(64, dtype=np.float32).reshape(8, 8) / 64)
    return openvino.Model([ops.relu(ops.matmul(x, w, False, False))], [x])


def test_compiles_wait_for_each_other_on_one_cache(tmp_path):
    """OpenVINO's blob cache breaks when two processes write one blob (CI: Ray actors, 'cannot set
    permissions ... .blob'): compile_cpu holds a file lock on the cache folder while it compiles."""
    import threading

    from filelock import FileLock

    cache = tmp_path / "compiled"
    cache.mkdir()
    done = threading.Event()
    with FileLock(str(cache / ".compile.lock")):
        worker = threading.Thread(target=lambda: (rt.compile_cpu(_tiny_ov_model(), {}, cache), done.set()))
        worker.start()
        assert not done.wait(1.5), "compiled while another process held the cache"
    worker.join(60)
    assert done.is_set() and list(cache.glob("*.blob")), "no compiled blob in the cache"


def test_a_broken_cache_is_bypassed_with_a_warning(tmp_path, caplog):
    blocker = tmp_path / "compiled"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        compiled = rt.compile_cpu(_tiny_ov_model(), {}, blocker)
    out = compiled.create_infer_request().infer({0: np.ones((2, 8), np.float32)})
    assert np.asarray(list(out.values())[0]).shape == (2, 8)
    assert "compiling without it" in caplog.text


def test_error_reason_skips_openvinos_source_location():
    exc = RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\nfilesystem error: cannot set "
                       "permissions: No such file or directory [/c/1.blob]\n")
    assert rt.error_reason(exc).startswith("filesystem error: cannot set permissions")
    assert rt.error_reason(RuntimeError("")) == "RuntimeError"
    assert rt.error_reason(ValueError("one\ntwo")) == "one"
