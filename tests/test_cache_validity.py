"""Cache validity: fingerprints, strict loading, fusion checks, staleness, up-to-date runs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_same_datasets, make_folder, make_presplit, write_image
from pipeline.core.errors import FeaturesFileError
from pipeline.store.features import fuse, load_features, read_attrs, staleness

SETTINGS = dict(base="mobilenet_0.25", weights="none", input_size=32, batch_size=8, progress=False)


def _extract(**kw) -> Path:
    from pipeline.stage1.extract import ExtractConfig, extract

    return extract(ExtractConfig(**{**SETTINGS, **kw}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One reference extraction and one per changed input (same folder unless the data changes)."""
    import pipeline as ex
    from pipeline.nets.backbones import get_backbone

    tmp = tmp_path_factory.mktemp("cache")
    data = make_folder(tmp / "data", classes=("ant", "bee"), per_class=12)
    more = tmp / "data_more"
    shutil.copytree(data, more)
    write_image(more / "bee" / "bee_extra.png", 4242)
    resized = tmp / "data_resized"
    shutil.copytree(data, resized)
    write_image(resized / "ant" / "ant_0003.png", 300003, size=(33, 21))  # same name, other size
    wfile = tmp / "other.weights.h5"
    get_backbone("mobilenet_0.25").build(None, 32, "avg").save_weights(wfile)

    out = {}
    out["ref"] = _extract(data=str(data), out=tmp / "ref.h5")
    out["same"] = _extract(data=str(data), out=tmp / "same.h5", batch_size=5, decode_threads=1)
    out["data_added"] = _extract(data=str(more), out=tmp / "more.h5")
    out["data_resized"] = _extract(data=str(resized), out=tmp / "resized.h5")
    out["pooling"] = _extract(data=str(data), out=tmp / "max.h5", pooling="max")
    out["input_size"] = _extract(data=str(data), out=tmp / "s48.h5", input_size=48)
    out["split"] = _extract(data=str(data), out=tmp / "split.h5", split="70/20/10")
    out["base"] = _extract(data=str(data), out=tmp / "base.h5", base="mobilenet_0.5")
    out["weights"] = _extract(data=str(data), out=tmp / "w.h5", weights=str(wfile))
    version = ex.__version__
    ex.__version__ = "99.0.0"
    try:
        out["version"] = _extract(data=str(data), out=tmp / "v.h5")
    finally:
        ex.__version__ = version
    return {"data": data, "tmp": tmp, **out}


def test_fingerprint_records_what_produced_the_file(runs):
    attrs = read_attrs(runs["ref"])
    for key in ("base", "weights", "weights_sha256", "input_size", "pooling", "preprocessing",
                "data_source", "split_spec", "source_fingerprint", "tlpipe_version", "fingerprint"):
        assert key in attrs, key
    assert attrs["data_source"] == str(Path(runs["data"]).resolve())
    assert attrs["preprocessing"] == "keras.applications.mobilenet.preprocess_input"
    assert len(attrs["fingerprint"]) == 64


def test_fingerprint_changes_with_every_input_and_only_then(runs):
    fp = {k: read_attrs(v)["fingerprint"] for k, v in runs.items() if isinstance(v, Path) and v.suffix == ".h5"}
    # Same settings (other batch size / threads) -> same fingerprint and same features.
    assert fp["same"] == fp["ref"]
    assert_same_datasets(runs["ref"], runs["same"])
    changed = [k for k in fp if k not in ("ref", "same")]
    assert len(changed) == 8
    for k in changed:
        assert fp[k] != fp["ref"], f"fingerprint ignores a change of {k}"
    assert len({fp[k] for k in changed}) == len(changed)
    # The data-side fingerprint moves only with the data and the split.
    src = {k: read_attrs(runs[k])["source_fingerprint"] for k in fp}
    for k in ("data_added", "data_resized", "split"):
        assert src[k] != src["ref"], k
    for k in ("same", "pooling", "input_size", "base", "weights", "version"):
        assert src[k] == src["ref"], k
    w = read_attrs(runs["weights"])
    assert len(w["weights_sha256"]) == 64 and w["weights_sha256"] != read_attrs(runs["ref"])["weights_sha256"]
    assert read_attrs(runs["version"])["tlpipe_version"] == "99.0.0"


def test_extract_again_is_a_no_op_and_force_re_extracts(runs, caplog):
    out = runs["ref"]
    before = os.stat(out)
    attrs = read_attrs(out)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        again = _extract(data=str(runs["data"]), out=out)
    assert again == out
    assert "up to date" in caplog.text
    after = os.stat(out)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert read_attrs(out)["created"] == attrs["created"]

    copy = runs["tmp"] / "forced.h5"
    shutil.copy2(out, copy)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _extract(data=str(runs["data"]), out=copy, force=True)
    assert "up to date" not in caplog.text and "wrote" in caplog.text
    assert os.stat(copy).st_ino != os.stat(out).st_ino
    assert_same_datasets(out, copy)
    assert read_attrs(copy)["fingerprint"] == attrs["fingerprint"]


def test_changed_settings_never_silently_replace_the_output(runs, caplog):
    from pipeline.core.safety import OutputExists

    out = runs["tmp"] / "moving.h5"
    shutil.copy2(runs["ref"], out)
    before = out.read_bytes()
    with pytest.raises(OutputExists, match=r"input size 32 -> 48.*--force"):
        _extract(data=str(runs["data"]), out=out, input_size=48)
    assert out.read_bytes() == before
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _extract(data=str(runs["data"]), out=out, input_size=48, force=True)
    assert "up to date" not in caplog.text
    assert read_attrs(out)["fingerprint"] == read_attrs(runs["input_size"])["fingerprint"]
    assert read_attrs(out)["input_size"] == 48


# ----------------------------------------------------------------------------- strict loading


def _tampered(runs, tmp_path, change) -> Path:
    path = tmp_path / "bad.h5"
    shutil.copy2(runs["ref"], path)
    with h5py.File(path, "a") as h5:
        change(h5)
    return path


def _replace(h5, name, value):
    del h5[name]
    h5[name] = value


def _ds(h5, name):
    return h5[name][...]


def _empty_split(h5, name):
    import json

    for key in ("features", "labels", "ids"):
        h5[name][key].resize(0, axis=0)
    counts = json.loads(h5.attrs["counts"])
    counts[name] = 0
    h5.attrs["counts"] = json.dumps(counts)


TAMPERS = {
    "missing attribute": (lambda h5: h5.attrs.__delitem__("fingerprint"), "missing attributes: fingerprint"),
    "schema version": (lambda h5: h5.attrs.__setitem__("schema_version", 99), "schema version 99"),
    "class names not JSON": (lambda h5: h5.attrs.__setitem__("class_names", "ant,bee"), "bad class_names"),
    "one class": (lambda h5: h5.attrs.__setitem__("class_names", '["ant"]'), "bad class_names"),
    "feature size not a number": (lambda h5: h5.attrs.__setitem__("feature_size", "wide"), "not a valid tlpipe"),
    "wrong width": (lambda h5: _replace(h5, "train/features", np.zeros((len(_ds(h5, "train/labels")), 7),
                                                                          np.float32)), "expected \\[N, 256\\]"),
    "1-D features": (lambda h5: _replace(h5, "train/features", np.zeros(len(_ds(h5, "train/labels")),
                                                                        np.float32)), "has shape"),
    "float64 features": (lambda h5: _replace(h5, "val/features", _ds(h5, "val/features").astype(np.float64)),
                         "expected float32"),
    "NaN": (lambda h5: h5["train/features"].__setitem__((0, 0), np.nan), "NaN or infinity"),
    "infinity": (lambda h5: h5["val/features"].__setitem__((1, 3), np.inf), "NaN or infinity"),
    "label too big": (lambda h5: h5["train/labels"].__setitem__(0, 2), "labels outside 0..1"),
    "negative label": (lambda h5: h5["val/labels"].__setitem__(0, -1), "labels outside 0..1"),
    "float labels": (lambda h5: _replace(h5, "train/labels", _ds(h5, "train/labels").astype(np.float32)),
                     "expected integers"),
    "numeric ids": (lambda h5: _replace(h5, "train/ids", np.arange(len(_ds(h5, "train/labels")))),
                    "expected strings"),
    "missing ids": (lambda h5: h5.__delitem__("train/ids"), "has no 'ids' dataset"),
    "short labels": (lambda h5: _replace(h5, "train/labels", _ds(h5, "train/labels")[:-1]), "labels"),
    "counts disagree": (lambda h5: h5.attrs.__setitem__("counts", '{"train": 1, "val": 2, "test": 2}'),
                        "counts attribute"),
    "missing val split": (lambda h5: h5.__delitem__("val"), "has no 'val' rows"),
    "empty val split": (lambda h5: _empty_split(h5, "val"), "has no 'val' rows"),
}


def test_reference_file_loads(runs):
    fs = load_features(runs["ref"])
    assert fs.class_names == ["ant", "bee"]
    assert sum(len(s.y) for s in fs.splits.values()) == 24
    assert all(s.X.dtype == np.float32 and s.X.shape[1] == 256 for s in fs.splits.values())


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_load_features_refuses_malformed_files(runs, tmp_path, case):
    change, match = TAMPERS[case]
    path = _tampered(runs, tmp_path, change)
    with pytest.raises(FeaturesFileError, match=match) as info:
        load_features(path)
    assert str(path) in str(info.value)


def test_load_features_refuses_non_hdf5_and_missing_files(runs, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5 at all\n")
    with pytest.raises(FeaturesFileError, match="notes.h5 is not an HDF5 file; "):
        load_features(text)
    half = tmp_path / "half.h5"
    half.write_bytes(runs["ref"].read_bytes()[: runs["ref"].stat().st_size // 2])
    with pytest.raises(FeaturesFileError):
        load_features(half)
    with pytest.raises(FeaturesFileError, match="not found"):
        load_features(tmp_path / "absent.h5")
    with pytest.raises(FeaturesFileError):
        load_features(tmp_path)  # a folder


def test_test_split_is_optional_but_can_be_required(runs, tmp_path):
    path = _tampered(runs, tmp_path, lambda h5: h5.__delitem__("test"))
    h5attrs = read_attrs(path)
    assert "test" in h5attrs["counts"]  # counts for a missing split are not checked
    assert "test" not in load_features(path).splits
    with pytest.raises(FeaturesFileError, match="has no 'test' rows"):
        load_features(path, need=("train", "val", "test"))


# ----------------------------------------------------------------------------- fusion


def test_fuse_same_data_different_bases(runs):
    fused = fuse([load_features(runs["ref"]), load_features(runs["input_size"])])
    assert fused.attrs["feature_size"] == 512
    for name, split in fused.splits.items():
        assert split.X.shape == (len(load_features(runs["ref"]).splits[name].y), 512)


@pytest.mark.parametrize("other, what", [("data_added", "source fingerprint"),
                                         ("data_resized", "source fingerprint"),
                                         ("split", "source fingerprint")])
def test_fuse_refuses_other_data_or_split(runs, other, what):
    with pytest.raises(FeaturesFileError, match=f"cannot fuse .*different {what}"):
        fuse([load_features(runs["ref"]), load_features(runs[other])])


def test_fuse_refuses_other_classes(runs, tmp_path):
    path = _tampered(runs, tmp_path, lambda h5: h5.attrs.__setitem__("class_names", '["ant", "wasp"]'))
    with pytest.raises(FeaturesFileError, match="cannot fuse"):
        fuse([load_features(runs["ref"]), load_features(path)])


# ----------------------------------------------------------------------------- staleness


def test_staleness_follows_the_source_folder(tmp_path):
    data = make_folder(tmp_path / "data", classes=("ant", "bee"), per_class=6)
    out = _extract(data=str(data), out=tmp_path / "f.h5")
    assert staleness(out) == (False, "inputs unchanged")
    victim = data / "ant" / "ant_0002.png"
    backup = tmp_path / "backup.png"
    shutil.copy2(victim, backup)

    os.utime(victim, (1, 1))  # touching (or copying) a file does not make it stale
    assert staleness(out)[0] is False

    extra = write_image(data / "bee" / "bee_new.png", 777)  # added
    stale, why = staleness(out)
    assert stale and "changed since extraction" in why
    extra.unlink()
    assert staleness(out)[0] is False

    victim.unlink()  # removed
    assert staleness(out)[0] is True
    shutil.copy2(backup, victim)
    assert staleness(out)[0] is False

    write_image(victim, 2, size=(41, 29))  # re-saved at another size
    assert staleness(out)[0] is True
    shutil.copy2(backup, victim)
    assert staleness(out)[0] is False

    (data / "bee" / "bee_0001.png").rename(data / "ant" / "bee_0001.png")  # relabelled
    assert staleness(out)[0] is True
    (data / "ant" / "bee_0001.png").rename(data / "bee" / "bee_0001.png")
    assert staleness(out)[0] is False

    (data / "notes.txt").write_text("not an image")  # non-images are not inputs
    assert staleness(out)[0] is False

    shutil.rmtree(data)
    stale, why = staleness(out)
    assert stale and "cannot re-read" in why


def test_staleness_of_a_presplit_folder(tmp_path):
    data = make_presplit(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    out = _extract(data=str(data), out=tmp_path / "f.h5")
    assert read_attrs(out)["split_spec"] == "as-given"
    assert staleness(out)[0] is False
    write_image(data / "val" / "b" / "late.png", 5)
    assert staleness(out)[0] is True
