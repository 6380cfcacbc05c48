"""Accuracy figures that nothing was tuned on: input sizes and fusions chosen on train alone.

For one base, extract the data at each ``--sizes`` input size, then fit each head on every
single size and every pair of sizes (fused features).  Each head picks its own C (or k, or
epochs) inside train; this script then picks the input-size candidate with the best
cross-validated accuracy on train (the head's ``tuning.cv_accuracy``), and only then reads the
val and test accuracy of that candidate.  Val and test choose nothing.

    python benchmarks/bench_accuracy.py                                  # cats_vs_dogs_small, MobileNet-0.75
    python benchmarks/bench_accuracy.py --data ../shared/data/trashnet --split 70/15/15

Prints one row per candidate (CV accuracy on train, val, test) and the chosen one per head.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

from _common import DEFAULT_DATA, DEFAULT_WEIGHTS, machine_line, require

from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.fit_head import FitConfig, fit_head
from pipeline.heads.models import HeadParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--split", default="80/10/10", help="used when the folder has no train/ val/ subfolders")
    ap.add_argument("--sizes", default="224,256,288")
    ap.add_argument("--heads", default="logistic,rbf-svm")
    ap.add_argument("--cache-dir", default="/tmp/tlpipe_bench_accuracy")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = require(args.data, "data")
    require(args.weights, "weights")
    cache = Path(args.cache_dir) / Path(data).name
    sizes = [int(s) for s in args.sizes.split(",")]

    files = {}
    for size in sizes:
        t0 = time.perf_counter()
        files[size] = extract(ExtractConfig(base=args.base, data=str(data), split=args.split, weights=args.weights,
                                            input_size=size, cache_dir=cache, progress=False,
                                            out=cache / "features" / f"{args.base}_{size}.h5"))
        print(f"extract {args.base} at {size} px: {time.perf_counter() - t0:.1f} s")
    candidates = [(s,) for s in sizes] + list(itertools.combinations(sizes, 2))

    print(f"\n{machine_line()}\ndata {data}, base {args.base}, split {args.split}")
    print(f"{'head':9s} {'input sizes':12s} {'CV acc (train)':>14s} {'val acc':>8s} {'test acc':>8s} {'fit s':>6s}")
    for head in args.heads.split(","):
        results = []
        for cand in candidates:
            out = cache / "heads" / f"{'+'.join(map(str, cand))}-{head}"
            folder = fit_head(FitConfig(features=[files[s] for s in cand], head=head, out=out, cache_dir=cache,
                                        params=HeadParams(), force=True))
            ev = json.loads((folder / "evaluation.json").read_text())
            m = json.loads((folder / "metrics.json").read_text())
            results.append((cand, ev["tuning"].get("cv_accuracy"), m["val"]["accuracy"],
                            (m.get("test") or {}).get("accuracy"), m["fit_seconds"]))
        best = max(results, key=lambda r: (r[1] if r[1] is not None else -1, -len(r[0])))
        for cand, cv, val, test, secs in results:
            mark = "  <- chosen on train" if (cand, cv) == best[:2] else ""
            print(f"{head:9s} {'+'.join(map(str, cand)):12s} {cv:14.4f} {val:8.4f} "
                  f"{test if test is not None else float('nan'):8.4f} {secs:6.1f}{mark}")
        print(f"{head}: chosen {'+'.join(map(str, best[0]))} px by CV on train -> val {best[2]:.4f}"
              + (f", test {best[3]:.4f}" if best[3] is not None else ""))


if __name__ == "__main__":
    main()
