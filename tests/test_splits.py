"""Folder splits that stay put: each file is placed by its own sha1 bucket (pipeline.data.sources)."""

from __future__ import annotations

import json
from collections import Counter

import h5py
import numpy as np
from click.testing import CliRunner
from conftest import make_folder, write_image

from pipeline.cli import cli
from pipeline.data.sources import (
    OLD_SPLIT_RULE,
    SPLIT_RULE,
    assign_class,
    bucket_split,
    old_split_rule,
    open_source,
    split_bucket,
)


def _placement(source) -> dict[str, str]:
    return {it.id: split for split in source.splits for it in source.iter_items(split)}


def test_adding_or_removing_files_moves_no_other_file(tmp_path):
    root = make_folder(tmp_path / "d", classes=("cat", "dog", "eel"), per_class=40)
    before = _placement(open_source(str(root), "70/15/15"))
    assert set(before.values()) == {"train", "val", "test"}
    for c in ("cat", "dog"):  # more photos in two classes, and a new class
        for i in range(40, 95):
            write_image(root / c / f"{c}_{i:04d}.png", 7_000 + i)
    make_folder(root, classes=("fox",), per_class=12, seed=3)
    after = _placement(open_source(str(root), "70/15/15"))
    assert len(after) == 3 * 40 + 2 * 55 + 12
    moved = {i: (s, after[i]) for i, s in before.items() if after[i] != s}
    assert not moved
    gone = [i for i, s in sorted(after.items()) if s != "val"][::3]  # and removing some (a class's
    for i in gone:  # last val image would let another stand in for it: see the next test)
        (root / i).unlink()
    fewer = _placement(open_source(str(root), "70/15/15"))
    assert len(fewer) == len(after) - len(gone)
    assert all(fewer[i] == s for i, s in after.items() if i in fewer)


def test_bucket_rule_and_fractions():
    assert bucket_split(0, (80, 10, 10)) == "train" and bucket_split(7999, (80, 10, 10)) == "train"
    assert bucket_split(8000, (80, 10, 10)) == "val" and bucket_split(8999, (80, 10, 10)) == "val"
    assert bucket_split(9000, (80, 10, 10)) == "test" and bucket_split(9999, (80, 20, 0)) == "val"
    assert split_bucket("cat/cat_0001.png") == split_bucket("cat/cat_0001.png") < 10_000
    n = 20_000
    counts = Counter(assign_class([f"c/{i}.jpg" for i in range(n)], (70, 15, 15)))
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[split] - n * share) < 4 * sd, (split, counts)  # binomial, not exact


def test_small_classes_keep_a_train_and_a_val_image():
    assert assign_class(["a/only.png"], (80, 10, 10)) == ["train"]
    for k in range(2, 6):
        for start in range(0, 200, 7):
            got = assign_class([f"a/{start + i}.png" for i in range(k)], (80, 10, 10))
            assert "train" in got and "val" in got, got


def _old_features(path, data_source, sizes=(("train", 8), ("val", 4))):
    """A features file from before the split rule attribute (made with the ranked split)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        counts = {}
        for split, n in sizes:
            g = h5.create_group(split)
            g["features"] = rng.normal(0, 1, (n, 4)).astype(np.float32)
            g["labels"] = (np.arange(n) % 2).astype(np.int64)
            g["ids"] = np.array([f"{split}/{i}" for i in range(n)], dtype=h5py.string_dtype())
            counts[split] = n
        h5.attrs.update({"schema_version": 1, "base": "vgg16", "weights": "none", "input_size": 32,
                         "pooling": "avg", "feature_size": 4, "class_names": json.dumps(["cat", "dog"]),
                         "num_classes": 2, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": "x", "source_fingerprint": "y", "data_source": str(data_source),
                         "data_kind": "folder", "split_spec": "80/10/10", "preprocessing": "p",
                         "skipped": "[]", "skipped_count": 0})
    return path


def test_caches_of_the_old_split_rule_are_stale_with_a_clear_message(tmp_path):
    root = make_folder(tmp_path / "d", per_class=6)
    assert open_source(str(root)).split_rule == SPLIT_RULE
    assert open_source(str(root)).manifest()["split_rule"] == SPLIT_RULE
    old = _old_features(tmp_path / "old.h5", root)
    assert OLD_SPLIT_RULE in old_split_rule({"data_kind": "folder", "split_spec": "80/10/10"})
    assert old_split_rule({"data_kind": "folder", "split_spec": "as-given"}) == ""
    assert old_split_rule({"data_kind": "tfds", "split_spec": "80/10/10"}) == ""
    assert old_split_rule({"split_rule": SPLIT_RULE, "split_spec": "80/10/10"}) == ""
    r = CliRunner().invoke(cli, ["info", str(old)])
    assert r.exit_code == 0, r.output
    assert "STALE: made with the old split rule" in r.output and "re-extract" in r.output
    r = CliRunner().invoke(cli, ["-q", "extract", "--base", "vgg16", "--weights", "none", "--input-size", "32",
                                 "--data", str(root), "--out", str(old), "--no-progress"])
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output and last.startswith("tlpipe: error:"), r.output
    assert "made with the old split rule" in last and "re-extract" in last and "--force" in last


def test_an_empty_split_is_absent_not_scored(tmp_path):
    """Small folders can now have no test image (the buckets decide): an empty test group (e.g. from
    merged shards) is left out instead of failing the fit."""
    from pipeline.stage2.fit_head import FitConfig, fit_head
    from pipeline.store.features import load_features

    path = _old_features(tmp_path / "f.h5", tmp_path, (("train", 40), ("val", 10), ("test", 0)))
    with h5py.File(path, "a") as h5:
        h5.attrs["split_rule"] = SPLIT_RULE
        h5.attrs["data_kind"] = "synthetic"
    assert set(load_features(path).splits) == {"train", "val"}
    out = fit_head(FitConfig(features=[path], head="knn", out=tmp_path / "knn"))
    assert set(json.loads((out / "evaluation.json").read_text())["splits"]) == {"train", "val"}
