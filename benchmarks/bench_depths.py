"""Several pooled depths against the last layer, with and without views (issue 19).

For each input size: ``tlpipe extract --layers blocks --views V`` (the pipeline's own extraction;
reused when the file is up to date), then, on its training rows only, leave-one-photo-out CV of
the auto head's ridge classifier for: the last layer alone, ``conv_pw_7/11/13``, every block, and
the auto head's own depth choice; each without and with the training mirror views (and the
test-time mirror, when CV picks it).  Every choice (depths, ridge strength, mirror, input size)
is made by that CV; val and test are scored once at the end and printed beside it.

    python benchmarks/bench_depths.py --data ../shared/data/trashnet --split 70/15/15 --sizes 224,320
    python benchmarks/bench_depths.py --data ../shared/data/cats_vs_dogs_small --sizes 224 --views 0

Optional ``--time-last N``: also extract ``--layers last`` and ``blocks`` on N images per split
and print the time ratio (the cost of the extra depths).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import DEFAULT_WEIGHTS, SHARED, load, machine_line, require

FIXED = {"last": None, "7-11-13": ("conv_pw_7_relu", "conv_pw_11_relu", "conv_pw_13_relu"), "all": "all"}


def extract(data: str, split: str, weights: str, size: int, views: int, out: Path, layers: str = "blocks",
            limit: int | None = None) -> tuple[Path, float]:
    from pipeline.stage1.extract import ExtractConfig
    from pipeline.stage1.extract import extract as run

    t = time.perf_counter()
    path = run(ExtractConfig(base="mobilenet_0.75", data=data, split=split, weights=weights, input_size=size,
                             layers=layers, views=views, out=out, progress=False, limit=limit))
    return path, time.perf_counter() - t


def score(path: Path, mode: str, use_views: bool) -> dict:
    """Leave-one-photo-out CV on train (choices), then val/test of the chosen configuration."""
    from pipeline.heads.auto import AutoHead, load_views
    from pipeline.heads.models import HeadParams
    from pipeline.nets.depths import depths_of
    from pipeline.store.features import load_features

    fs = load_features(path)
    layout = depths_of(fs.attrs)
    views = load_views(path, fs.splits) if use_views else {}
    head = AutoHead(len(fs.class_names), HeadParams())
    last = layout[-1][0]
    layers = {"last": [last], "7-11-13": list(FIXED["7-11-13"])}.get(mode, "all")
    head.configure(layout, layers, views)
    if mode == "all":  # every depth, no choice
        head.configure(layout, [n for n, _ in layout], views)
    t = time.perf_counter()
    head.fit((fs.splits["train"].X, fs.splits["train"].y))
    fit_s = time.perf_counter() - t
    out = {"depths": mode if mode != "auto" else "auto: " + ",".join(n.replace("conv_pw_", "").replace("_relu", "")
                                                                      for n in head.names),
           "views": int(use_views), "cv": head.tuning["cv_accuracy"], "mirror": head.tta, "fit_s": round(fit_s, 1)}
    for split in ("val", "test"):
        s = fs.splits[split]
        p = head.predict_proba(s.X, views=views.get(split))
        out[split] = round(float((p.argmax(1) == s.y).mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "trashnet"))
    ap.add_argument("--split", default="70/15/15")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--sizes", default="224,320")
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--modes", default="last,7-11-13,all,auto")
    ap.add_argument("--cache", default="/tmp/bench_depths")
    ap.add_argument("--time-last", type=int, default=0, metavar="N")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require(args.data, "data")
    print(machine_line(), load())
    rows, cache = [], Path(args.cache)
    for size in [int(s) for s in args.sizes.split(",")]:
        out = cache / f"{Path(args.data).name}-{size}-blocks-v{args.views}.h5"
        path, secs = extract(args.data, args.split, args.weights, size, args.views, out)
        print(f"extract {size}px blocks, views {args.views}: {secs:.1f} s ({load()})", flush=True)
        for mode in args.modes.split(","):
            for use_views in ([False, True] if args.views else [False]):
                r = {"size": size, **score(path, mode, use_views)}
                rows.append(r)
                print(json.dumps(r), f"({load()})", flush=True)
    best = max((r for r in rows if r["depths"].startswith("auto")), key=lambda r: r["cv"], default=None)
    print("\n| size | depths | train views | test-time mirror | CV (train) | val | test | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['depths']} | {r['views']} | {'yes' if r['mirror'] else 'no'} | {r['cv']:.4f} "
              f"| {r['val']:.4f} | {r['test']:.4f} | {r['fit_s']} |")
    if best:
        print(f"\nchosen by CV on train: {best['size']} px, {best['depths']}, views {best['views']} -> "
              f"val {best['val']:.4f}, test {best['test']:.4f}")
    if args.time_last:
        size = int(args.sizes.split(",")[-1])
        t = {}
        for layers in ("last", "blocks", "last", "blocks"):
            _, s = extract(args.data, args.split, args.weights, size, 0,
                           cache / f"timing-{layers}.h5", layers, args.time_last)
            (cache / f"timing-{layers}.h5").unlink()
            t.setdefault(layers, []).append(s)
        print(f"extract {args.time_last}/split at {size}px: last {min(t['last']):.1f} s, blocks "
              f"{min(t['blocks']):.1f} s, ratio {min(t['blocks']) / min(t['last']):.2f} ({load()})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
