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
from pipeline.stage2.fit_head import FitConfig, fit_head, summary
from pipeline.heads.models import HeadParams, load_head

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


N = (2000, 1000, 1000)  # train, val, test rows of the shared synthetic file (24 features, 2 classes)
CHUNK = 500
PARAMS = dict(epochs=5, batch_size=64)  # dense: a few epochs reach ~95 % on these features


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("stream") / "synthetic.h5", n=N)


def _fit(path: Path, head: str, out: Path, **kw) -> dict:
    folder = fit_head(FitConfig(features=[str(path)], head=head, out=out, params=HeadParams(**PARAMS), **kw))
    return json.loads((folder / "evaluation.json").read_text())


def _ev(folder: Path) -> dict:
    return json.loads((folder / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def fitted(features, tmp_path_factory):
    """Each head fitted once in memory and once streamed (chunks of CHUNK rows), shared by the tests.

    The streamed fits run with every ``Rows.read`` recorded and the in-memory loader refused; the
    logistic ones go through the CLI: streamed because the in-memory estimate is above
    ``--max-memory 2KB``, in memory below ``--max-memory 1GiB``."""
    import pipeline.stage2.fit_head
    import pipeline.heads.stream as stream

    tmp = tmp_path_factory.mktemp("fitted")
    out: dict = {"reads": {}, "dir": tmp}
    runner = CliRunner()
    cli_base = ["fit-head", "--features", str(features), "--head", "logistic", "--chunk-rows", str(CHUNK)]
    r = runner.invoke(cli, [*cli_base, "--out", str(tmp / "logistic-mem"), "--max-memory", "1GiB"])
    assert r.exit_code == 0, r.output
    out["logistic", "mem"] = tmp / "logistic-mem"
    _fit(features, "dense", tmp / "dense-mem", stream=False)
    out["dense", "mem"] = tmp / "dense-mem"
    real = stream.Rows.read

    def refuse(*a, **k):
        raise AssertionError("the in-memory loader was used")

    for head in ("logistic", "dense"):
        reads: list[int] = []

        def spy(self, start, stop, reads=reads):
            reads.append(stop - start)
            return real(self, start, stop)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream.Rows, "read", spy)
            mp.setattr(pipeline.stage2.fit_head, "load_feature_sets", refuse)
            if head == "logistic":
                r = runner.invoke(cli, [*cli_base, "--out", str(tmp / "logistic-stream"), "--max-memory", "2KB"])
                assert r.exit_code == 0, r.output
            else:
                _fit(features, "dense", tmp / "dense-stream", stream=True, chunk_rows=CHUNK)
        out["reads"][head] = reads
        out[head, "stream"] = tmp / f"{head}-stream"
    return out


@pytest.mark.parametrize("head", ["logistic", "dense"])
def test_streamed_head_matches_in_memory(features, fitted, head):
    """Same features: the streamed head's val and test accuracy within 0.5 points of the in-memory head's;
    same folder schema; tuning on train only."""
    mem, out = _ev(fitted[head, "mem"]), fitted[head, "stream"]
    st = _ev(out)
    assert not mem["memory"]["streamed"] and st["memory"]["streamed"] and st["memory"]["chunk_rows"] == CHUNK
    for split in ("val", "test"):
        assert mem["splits"][split]["accuracy"] > 0.9
        assert abs(st["splits"][split]["accuracy"] - mem["splits"][split]["accuracy"]) <= 0.005, (split, mem, st)
    assert st["tuning"]["val_used_for_tuning"] is False
    assert st["tuning"]["param"] == ("C" if head == "logistic" else "epochs")
    for name in ("metrics.json", "history.csv", "grid.csv", "predictions.csv", "roc.csv", "model/head.json",
                 "figures/confusion.png"):
        assert (out / name).is_file(), name
    info = json.loads((out / "model" / "head.json").read_text())
    assert info["head"] == head and info["params"]["extra"] == {"stream": True, "chunk_rows": CHUNK}
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + N[1] + N[2]
    assert set(st["untrained"]) == {"val", "test"} and set(st["splits"]["test"]) >= {"confusion_matrix", "roc_auc"}
    # the saved head is the in-memory kind: load_head predicts on arrays
    with h5py.File(features, "r") as h5:
        X, y = h5["test/features"][...], h5["test/labels"][...]
    assert abs((load_head(out).predict_proba(X).argmax(1) == y).mean() - st["splits"]["test"]["accuracy"]) < 1e-9
    assert ("C=" if head == "logistic" else "best epoch") in summary(out)


def test_streamed_logistic_is_the_in_memory_model(fitted):
    """The streamed logistic head saves what the in-memory one saves: a StandardScaler + multinomial/binomial
    LogisticRegression from the same C grid, C chosen on train only, the optimiser's record in the tuning;
    its log loss is the in-memory head's (same objective), not an over-confident SGD's."""
    from sklearn.linear_model import LogisticRegression

    mem, st = load_head(fitted["logistic", "mem"]), load_head(fitted["logistic", "stream"])
    lr = st.model.steps[-1][1]
    assert type(lr) is LogisticRegression and lr.coef_.shape == mem.model.steps[-1][1].coef_.shape == (1, 24)
    assert list(lr.classes_) == [0, 1] and lr.C in HeadParams().c_grid
    ev_mem, ev = _ev(fitted["logistic", "mem"]), _ev(fitted["logistic", "stream"])
    opt = ev["tuning"]["optimizer"]
    assert opt["method"] == "L-BFGS-B" and opt["maxiter"] == 300 and opt["tol"] == 1e-4
    assert [f["C"] for f in opt["fits"]] == [*sorted(HeadParams().c_grid), lr.C]  # the grid, then the refit
    assert all(f["converged"] and f["iterations"] <= opt["maxiter"] for f in opt["fits"])
    assert opt["fits"][-1]["rows"] == N[0] and opt["fits"][0]["rows"] == N[0] - ev["tuning"]["tune_rows"]
    grid = (fitted["logistic", "stream"] / "grid.csv").read_text().splitlines()
    assert len(grid) == 1 + len(HeadParams().c_grid) and grid[1].startswith("C,")
    for split in ("val", "test"):
        assert abs(ev["splits"][split]["log_loss"] - ev_mem["splits"][split]["log_loss"]) < 0.01, split


@pytest.mark.parametrize("k,class_weight", [(3, None), (2, None), (4, "balanced")])
def test_streamed_logistic_minimises_sklearns_objective(tmp_path, monkeypatch, k, class_weight):
    """At a fixed C and a tight tolerance the streamed solution is scikit-learn's LogisticRegression(lbfgs) on
    the standardised rows: multinomial for 3+ classes, binomial (one coefficient vector) for 2, balanced
    class weights, several chunks."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    import pipeline.heads.stream as stream

    monkeypatch.setattr(stream, "LBFGS_TOL", 1e-9)
    monkeypatch.setattr(stream, "LBFGS_MAXITER", 2000)
    path = write_features(tmp_path / "f.h5", n=(600, 60, 60), k=k, dim=10, seed=k)
    with h5py.File(path, "r") as h5:
        X, y = h5["train/features"][...], h5["train/labels"][...]
    if class_weight:  # unbalanced classes
        keep = (y != k - 1) | (np.arange(len(y)) % 4 == 0)
        with h5py.File(path, "r+") as h5:
            y = np.where(keep, y, 0)
            h5["train/labels"][...] = y
    for C in (0.01, 1.0):
        params = HeadParams(c_grid=(C,), class_weight=class_weight)
        fit_head(FitConfig(features=[str(path)], head="logistic", out=tmp_path / f"h{C}", params=params,
                           stream=True, chunk_rows=128))
        got = load_head(tmp_path / f"h{C}").model.steps[-1][1]
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000, class_weight=class_weight).fit(
            StandardScaler().fit_transform(X.astype(np.float64)), y)
        assert got.coef_.shape == ref.coef_.shape == ((1 if k == 2 else k), 10)
        np.testing.assert_allclose(got.coef_, ref.coef_, atol=1e-5)
        np.testing.assert_allclose(got.intercept_, ref.intercept_, atol=1e-5)


def test_reader_never_holds_more_than_a_chunk(fitted):
    """Every features read of the streamed fits went through Rows.read, at most CHUNK rows at a time (the
    in-memory loader was refused); several passes over train."""
    for head in ("logistic", "dense"):
        reads = fitted["reads"][head]
        assert reads and max(reads) <= CHUNK, head
        assert sum(reads) >= 3 * N[0] + N[1] + N[2], head
    # the logistic head: one pass per L-BFGS evaluation (recorded), plus the statistics and scoring passes
    passes = _ev(fitted["logistic", "stream"])["tuning"]["optimizer"]["passes_over_train"]
    assert passes > 5 and sum(fitted["reads"]["logistic"]) >= passes * N[0]


def test_automatic_switch_above_max_memory(features, fitted, tmp_path):
    mem = _ev(fitted["logistic", "stream"])["memory"]
    assert mem["streamed"] and mem["max_memory_bytes"] == 2000 and "> --max-memory" in mem["why"]
    assert mem["in_memory_estimate_bytes"] == 3 * sum(N) * 24 * 4  # from the shapes: 3 x float32 features
    big = _ev(fitted["logistic", "mem"])["memory"]
    assert not big["streamed"] and "<= --max-memory" in big["why"]
    # a head that cannot stream, above the limit: one line, exit 2
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(features), "--head", "knn", "--out",
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
    from pipeline.heads.stream import parse_size

    assert parse_size("4GB") == 4 * 10 ** 9 and parse_size("1.5GiB") == int(1.5 * 2 ** 30)
    assert parse_size("512mb") == 512 * 10 ** 6 and parse_size("1000") == 1000


def test_stream_refuses_fused_features_in_one_line(features, tmp_path):
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(features), "--features", str(features),
                                 "--stream", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_virtual_dataset_input(features, fitted, tmp_path):
    """A file whose features are HDF5 virtual datasets over two files streams like the plain file."""
    vds = write_vds(tmp_path / "merged.h5", features, (tmp_path / "part0.h5", tmp_path / "part1.h5"))
    with h5py.File(vds, "r") as h5:
        assert h5["train/features"].is_virtual
    plain = _ev(fitted["logistic", "stream"])
    virtual = _fit(vds, "logistic", tmp_path / "virtual", stream=True, chunk_rows=CHUNK)
    assert virtual["splits"] == plain["splits"]
    assert virtual["tuning"] == plain["tuning"]


def test_nan_in_a_chunk_is_one_clear_error(tmp_path):
    from pipeline.core.errors import FeaturesFileError

    path = write_features(tmp_path / "nan.h5", n=(600, 200, 200))
    with h5py.File(path, "r+") as h5:
        h5["train/features"][450, 3] = np.nan
    with pytest.raises(FeaturesFileError, match="NaN"):
        _fit(path, "logistic", tmp_path / "h", stream=True, chunk_rows=100)


# Load every exported model in ONE fresh interpreter without tlpipe (one Keras import, not one per head).
LOAD_ALL = r"""
import sys
from tests_loader import LOADER
for fmt, path, inputs, out in zip(*[iter(sys.argv[1:])] * 4):
    sys.argv = ["-", fmt, path, inputs, out]
    exec(LOADER)
"""


def test_streamed_heads_export_without_tlpipe(tmp_path):
    """Three classes: each streamed head's exported .keras file loads with Keras alone (no tlpipe module)
    and gives the head's probabilities on the cached features; the logistic one is the in-memory head's
    single softmax layer."""
    import os
    import subprocess
    import sys

    from pipeline.stage1.extract import ExtractConfig, extract
    from tests.test_export_formats import COLOURS, LOADER, _export, _val_inputs
    from tests.test_export_predict import _colour_folder

    root = _colour_folder(tmp_path / "data", COLOURS, 12)
    cache = tmp_path / "cache"
    feats = extract(ExtractConfig(base="vgg16", data=str(root), weights="none", input_size=32, batch_size=8,
                                  cache_dir=cache, out=cache / "features" / "c.h5", progress=False))
    X, inputs = _val_inputs(root, [feats])
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **inputs)
    args, expected = [], {}
    for head in ("logistic", "dense"):
        folder = fit_head(FitConfig(features=[str(feats)], head=head, cache_dir=cache, out=tmp_path / head,
                                    stream=True, chunk_rows=7, params=HeadParams(epochs=3)))
        r = _export(folder, cache, tmp_path / f"{head}.keras")
        assert r.exit_code == 0, r.output
        expected[head] = load_head(folder).predict_proba(X)
        args += ["keras", str(tmp_path / f"{head}.keras"), str(npz), str(tmp_path / f"{head}.npy")]
    (tmp_path / "tests_loader.py").write_text(f"LOADER = {LOADER!r}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", LOAD_ALL, *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line) for line in r.stdout.strip().splitlines()[-2:]] == [{"pipeline_modules": []}] * 2
    for head in ("logistic", "dense"):
        got = np.load(tmp_path / f"{head}.npy")
        assert got.shape == expected[head].shape == (len(X), 3)
        np.testing.assert_allclose(got, expected[head], atol=1e-4)
    import keras

    model = keras.saving.load_model(tmp_path / "logistic.keras", compile=False)
    assert any(layer.name == "logistic" for layer in model.layers)  # one Dense + softmax, as in memory
    assert not any("ovr" in layer.name for layer in model.layers)
