"""Fine-tuning speed: end to end on the images against cached views (``--views K``), same head and settings.

Extracts the features and fits the head once (skipped when up to date, or give ``--head-dir``),
then runs ``fine_tune`` twice in this process with the same head, unfreeze point, learning rate,
augmentation, batch size, seed and number of epochs (patience = epochs: no early stop, so both run
every epoch): once end to end on the decoded images, once with ``--views K``.  The views file is
deleted first, so its one-off build is measured too.  Reported per run:

* fit s/epoch: the ``seconds`` column of history.csv (the training pass over the fit rows),
* wall s/epoch: between the ends of consecutive epochs (training + scoring the tune slice and val
  + the checkpoint): what an epoch costs the user,
* val and test accuracy of the restored best epoch (chosen on the 10 % tune slice of train),
* for views: the cache's build time and bottom passes (one per clean row + K - 1 per fit row).

    python benchmarks/bench_finetune.py                                  # trashnet 70/15/15, mobilenet_0.75
    python benchmarks/bench_finetune.py --epochs 3 --views 4 --unfreeze conv_dw_12

Targets (issue #9): views >= 3x faster per epoch, val/test accuracy equal within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_WEIGHTS, SHARED, load, machine_line, require  # noqa: E402


def prepare_head(args) -> Path:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.fit_head import FitConfig, fit_head

    cache = Path(args.cache_dir)
    t0 = time.perf_counter()
    feats = extract(ExtractConfig(base=args.base, data=str(args.data), weights=str(args.weights), split=args.split,
                                  cache_dir=cache, out=cache / "features" / f"{args.base}.h5", progress=False))
    print(f"features {feats} ({time.perf_counter() - t0:.1f} s, skipped when up to date)")
    head = fit_head(FitConfig(features=[feats], head=args.head, cache_dir=cache))
    return Path(head)


def run(args, head: Path, views: int | None) -> dict:
    from pipeline.stage3.finetune import FineTuneConfig, fine_tune

    out = Path(args.cache_dir) / "finetuned" / f"bench-{'views' if views else 'plain'}"
    shutil.rmtree(out.parent / f".{out.name}.views", ignore_errors=True)  # measure the views' build too
    shutil.rmtree(out / ".checkpoint", ignore_errors=True)
    ends: list[float] = []
    load_before = load()
    t0 = time.perf_counter()
    fine_tune(FineTuneConfig(head=head, cache_dir=Path(args.cache_dir), out=out, force=True, unfreeze=args.unfreeze,
                             epochs=args.epochs, patience=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             augment=args.augment, seed=args.seed, views=views,
                             after_epoch=lambda e: ends.append(time.perf_counter())))
    wall = time.perf_counter() - t0
    ev = json.loads((out / "evaluation.json").read_text())
    f = ev["fine_tune"]
    hist = [float(r) for r in _column(out / "history.csv", "seconds")[1:]]
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return {"name": f"views {views}" if views else "end to end", "fit_s": sum(hist) / len(hist),
            "wall_s": sum(gaps) / len(gaps) if gaps else float("nan"), "total_s": wall,
            "val": ev["splits"]["val"]["accuracy"], "test": ev["splits"].get("test", {}).get("accuracy"),
            "best_epoch": f["best_epoch"], "cache": f.get("views_cache"), "load_before": load_before,
            "load_after": load(), "trainable": f["n_trainable_layers"], "epoch0_val": f["epoch0_val_accuracy"]}


def _column(path: Path, name: str) -> list[str]:
    import csv

    with open(path) as fh:
        return [row[name] for row in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "trashnet"))
    ap.add_argument("--split", default="70/15/15")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--head", default="dense")
    ap.add_argument("--head-dir", default=None, help="A fitted head folder to start from (skips extract/fit).")
    ap.add_argument("--cache-dir", default="/tmp/tlpipe-bench-finetune")
    ap.add_argument("--unfreeze", default="block")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", default="flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", default="plain,views", help="Which run first (plain,views or views,plain).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.head_dir:
        head = require(args.head_dir, "head folder")
    else:
        require(args.data, "data")
        require(args.weights, "weights")
        head = prepare_head(args)
    print(machine_line())
    print(f"head {head}, --unfreeze {args.unfreeze}, --epochs {args.epochs} (no early stop), --lr {args.lr:g}, "
          f"--batch-size {args.batch_size}, --augment {args.augment}, --views {args.views}")
    results = {}
    for which in args.order.split(","):
        results[which] = run(args, head, args.views if which == "views" else None)
    print(f"{'run':12s} {'fit s/ep':>9s} {'wall s/ep':>9s} {'total s':>8s} {'val acc':>8s} {'test acc':>8s} "
          f"best ep  load before -> after")
    for r in results.values():
        test = f"{r['test']:.4f}" if r["test"] is not None else "n/a"
        print(f"{r['name']:12s} {r['fit_s']:9.2f} {r['wall_s']:9.2f} {r['total_s']:8.1f} {r['val']:8.4f} {test:>8s} "
              f"{r['best_epoch']:7d}  {r['load_before']} -> {r['load_after']}")
    p, v = results["plain"], results["views"]
    c = v["cache"] or {}
    print(f"views cache: {c.get('bottom_images_run')} bottom passes in {c.get('build_seconds')} s (one-off), "
          f"{c.get('start_layer')} {c.get('shapes')}, in memory: {c.get('in_memory')}; "
          f"model.keras vs cache max |dp| {c.get('check_max_abs_diff')}")
    print(f"speed-up per epoch: fit {p['fit_s'] / v['fit_s']:.1f}x, wall {p['wall_s'] / v['wall_s']:.1f}x "
          f"(target >= 3x)")
    dv = 100 * (v["val"] - p["val"])
    dt = 100 * (v["test"] - p["test"]) if p["test"] is not None else float("nan")
    print(f"accuracy views - end to end: val {dv:+.2f} points, test {dt:+.2f} points (target within 0.5); "
          f"epoch 0 val {p['epoch0_val']:.4f} / {v['epoch0_val']:.4f}")
    breakeven = c.get("build_seconds", 0) / max(1e-9, p["wall_s"] - v["wall_s"])
    print(f"the views' build pays for itself after {breakeven:.1f} epochs")


if __name__ == "__main__":
    main()
