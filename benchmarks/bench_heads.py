"""Stage-two speed: fit heads on 20,000 x 2,048 synthetic cached features.

Writes a synthetic tlpipe features file (train 20,000 rows, val 2,000 rows, 2,048
non-negative float32 features like a pooled ReLU base, ``--classes`` Gaussian classes whose
means differ by ``--separation``, so accuracy is realistic rather than 100%),
then times ``fit_head`` for each head, in-process.  Reported: ``fit_seconds`` from
metrics.json (the head's fit, grid search included) and the wall time of the whole
``fit_head`` call (loading the HDF5, evaluating every split, writing outputs).

    python benchmarks/bench_heads.py                      # logistic and dense, 2 classes
    python benchmarks/bench_heads.py --heads logistic dense svm knn --classes 10
    python benchmarks/bench_heads.py --rows 3000 --dim 768 --classes 6 --heads logistic svm knn dense rbf-svm
    python benchmarks/bench_heads.py --heads logistic svm knn dense --compare /work/main   # before/after

``--compare TREE`` fits every head twice on the same features file, in child processes:
once with the ``pipeline`` package of TREE (e.g. a checkout of the previous commit) and once
with this tree's, back to back, so both see the same machine load; it prints the ratio.  A
side that runs past ``--timeout`` seconds is stopped and reported as ``> timeout``.

Targets on 2 cores (20,000 x 2,048, CV included): logistic <= 5 s, svm <= 10 s, knn <= 5 s,
dense <= 20 s; on 3,000 x 768 every head but rbf-svm <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, machine_line  # noqa: E402

if os.environ.get("TLPIPE_BENCH_TREE"):  # fit_in_child: that tree's pipeline, not this one (_common put it first)
    sys.path.insert(0, os.environ["TLPIPE_BENCH_TREE"])


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


def fit_once(h5: Path, head: str, out: Path) -> dict:
    """Fit ``head`` with whichever ``pipeline`` package is importable; its timings and choice."""
    import dataclasses

    import pipeline
    from pipeline.stage2.fit_head import FitConfig, fit_head

    extra = {"progress": False} if "progress" in {f.name for f in dataclasses.fields(FitConfig)} else {}
    t, cpu = time.perf_counter(), time.process_time()
    folder = fit_head(FitConfig(features=[h5], head=head, out=out, **extra))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    m = json.loads((Path(folder) / "metrics.json").read_text())
    tuning = json.loads((Path(folder) / "evaluation.json").read_text())["tuning"]
    return {"fit_seconds": m["fit_seconds"], "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "val_accuracy": m["val"]["accuracy"],
            "val_log_loss": m["val"]["log_loss"], "chosen": f"{tuning['param']}={tuning['chosen']}",
            "cv_log_loss": tuning.get("cv_log_loss"), "at_grid_edge": tuning.get("at_grid_edge"),
            "grid": tuning.get("grid"), "tree": str(Path(pipeline.__file__).resolve().parents[1]), "load": load()}


def fit_in_child(tree: Path, h5: Path, head: str, out: Path, timeout: float) -> dict:
    """``fit_once`` in a child process importing ``pipeline`` from ``tree``; ``{"timeout": s}`` if it
    runs past ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TLPIPE_BENCH_TREE": str(tree)}
    cmd = [sys.executable, __file__, "--child", str(h5), head, str(out)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tree))
    except subprocess.TimeoutExpired:
        return {"timeout": timeout, "load": load()}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{head} in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def show(side: str, head: str, r: dict) -> str:
    if "timeout" in r:
        return f"{head:9s} {side:6s} fit  > {r['timeout']:.0f} s (stopped)  {r['load']}"
    return (f"{head:9s} {side:6s} fit {r['fit_seconds']:7.2f} s (call {r['wall_seconds']:7.2f} s, cpu {r['cpu_seconds']:7.2f} s)  val accuracy "
            f"{r['val_accuracy']:.4f} log loss {r['val_log_loss']:.4f}  chosen {r['chosen']} "
            f"(CV log loss {r['cv_log_loss'] if r['cv_log_loss'] is None else round(r['cv_log_loss'], 4)}"
            f"{', at grid edge' if r.get('at_grid_edge') else ''})  {r['load']}  [{r.get('tree')}]")


def compare(args, h5: Path, tmp: Path) -> dict:
    """Each head fitted by the reference tree and by this one, back to back in child processes."""
    here = Path(__file__).resolve().parent.parent
    results = {}
    for head in args.heads:
        pair = {}
        for side, tree in (("before", Path(args.compare).resolve()), ("after", here)):
            pair[side] = fit_in_child(tree, h5, head, tmp / f"{head}-{side}", args.timeout)
            if pair[side].get("tree", str(tree)) != str(tree):
                raise RuntimeError(f"the {side} side imported pipeline from {pair[side]['tree']}, not {tree}")
            print(show(side, head, pair[side]), flush=True)
        b, a = pair["before"], pair["after"]
        if "fit_seconds" in a:
            before = b.get("fit_seconds", b.get("timeout"))
            pair["speed_up"] = round(before / max(a["fit_seconds"], 1e-9), 2)
            print(f"{head:9s} speed-up {'>' if 'timeout' in b else ''}{pair['speed_up']:.1f}x", flush=True)
        results[head] = pair
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":  # fit_in_child's process: one fit, one JSON line
        print(json.dumps(fit_once(Path(argv[1]), argv[2], Path(argv[3]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--val-rows", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=2_048)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--separation", type=float, default=0.05, help="class-mean offset (higher: easier)")
    ap.add_argument("--heads", nargs="+", default=["logistic", "dense"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare", default=None, metavar="TREE",
                    help="also fit each head with the pipeline package of TREE (before/after, same run)")
    ap.add_argument("--timeout", type=float, default=900.0, help="--compare: seconds before a fit is stopped")
    args = ap.parse_args(argv)

    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-heads-"))
    results = {}
    try:
        h5 = tmp / "synthetic.h5"
        t = time.perf_counter()
        write_features(h5, args.rows, args.val_rows, args.dim, args.classes, args.separation)
        print(f"wrote {args.rows}+{args.val_rows} x {args.dim} features, {args.classes} classes "
              f"in {time.perf_counter() - t:.1f}s  {load()}")
        if args.compare:
            results = compare(args, h5, tmp)
        for head in [] if args.compare else args.heads:
            results[head] = fit_once(h5, head, tmp / head)
            print(show("", head, results[head]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
