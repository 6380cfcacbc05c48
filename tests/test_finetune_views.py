"""fine-tune --views K on tiny synthetic data (mobilenet_0.25, random weights, 32 px)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.stage3.finetune import fine_tune
from tests.test_finetune import _cfg, _history, heads  # noqa: F401 - the module-scoped fixture


def _views_file(out: Path) -> Path:
    files = list((out.parent / f".{out.name}.views").glob("views-*.h5"))
    assert len(files) == 1, files
    return files[0]


def _items(heads):
    from pipeline.data.sources import open_source
    from pipeline.store.features import load_features, read_attrs
    from pipeline.stage3.finetune import split_rows

    attrs = read_attrs(heads["features"])
    source = open_source(str(attrs["data_source"]), str(attrs["split_spec"]))
    items, rows, _, _ = split_rows(load_features(heads["features"]), source)
    return items, rows


def _images(items, rows) -> np.ndarray:
    from pipeline.data.sources import decode_item

    return np.stack([decode_item(items[i], 32) for i in rows])


def test_views_model_same_contract_as_end_to_end(heads, tmp_path):  # noqa: F811
    import keras

    plain = fine_tune(_cfg(heads, out=tmp_path / "plain", epochs=1))
    out = fine_tune(_cfg(heads, out=tmp_path / "views", epochs=1, views=3))
    ev = json.loads((out / "evaluation.json").read_text())
    f = ev["fine_tune"]
    head_ev = json.loads((heads["dense"] / "evaluation.json").read_text())
    assert f["views"] == 3 and f["views_cache"]["reused"] is False
    assert abs(f["epoch0_val_accuracy"] - head_ev["splits"]["val"]["accuracy"]) <= 0.005  # epoch 0 = the head
    assert f["views_cache"]["check_max_abs_diff"] < 1e-4  # model.keras on images == its top on the cache
    assert [int(r["epoch"]) for r in _history(out)] == [0, 1]
    for name in ("model.keras", "metrics.json", "predictions.csv", "roc.csv", "grid.csv", "figures/curves.png"):
        assert (out / name).is_file(), name
    assert not (out / ".checkpoint").exists()
    # the same contract as the end-to-end model: uint8 images of any size in, probabilities out
    a, b = keras.saving.load_model(plain / "model.keras"), keras.saving.load_model(out / "model.keras")
    assert a.input_shape == b.input_shape and a.output_shape == b.output_shape
    assert sorted(type(layer).__name__ for layer in a.layers) == sorted(type(layer).__name__ for layer in b.layers)
    assert a.count_params() == b.count_params()
    # and loads without tlpipe, scoring each val image as predictions.csv says
    from tests.test_export_formats import run_without_tlpipe

    items, rows = _items(heads)
    with open(out / "predictions.csv") as fh:
        preds = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    batch = _images(items, rows["val"])
    assert len(preds) == len(batch) > 0
    got = run_without_tlpipe("keras", out / "model.keras", {"image": batch}, tmp_path)
    np.testing.assert_allclose(got.max(1), [float(r["probability"]) for r in preds], atol=1e-4)


def test_views_cache_reused_on_resume_and_rerun(heads, tmp_path):  # noqa: F811
    out = tmp_path / "ft"

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(_cfg(heads, out=out, epochs=2, patience=5, views=2, after_epoch=stop))
    cache = _views_file(out)
    mtime = cache.stat().st_mtime_ns
    fine_tune(_cfg(heads, out=out, epochs=2, patience=5, views=2))  # resumes at epoch 2, reuses the views
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]
    assert f["epochs_run"] == 2 and [int(r["epoch"]) for r in _history(out)] == [0, 1, 2]
    assert f["views_cache"]["reused"] is True and f["views_cache"]["bottom_images_run"] == 0
    # another learning rate: the same views
    fine_tune(_cfg(heads, out=out, epochs=1, views=2, lr=3e-5, force=True))
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]
    assert f["views_cache"]["reused"] is True and _views_file(out).stat().st_mtime_ns == mtime
    # other views: built again, and the old file goes (one per output folder)
    fine_tune(_cfg(heads, out=out, epochs=1, views=3, force=True))
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]
    assert f["views_cache"]["reused"] is False and f["views_cache"]["bottom_images_run"] > 0
    assert _views_file(out) != cache and not cache.exists()


@pytest.mark.parametrize("k", ["0", "-2"])
def test_views_below_one_is_one_line_exit_2(heads, k):  # noqa: F811
    r = CliRunner().invoke(cli, ["fine-tune", "--head", str(heads["dense"]), "--cache-dir", str(heads["cache"]),
                                 "--views", k])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and f"--views {k}" in r.output


def test_val_and_test_views_never_augmented(heads, tmp_path, monkeypatch):  # noqa: F811
    """--unfreeze all cuts at the base's input: the cache holds the preprocessed images themselves, so
    val/test (and every clean row) must be exactly the un-augmented images, and the train views not."""
    from pipeline.training import views as views_mod

    monkeypatch.setattr(views_mod, "MEMORY_BYTES", 0)  # read batches from the file, not from memory
    out = fine_tune(_cfg(heads, out=tmp_path / "ft", epochs=1, views=3, unfreeze="all",
                         augment="flip,rotate=0.3,zoom=0.3,shift=0.2,contrast=0.3"))
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]
    assert f["views_cache"]["in_memory"] is False and f["views_cache"]["shapes"] == [[32, 32, 3]]
    assert f["views_cache"]["check_max_abs_diff"] < 1e-4
    items, rows = _items(heads)
    with h5py.File(_views_file(out)) as h5:
        clean, views = h5["clean_0"][...], h5["views_0"][...]
    for split in ("train", "val", "test"):  # mobilenet preprocessing: x / 127.5 - 1
        np.testing.assert_allclose(clean[rows[split]], _images(items, rows[split]) / 127.5 - 1, atol=1e-6)
    assert views.shape[1] == 2 and 0 < views.shape[0] < len(rows["train"])  # K - 1 views of the fit rows only
    train_clean = clean[rows["train"]]
    for v in views.reshape(-1, *views.shape[2:]):  # every augmented view differs from every clean image
        assert np.abs(train_clean - v.astype("float32")).mean(axis=(1, 2, 3)).min() > 0.01


def test_killed_views_build_continues_to_the_same_file(heads, tmp_path, monkeypatch):  # noqa: F811
    """A build killed in the middle continues from its last chunk; each chunk's views are seeded by
    (seed, view, chunk), so the finished file equals an uninterrupted build's."""
    from pipeline.training import views as views_mod

    real, calls = views_mod._aug_model, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second chunk of the fit rows
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(views_mod, "_aug_model", dying)
    out = tmp_path / "ft"
    with pytest.raises(KeyboardInterrupt):
        fine_tune(_cfg(heads, out=out, epochs=1, views=2))
    part = next((out.parent / ".ft.views").glob("views-*.h5.part"))
    with h5py.File(part) as h5:
        assert h5.attrs["views_done"] == 8 and h5.attrs["clean_done"] == len(h5["clean_0"])
    monkeypatch.setattr(views_mod, "_aug_model", real)
    fine_tune(_cfg(heads, out=out, epochs=1, views=2))
    f = json.loads((out / "evaluation.json").read_text())["fine_tune"]["views_cache"]
    n_fit = f["bottom_images_run"]  # only the fit rows left after the first chunk ran again
    fine_tune(_cfg(heads, out=tmp_path / "fresh", epochs=1, views=2))
    g = json.loads((tmp_path / "fresh" / "evaluation.json").read_text())["fine_tune"]["views_cache"]
    with h5py.File(_views_file(out)) as a, h5py.File(_views_file(tmp_path / "fresh")) as b:
        assert n_fit == len(a["views_0"]) - 8 < g["bottom_images_run"]
        np.testing.assert_array_equal(a["views_0"][...], b["views_0"][...])
        np.testing.assert_array_equal(a["clean_0"][...], b["clean_0"][...])
