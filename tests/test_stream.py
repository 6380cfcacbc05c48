"""Issue #11: heads on features larger than memory (fit-head --stream / --max-memory).

Synthetic features written straight to HDF5 (no images, no base), except the export test.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.fit_head import FitConfig, fit_head, summary
from pipeline.heads import HeadParams, load_head

ATTRS = {"schema_version": 1, "base": "vgg16", "weights": "none", "input_size": 32, "pooling": "avg",
         "source_fingerprint": "src", "data_source": "synthetic", "split_spec": "70/15/15", "preprocessing": "p",
         "skipped": "[]", "skipped_count": 0, "limit": 0}


def _rows(n: int, k: int, dim: int, seed: int):
    """Two overlapping Gaussian classes (a linear boundary, ~95% accuracy), shuffled labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(0, 1.0, (k, dim)) * 0.5
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    X = (centres[y] + rng.normal(0, 1.0, (n, dim)) + 3.0).astype(np.float32)
    return X, y


def write_features(path: Path, n=(4000, 1500, 1500), k=2, dim=24, seed=0) -> Path:
    """A valid features file with the attributes extract writes."""
    with h5py.File(path, "w") as h5:
        counts = {}
        for i, (split, m) in enumerate(zip(("train", "val", "test"), n)):
            X, y = _rows(m, k, dim, seed * 10 + i)
            g = h5.create_group(split)
            g.create_dataset("features", data=X, chunks=(min(m, 256), dim))
            g["labels"] = y
            g["ids"] = np.array([f"{split}/{j}" for j in range(m)], dtype=h5py.string_dtype())
            counts[split] = m
        h5.attrs.update({**ATTRS, "feature_size": dim, "class_names": json.dumps(list("abcdef")[:k]),
                         "num_classes": k, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": f"fp{seed}"})
    return path


def write_vds(path: Path, source: Path, parts: tuple[Path, Path]) -> Path:
    """The same features as ``source``, as virtual datasets over two files holding halves of each split
    (what 'tlpipe merge' writes over shards)."""
    with h5py.File(source, "r") as src:
        for half, part in enumerate(parts):
            with h5py.File(part, "w") as h5:
                for split in ("train", "val", "test"):
                    n = src[split]["features"].shape[0]
                    lo, hi = (0, n // 2) if half == 0 else (n // 2, n)
                    h5[f"{split}/features"] = src[split]["features"][lo:hi]
        with h5py.File(path, "w") as h5:
            for split in ("train", "val", "test"):
                n, dim = src[split]["features"].shape
                layout = h5py.VirtualLayout(shape=(n, dim), dtype="float32")
                cut = n // 2
                layout[:cut] = h5py.VirtualSource(str(parts[0]), f"{split}/features", shape=(cut, dim))
                layout[cut:] = h5py.VirtualSource(str(parts[1]), f"{split}/features", shape=(n - cut, dim))
                h5.create_virtual_dataset(f"{split}/features", layout)
                h5[f"{split}/labels"] = src[split]["labels"][...]
                h5[f"{split}/ids"] = src[split]["ids"][...]
            h5.attrs.update(dict(src.attrs))
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("stream") / "synthetic.h5")


def _fit(path: Path, head: str, out: Path, **kw) -> dict:
    folder = fit_head(FitConfig(features=[str(path)], head=head, out=out, params=HeadParams(epochs=15), **kw))
    return json.loads((folder / "evaluation.json").read_text())


@pytest.mark.parametrize("head", ["logistic", "dense"])
def test_streamed_head_matches_in_memory(features, tmp_path, head):
    """Same features: the streamed head's val and test accuracy within 0.5 points of the in-memory head's;
    same folder schema; tuning on train only."""
    mem = _fit(features, head, tmp_path / "mem", stream=False)
    out = tmp_path / "stream"
    st = _fit(features, head, out, stream=True, chunk_rows=500)
    assert not mem["memory"]["streamed"] and st["memory"]["streamed"] and st["memory"]["chunk_rows"] == 500
    for split in ("val", "test"):
        assert mem["splits"][split]["accuracy"] > 0.9
        assert abs(st["splits"][split]["accuracy"] - mem["splits"][split]["accuracy"]) <= 0.005, (split, mem, st)
    assert st["tuning"]["val_used_for_tuning"] is False
    assert st["tuning"]["param"] == ("alpha" if head == "logistic" else "epochs")
    for name in ("metrics.json", "history.csv", "grid.csv", "predictions.csv", "roc.csv", "model/head.json",
                 "figures/confusion.png"):
        assert (out / name).is_file(), name
    info = json.loads((out / "model" / "head.json").read_text())
    assert info["head"] == head and info["params"]["extra"] == {"stream": True, "chunk_rows": 500}
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + 3000
    assert set(st["untrained"]) == {"val", "test"} and set(st["splits"]["test"]) >= {"confusion_matrix", "roc_auc"}
    # the saved head is the in-memory kind: load_head predicts on arrays
    with h5py.File(features, "r") as h5:
        X, y = h5["test/features"][...], h5["test/labels"][...]
    assert abs((load_head(out).predict_proba(X).argmax(1) == y).mean() - st["splits"]["test"]["accuracy"]) < 1e-9
    assert ("alpha=" if head == "logistic" else "best epoch") in summary(out)


def test_reader_never_holds_more_than_a_chunk(tmp_path, monkeypatch):
    """Every features read goes through Rows.read, at most chunk_rows rows at a time; the in-memory loader
    is never called."""
    import pipeline.fit_head
    import pipeline.stream as stream

    reads: list[int] = []
    real = stream.Rows.read

    def spy(self, start, stop):
        reads.append(stop - start)
        return real(self, start, stop)

    def refuse(*a, **k):
        raise AssertionError("the in-memory loader was used")

    features = write_features(tmp_path / "small.h5", n=(1500, 500, 500))
    monkeypatch.setattr(stream.Rows, "read", spy)
    monkeypatch.setattr(pipeline.fit_head, "load_feature_sets", refuse)
    for head in ("logistic", "dense"):
        reads.clear()
        _fit(features, head, tmp_path / head, stream=True, chunk_rows=300)
        assert reads and max(reads) <= 300, head
        assert sum(reads) >= 3 * 2500  # several passes over the rows of every split


def test_automatic_switch_above_max_memory(features, tmp_path):
    runner = CliRunner()
    base = ["fit-head", "--features", str(features), "--head", "logistic", "--chunk-rows", "1000"]
    r = runner.invoke(cli, [*base, "--out", str(tmp_path / "small"), "--max-memory", "2KB"])
    assert r.exit_code == 0, r.output
    mem = json.loads((tmp_path / "small" / "evaluation.json").read_text())["memory"]
    assert mem["streamed"] and mem["max_memory_bytes"] == 2000 and "> --max-memory" in mem["why"]
    assert mem["in_memory_estimate_bytes"] == 3 * 7000 * 24 * 4  # from the shapes: 3 x float32 features
    r = runner.invoke(cli, [*base, "--out", str(tmp_path / "big"), "--max-memory", "1GiB"])
    assert r.exit_code == 0, r.output
    assert not json.loads((tmp_path / "big" / "evaluation.json").read_text())["memory"]["streamed"]
    # a head that cannot stream, above the limit: one line, exit 2
    r = runner.invoke(cli, ["fit-head", "--features", str(features), "--head", "knn", "--out",
                            str(tmp_path / "knn"), "--max-memory", "2KB"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "only the logistic and dense heads stream" in r.output


@pytest.mark.parametrize("value", ["lots", "0", "-4GB", "4XB", ""])
def test_bad_max_memory_is_one_line(features, tmp_path, value):
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(features), "--out", str(tmp_path / "h"),
                                 "--max-memory", value])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "--max-memory" in r.output, r.output
    assert not (tmp_path / "h").exists()


def test_parse_size():
    from pipeline.stream import parse_size

    assert parse_size("4GB") == 4 * 10 ** 9 and parse_size("1.5GiB") == int(1.5 * 2 ** 30)
    assert parse_size("512mb") == 512 * 10 ** 6 and parse_size("1000") == 1000


def test_stream_refuses_fused_features_in_one_line(features, tmp_path):
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(features), "--features", str(features),
                                 "--stream", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_virtual_dataset_input(features, tmp_path):
    """A file whose features are HDF5 virtual datasets over two files streams like the plain file."""
    vds = write_vds(tmp_path / "merged.h5", features, (tmp_path / "part0.h5", tmp_path / "part1.h5"))
    with h5py.File(vds, "r") as h5:
        assert h5["train/features"].is_virtual
    plain = _fit(features, "logistic", tmp_path / "plain", stream=True, chunk_rows=700)
    virtual = _fit(vds, "logistic", tmp_path / "virtual", stream=True, chunk_rows=700)
    assert virtual["splits"] == plain["splits"]
    assert virtual["tuning"] == plain["tuning"]


def test_nan_in_a_chunk_is_one_clear_error(tmp_path):
    from pipeline.errors import FeaturesFileError

    path = write_features(tmp_path / "nan.h5", n=(600, 200, 200))
    with h5py.File(path, "r+") as h5:
        h5["train/features"][450, 3] = np.nan
    with pytest.raises(FeaturesFileError, match="NaN"):
        _fit(path, "logistic", tmp_path / "h", stream=True, chunk_rows=100)


@pytest.mark.parametrize("head", ["logistic", "dense"])
def test_streamed_head_exports_without_tlpipe(tmp_path, head):
    """Three classes (the SGD head is one-vs-rest): the exported .keras file loads with Keras alone and
    gives the head's probabilities on the cached features."""
    from pipeline.extract import ExtractConfig, extract
    from tests.test_export_formats import COLOURS, _export, _val_inputs, run_without_tlpipe
    from tests.test_export_predict import _colour_folder

    root = _colour_folder(tmp_path / "data", COLOURS, 12)
    cache = tmp_path / "cache"
    feats = extract(ExtractConfig(base="vgg16", data=str(root), weights="none", input_size=32, batch_size=8,
                                  cache_dir=cache, out=cache / "features" / "c.h5", progress=False))
    folder = fit_head(FitConfig(features=[str(feats)], head=head, cache_dir=cache, out=tmp_path / "head",
                                stream=True, chunk_rows=7, params=HeadParams(epochs=10)))
    out = tmp_path / "m.keras"
    r = _export(folder, cache, out)
    assert r.exit_code == 0, r.output
    X, inputs = _val_inputs(root, [feats])
    got = run_without_tlpipe("keras", out, inputs, tmp_path)
    expected = load_head(folder).predict_proba(X)
    assert got.shape == expected.shape == (len(X), 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
