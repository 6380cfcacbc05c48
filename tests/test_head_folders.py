"""Head folders: every setting that changes a fit guards the folder (--layers, --seed, --class-weight,
streaming, the fused files' order), and the features paths a head records are found from any folder.

Synthetic features written straight to HDF5 (no images, no base).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.core.errors import FeaturesNotFound
from pipeline.store.features import head_status, locate_head_features

DEPTHS = {"conv_pw_12": 5, "conv_pw_13": 3}


def write_features(path: Path, fingerprint: str, depths: dict[str, int] | None = None, dim: int = 6,
                   base: str = "mobilenet_0.25") -> Path:
    """A valid features file of two classes (train 40, val 16, test 16 rows), with pooled ``depths``
    (extract --layers NAME,NAME) when given."""
    dim = sum(depths.values()) if depths else dim
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (2, dim))
    with h5py.File(path, "w") as h5:
        counts = {}
        for split, n in (("train", 40), ("val", 16), ("test", 16)):
            y = np.arange(n) % 2
            g = h5.create_group(split)
            g["features"] = (centres[y] + rng.normal(0, 1.0, (n, dim))).astype(np.float32)
            g["labels"] = y.astype(np.int64)
            g["ids"] = np.array([f"{split}/{i}" for i in range(n)], dtype=h5py.string_dtype())
            counts[split] = n
        h5.attrs.update({"schema_version": 1, "base": base, "weights": "none", "input_size": 32,
                         "pooling": "avg", "feature_size": dim, "class_names": json.dumps(["cat", "dog"]),
                         "num_classes": 2, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": fingerprint, "source_fingerprint": "src", "data_source": "synthetic",
                         "split_spec": "55/22/23", "preprocessing": "p", "skipped": "[]", "skipped_count": 0,
                         "limit": 0})
        if depths:
            h5.attrs["depths"] = json.dumps(list(depths))
            h5.attrs["depth_dims"] = json.dumps(list(depths.values()))
    return path


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refusal(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.startswith("tlpipe: error: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--force" in lines[0] and "--out" in lines[0]
    return lines[0]


def test_a_refit_with_other_layers_is_refused_until_forced(tmp_path):
    """The issue's case: a head on every stored depth, then --layers conv_pw_13 into the same folder."""
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    write_features(cache / "features" / "s224.h5", "fp-s224", DEPTHS)
    fit = ["fit-head", "--features", "s224.h5", "--head", "logistic", "--cache-dir", str(cache)]
    head = cache / "heads" / "s224-logistic"
    assert _run(*fit).exit_code == 0
    before = _digest(head)

    line = _refusal(_run(*fit, "--layers", "conv_pw_13"))
    assert "layers all -> conv_pw_13" in line
    assert _digest(head) == before  # the first head is still there

    assert _run(*fit, "--layers", "conv_pw_13", "--force").exit_code == 0
    assert json.loads((head / "model" / "head.json").read_text())["layers"] == "conv_pw_13"
    assert _run(*fit, "--layers", "conv_pw_13").exit_code == 0  # the same layers again: a refit
    line = _refusal(_run(*fit, "--layers", "conv_pw_12,conv_pw_13"))
    assert "layers conv_pw_13 -> conv_pw_12,conv_pw_13" in line
    line = _refusal(_run(*fit))
    assert "layers conv_pw_13 -> all" in line


@pytest.mark.parametrize("option, said", [
    (["--seed", "3"], "seed 0 -> 3"),
    (["--class-weight", "balanced"], "class_weight none -> balanced"),
    (["--stream"], "stream off -> on"),
])
def test_every_parameter_that_changes_the_fit_is_compared(tmp_path, option, said):
    feats = write_features(tmp_path / "f.h5", "fp-f")
    head = tmp_path / "h"
    fit = ["fit-head", "--features", str(feats), "--head", "logistic", "--out", str(head)]
    assert _run(*fit).exit_code == 0
    before = _digest(head)
    assert said in _refusal(_run(*fit, *option))
    assert _digest(head) == before


def test_fused_files_in_another_order_are_refused(tmp_path):
    a, b = write_features(tmp_path / "a.h5", "fp-a"), write_features(tmp_path / "b.h5", "fp-b", dim=4, base="mobilenet_0.5")
    head = tmp_path / "h"
    fit = ["fit-head", "--head", "logistic", "--out", str(head)]
    assert _run(*fit, "--features", str(a), "--features", str(b)).exit_code == 0
    before = _digest(head)
    line = _refusal(_run(*fit, "--features", str(b), "--features", str(a)))
    assert "the same features files in another order: a.h5, b.h5 -> b.h5, a.h5)" in line
    line = _refusal(_run(*fit, "--features", str(a)))
    assert "fitted on other features (a.h5, b.h5 -> a.h5" in line
    assert _digest(head) == before


def test_heads_record_absolute_paths_found_from_another_folder(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "cache" / "features").mkdir(parents=True)
    elsewhere.mkdir()
    write_features(project / "trash224.h5", "fp-t")
    monkeypatch.chdir(project)
    assert _run("fit-head", "--features", "trash224.h5", "--head", "logistic").exit_code == 0
    head = project / "cache" / "heads" / "trash224-logistic"
    meta = json.loads((head / "model" / "head.json").read_text())
    assert meta["features"] == [str(project / "trash224.h5")]
    assert json.loads((head / "evaluation.json").read_text())["features"] == meta["features"]

    monkeypatch.chdir(elsewhere)
    assert head_status(head)[:2] == ("ok", "features unchanged since the fit")
    info = _run("info", str(head))
    assert info.exit_code == 0 and ["status", "ok"] in [line.split() for line in info.output.splitlines()], \
        info.output


@pytest.mark.parametrize("recorded, where", [
    ("trash224.h5", "trash224.h5"),  # --features trash224.h5, a file in the folder fit-head ran in
    ("cache/features/trash224.h5", "cache/features/trash224.h5"),  # a bare name found in --cache-dir
    ("cache/dvc/features/trash224.h5", "cache/dvc/features/trash224.h5"),  # the DVC pipeline's heads
])
def test_old_relative_paths_are_found_from_another_folder(tmp_path, monkeypatch, recorded, where):
    """Heads fitted before paths were absolute: relative to the folder fit-head ran in (``project``)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    feats = project / where
    feats.parent.mkdir(parents=True)
    write_features(feats, "fp-t")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    heads = "cache/dvc/heads" if "dvc" in where else "cache/heads"
    head = project / heads / "trash224-auto"
    assert _run("fit-head", "--features", where, "--head", "logistic", "--out", str(head)).exit_code == 0
    meta_path = head / "model" / "head.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "features": [recorded]}))  # as an older tlpipe wrote it

    monkeypatch.chdir(elsewhere)
    assert locate_head_features(recorded, head) == feats
    assert locate_head_features(recorded, Path("..") / head.relative_to(tmp_path)) == feats  # a relative --head
    assert head_status(head)[0] == "ok"
    info = _run("info", str(head))
    assert info.exit_code == 0 and "MISSING" not in info.output, info.output


def test_a_missing_features_file_names_where_it_was_looked_for(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    head = project / "cache" / "heads" / "gone-logistic"
    (head / "model").mkdir(parents=True)
    (head / "model" / "head.json").write_text(json.dumps({"head": "logistic", "features": ["gone.h5"],
                                                          "fingerprints": ["fp"]}))
    (head / "evaluation.json").write_text(json.dumps({"head": "logistic", "features": ["gone.h5"]}))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FeaturesNotFound) as err:
        locate_head_features("gone.h5", head)
    message = str(err.value)
    assert "\n" not in message and message.startswith("features file not found: gone.h5 (looked at ")
    for place in (elsewhere / "gone.h5", elsewhere / "cache" / "features" / "gone.h5", project / "gone.h5",
                  project / "cache" / "features" / "gone.h5"):
        assert str(place) in message
    status, why, _ = head_status(head)
    assert status == "features missing" and why == message
    assert "FEATURES MISSING: " + message in _run("info", str(head)).output
