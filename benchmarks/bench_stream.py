"""Streaming heads (fit-head --stream): peak memory at 1x and 10x rows, fit time, accuracy vs in memory.

Synthetic float32 features (two overlapping Gaussian classes, linear boundary) are written to
HDF5 files of N and 10*N training rows (val and test N/5 each, scaled alike); each fit runs in a
fresh subprocess that reports its peak RSS (``ru_maxrss``) and its RSS after the imports.  O(chunk)
memory means peak(10x) / peak(1x) <= 1.1.  At 1x the in-memory head is fitted too (same features):
test/val accuracy, fit seconds and peak RSS side by side.  ``--real FILE``: the same streamed vs
in-memory comparison on a real features file (e.g. trashnet through mobilenet_0.75).

    python benchmarks/bench_stream.py                               # N=20000 x 1024, logistic and dense
    python benchmarks/bench_stream.py --n 2000 --dim 256 --epochs 3 # quick
    python benchmarks/bench_stream.py --skip-synthetic --real /tmp/trashnet_mnv075.h5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RSS_MB_SOURCE, load, machine_line  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from pathlib import Path
import h5py, numpy, sklearn.linear_model, keras  # everything the fit imports, before the baseline reading
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams
""" + RSS_MB_SOURCE + r"""before = rss_mb()
t = time.perf_counter()
out = fit_head(FitConfig(features=[{features!r}], head={head!r}, out=Path({out!r}), force=True,
                         stream={stream!r}, chunk_rows={chunk_rows!r},
                         params=HeadParams(epochs={epochs!r}, patience={patience!r})))
ev = json.loads((out / "evaluation.json").read_text())
print(json.dumps({{"rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t, "fit_seconds": ev["fit_seconds"],
                  "val": ev["splits"]["val"]["accuracy"], "test": ev["splits"]["test"]["accuracy"],
                  "val_loss": ev["splits"]["val"]["log_loss"], "test_loss": ev["splits"]["test"]["log_loss"],
                  "chosen": ev["tuning"]["chosen"], "memory": ev["memory"]}}))
"""


def write_features(path: Path, n_train: int, dim: int, seed: int = 0, block: int = 8192) -> None:
    """Two Gaussian classes (~90 % separable), written block by block (the writer holds one block)."""
    import h5py
    import numpy as np

    centres = np.random.default_rng(7).normal(0, 1.0, (2, dim)) * (2.56 / np.sqrt(2 * dim))  # Bayes ~90 %
    counts = {"train": n_train, "val": n_train // 5, "test": n_train // 5}
    with h5py.File(path, "w") as h5:
        for i, (split, m) in enumerate(counts.items()):
            rng = np.random.default_rng([seed, i])
            y = rng.permutation(np.arange(m) % 2).astype(np.int64)
            g = h5.create_group(split)
            ds = g.create_dataset("features", (m, dim), "float32", chunks=(min(m, 256), dim))
            for s in range(0, m, block):
                yy = y[s:s + block]
                ds[s:s + len(yy)] = (centres[yy] + rng.normal(0, 1.0, (len(yy), dim)) + 1.0).astype(np.float32)
            g["labels"] = y
            g["ids"] = np.array([f"{split}/{j}" for j in range(m)], dtype=h5py.string_dtype())
        h5.attrs.update({"schema_version": 1, "base": "synthetic", "weights": "none", "input_size": 32,
                         "pooling": "avg", "feature_size": dim, "class_names": json.dumps(["a", "b"]),
                         "num_classes": 2, "counts": json.dumps(counts), "splits": json.dumps(list(counts)),
                         "fingerprint": f"bench{n_train}x{dim}", "source_fingerprint": "bench",
                         "data_source": "synthetic", "split_spec": "70/15/15", "preprocessing": "none",
                         "skipped": "[]", "skipped_count": 0, "limit": 0})


def run(features: Path, head: str, stream: bool, out: Path, args) -> dict:
    code = CHILD.format(repo=str(REPO), features=str(features), head=head, out=str(out), stream=stream,
                        chunk_rows=args.chunk_rows, epochs=args.epochs, patience=args.patience)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise SystemExit(f"{head} stream={stream} on {features} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["load"] = load()
    return res


def line(label: str, r: dict) -> str:
    return (f"{label:34s} peak RSS {r['peak_rss_mb']:7.0f} MB (after imports {r['rss_before_mb']:5.0f} MB)  "
            f"fit {r['fit_seconds']:7.1f} s  val {r['val']:.4f}  test {r['test']:.4f}  "
            f"log loss {r['val_loss']:.4f} / {r['test_loss']:.4f}  chosen {r['chosen']}  "
            f"[{r['load']}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="training rows at 1x (val and test: n/5 each)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--heads", default="logistic,dense")
    ap.add_argument("--epochs", type=int, default=50, help="dense: most epochs")
    ap.add_argument("--patience", type=int, default=5, help="dense: early-stopping patience")
    ap.add_argument("--chunk-rows", type=int, default=0, help="0: about 32 MiB of features per chunk")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--no-memory-fits", action="store_true", help="skip the in-memory fits at 1x")
    ap.add_argument("--real", type=Path, default=None, help="a real features file: streamed vs in memory")
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic files [default: a temp dir]")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    print(machine_line())
    print(" ".join(sys.argv))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        if not args.skip_synthetic:
            files = {}
            for f in (1, args.factor):
                files[f] = tmp / f"x{f}.h5"
                write_features(files[f], args.n * f, args.dim)
                print(f"wrote {files[f].name}: {args.n * f} train + {2 * (args.n * f // 5)} val/test rows x {args.dim}"
                      f" float32 ({files[f].stat().st_size / 1e9:.2f} GB)", flush=True)
            for head in heads:
                res = {}
                for f in (1, args.factor):
                    res[f] = run(files[f], head, True, tmp / f"{head}-{f}", args)
                    print(line(f"{head} streamed {f}x ({args.n * f} rows)", res[f]), flush=True)
                ratio = res[args.factor]["peak_rss_mb"] / res[1]["peak_rss_mb"]
                print(f"{head}: peak RSS {args.factor}x / 1x = {ratio:.3f} (target <= 1.1); "
                      f"chunk {res[1]['memory']['chunk_rows']} rows", flush=True)
                if not args.no_memory_fits:
                    mem = run(files[1], head, False, tmp / f"{head}-mem", args)
                    print(line(f"{head} in memory 1x ({args.n} rows)", mem), flush=True)
                    print(f"{head}: streamed - in memory at 1x: val {100 * (res[1]['val'] - mem['val']):+.2f} points, "
                          f"test {100 * (res[1]['test'] - mem['test']):+.2f} points", flush=True)
        if args.real is not None:
            print(f"real features: {args.real}")
            for head in heads:
                st = run(args.real, head, True, tmp / f"real-{head}-st", args)
                mem = run(args.real, head, False, tmp / f"real-{head}-mem", args)
                print(line(f"{head} streamed", st))
                print(line(f"{head} in memory", mem))
                print(f"{head}: streamed - in memory: val {100 * (st['val'] - mem['val']):+.2f} points, "
                      f"test {100 * (st['test'] - mem['test']):+.2f} points", flush=True)


if __name__ == "__main__":
    main()
