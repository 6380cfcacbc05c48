"""Head accuracy on bf16 features against f32 features (OpenVINO runtime), same data, same heads.

For each data set: extract with ``--runtime openvino --precision f32`` and ``bf16`` (same base,
weights, split), fit the logistic and dense heads on each (C by CV on train, epochs by early
stopping on a slice of train: val and test are only read), and print val / test accuracy and
log loss side by side with the difference in points.  Also the max abs feature difference.

    python benchmarks/bench_precision.py                        # cats_vs_dogs_small (val) and trashnet (test)
    python benchmarks/bench_precision.py --sets cats --heads logistic
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_WEIGHTS, SHARED, load, machine_line, require  # noqa: E402

SETS = {"cats": (SHARED / "data" / "cats_vs_dogs_small", "80/10/10", "val"),
        "trashnet": (SHARED / "data" / "trashnet", "70/15/15", "test")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--sets", default="cats,trashnet")
    ap.add_argument("--heads", default="logistic,dense")
    ap.add_argument("--work", default=None, help="keep features and heads here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    require(args.weights, "weights")

    import h5py
    import numpy as np

    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.fit_head import FitConfig, fit_head

    work = Path(args.work or tempfile.mkdtemp(prefix="tlpipe-bench-precision-"))
    print(machine_line())
    print(f"base {args.base}, weights {args.weights}, {load()}")
    results = []
    for name in args.sets.split(","):
        data, split, report_split = SETS[name]
        require(data, f"{name} data")
        files = {}
        for prec in ("f32", "bf16"):
            t = time.perf_counter()
            files[prec] = extract(ExtractConfig(
                base=args.base, data=str(data), split=split, weights=args.weights, runtime="openvino",
                precision=prec, out=work / f"{name}-{prec}.h5", progress=False))
            with h5py.File(files[prec], "r") as h5:
                rate = float(h5.attrs["images_per_second"])
            print(f"{name}: extracted {prec} in {time.perf_counter() - t:.1f}s ({rate:.0f} img/s) {load()}", flush=True)
        with h5py.File(files["f32"], "r") as a, h5py.File(files["bf16"], "r") as b:
            fa = np.concatenate([a[s]["features"][...] for s in ("train", "val", "test") if s in a])
            fb = np.concatenate([b[s]["features"][...] for s in ("train", "val", "test") if s in b])
        diff, scale = float(np.max(np.abs(fa - fb))), float(np.max(np.abs(fa)))
        print(f"{name}: max abs feature diff bf16 vs f32 {diff:.3g} (max abs f32 feature {scale:.3g})")
        for head in args.heads.split(","):
            row = {"set": name, "split": report_split, "head": head, "feature_max_abs_diff": diff}
            for prec in ("f32", "bf16"):
                folder = fit_head(FitConfig(features=[files[prec]], head=head, out=work / f"{name}-{prec}-{head}",
                                            force=True))
                metrics = json.loads((folder / "metrics.json").read_text())[report_split]
                row[prec] = {"accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"]}
            row["delta_points"] = round(100 * (row["bf16"]["accuracy"] - row["f32"]["accuracy"]), 2)
            results.append(row)
            print(f"{name:9s} {report_split:5s} {head:9s} f32 acc {row['f32']['accuracy']:.4f} "
                  f"(loss {row['f32']['log_loss']:.4f})  bf16 acc {row['bf16']['accuracy']:.4f} "
                  f"(loss {row['bf16']['log_loss']:.4f})  bf16 - f32 {row['delta_points']:+.2f} points  {load()}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
