"""Stage-two speed: fit heads on 20,000 x 2,048 synthetic cached features.

Writes a synthetic tlpipe features file (train 20,000 rows, val 2,000 rows, 2,048
non-negative float32 features like a pooled ReLU base, ``--classes`` Gaussian classes whose
means differ by ``--separation``, so accuracy is realistic rather than 100%),
then times ``fit_head`` for each head, in-process.  Reported: ``fit_seconds`` from
metrics.json (the head's fit, grid search included) and the wall time of the whole
``fit_head`` call (loading the HDF5, evaluating every split, writing outputs).

    python benchmarks/bench_heads.py                      # logistic and dense, 2 classes
    python benchmarks/bench_heads.py --heads logistic dense svm knn --classes 10

Targets on 2 cores: logistic < 5 s, dense < 20 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, machine_line  # noqa: E402


def write_features(path: Path, n_train: int, n_val: int, dim: int, classes: int, separation: float,
                   seed: int = 0) -> None:
    import h5py
    import numpy as np

    from pipeline.store.features import SCHEMA_VERSION

    rng = np.random.default_rng(seed)
    # A shared non-negative profile plus small per-class offsets: separable, but not trivially
    # (separation 0.05 gives ~85-90% accuracy, like real features; early stopping then works).
    profile = rng.gamma(2.0, 0.5, size=dim)
    centers = (profile + separation * rng.normal(size=(classes, dim))).astype(np.float32)
    counts = {"train": n_train, "val": n_val}
    with h5py.File(path, "w") as h5:
        for split, n in counts.items():
            y = np.arange(n) % classes
            X = centers[y] + rng.normal(0.0, 1.5, size=(n, dim)).astype(np.float32)
            X = np.maximum(X, 0.0, dtype=np.float32)
            g = h5.create_group(split)
            g.create_dataset("features", data=X, chunks=(min(n, 128), dim))
            g.create_dataset("labels", data=y.astype(np.int64))
            g.create_dataset("ids", data=np.asarray([f"{split}/{i}" for i in range(n)], dtype=object),
                             dtype=h5py.string_dtype())
        attrs = {
            "schema_version": SCHEMA_VERSION, "base": "synthetic", "weights": "none", "input_size": 0,
            "pooling": "avg", "data_source": "synthetic", "split_spec": "as-given",
            "class_names": json.dumps([f"c{i}" for i in range(classes)]), "num_classes": classes,
            "fingerprint": f"synthetic-{n_train}-{n_val}-{dim}-{classes}-{seed}",
            "source_fingerprint": "synthetic", "feature_size": dim,
            "splits": json.dumps(list(counts)), "counts": json.dumps(counts),
        }
        for k, v in attrs.items():
            h5.attrs[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--val-rows", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=2_048)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--separation", type=float, default=0.05, help="class-mean offset (higher: easier)")
    ap.add_argument("--heads", nargs="+", default=["logistic", "dense"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from pipeline.stage2.fit_head import FitConfig, fit_head

    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-heads-"))
    results = {}
    try:
        h5 = tmp / "synthetic.h5"
        t = time.perf_counter()
        write_features(h5, args.rows, args.val_rows, args.dim, args.classes, args.separation)
        print(f"wrote {args.rows}+{args.val_rows} x {args.dim} features, {args.classes} classes "
              f"in {time.perf_counter() - t:.1f}s  {load()}")
        for head in args.heads:
            t = time.perf_counter()
            out = fit_head(FitConfig(features=[h5], head=head, out=tmp / head))
            wall = time.perf_counter() - t
            m = json.loads((Path(out) / "metrics.json").read_text())
            t = json.loads((Path(out) / "evaluation.json").read_text())["tuning"]
            chosen = f"{t['param']}={t['chosen']} ({t['method']})"
            results[head] = {"fit_seconds": m["fit_seconds"], "wall_seconds": round(wall, 2),
                             "val_accuracy": m["val"]["accuracy"], "chosen": chosen, "load": load()}
            print(f"{head:9s} fit {m['fit_seconds']:6.2f} s  (whole fit_head call {wall:6.2f} s)  "
                  f"val accuracy {m['val']['accuracy']:.4f}  chosen {chosen}  {load()}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
