"""Stage-one throughput per runtime: tlpipe ``extract`` (JPEG files -> HDF5) vs each runtime's raw forward pass.

For each runtime (default: Keras/TF, OpenVINO f32, OpenVINO bf16), the raw side runs
``pipeline.stage1.runtime.build_runtime``'s object on batches already decoded in memory (through its
``map``, as extraction does: an asynchronous runtime keeps the next batch queued); the pipeline
side runs ``extract`` with the same runtime (reads JPEGs, decodes, runs the model, writes HDF5).
Measurements are interleaved (every runtime's raw and pipeline in each round, order reversed
every other round) so background load on a shared machine hits all sides alike; the load
average is printed with each.

Run from the repo root (defaults read ../shared)::

    python benchmarks/bench_extract.py                      # mobilenet_0.75, 3 rounds
    python benchmarks/bench_extract.py --base resnet50 --weights none --limit 100   # speed only
    python benchmarks/bench_extract.py --runtimes keras      # KERAS_BACKEND=jax: keras only

Printed, side by side: raw img/s, end-to-end img/s, end-to-end / own raw, ratios to the TF raw
forward pass, max abs feature difference to TF, whether the cached features equal the raw output.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, DEFAULT_WEIGHTS, load, machine_line, median, require  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--batch-size", type=int, default=None, help="default: ExtractConfig's")
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: ExtractConfig's)")
    ap.add_argument("--decode-nice", type=int, default=None, help="niceness of decode threads (default: auto)")
    ap.add_argument("--prefetch", type=int, default=0, help="batches decoded ahead (0: auto)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of measurements")
    ap.add_argument("--limit", type=int, default=None, help="images per split (quick runs)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--runtimes", default="keras,openvino:f32,openvino:bf16",
                    help="comma-separated RUNTIME[:PRECISION]; the first is the reference (TF raw)")
    ap.add_argument("--input-size", type=int, default=0, help="0: the base's own")
    ap.add_argument("--split", default="80/10/10")
    args = ap.parse_args(argv)

    data = require(args.data, "image folder")
    require(args.weights, "weights") if args.weights not in ("imagenet", "none") else None

    import h5py
    import numpy as np

    from pipeline.nets.backbones import get_backbone
    from pipeline.data.sources import open_source
    from pipeline.stage1.extract import ExtractConfig, decode_batch, extract
    from pipeline.stage1.runtime import build_runtime

    defaults = ExtractConfig(base=args.base)
    batch_size = args.batch_size or defaults.batch_size
    workers = args.workers if args.workers is not None else defaults.decode_threads
    print(machine_line())
    print(f"base={args.base} data={data} weights={args.weights} batch_size={batch_size} "
          f"workers={workers or 'auto'} {load()}")

    backbone = get_backbone(args.base)
    size = args.input_size or backbone.input_size
    source = open_source(str(data), args.split, None, args.limit)
    # The raw side's input: every batch decoded up front with the pipeline's own decoder and
    # the pipeline's batch boundaries (per split, batch_size items; the last one short).
    batches = []
    t = time.perf_counter()
    for split in source.splits:
        items = list(source.iter_items(split))
        for i in range(0, len(items), batch_size):
            batch, ids, _, skipped = decode_batch(items[i:i + batch_size], size)
            batches.append(batch[: len(ids)])
    n_images = sum(len(b) for b in batches)
    decode_s = time.perf_counter() - t
    print(f"decoded {n_images} images in {decode_s:.1f}s on one thread "
          f"({n_images / decode_s:.0f} img/s, {1000 * decode_s / n_images:.2f} ms/img)")

    configs = []  # (label, runtime, precision)
    for spec in args.runtimes.split(","):
        rt, _, prec = spec.strip().partition(":")
        configs.append((f"{rt} {prec or 'f32'}" if rt != "keras" else "keras (TF)", rt, prec or "f32"))
    forwards = {}
    for label, rt, prec in configs:
        t = time.perf_counter()
        forwards[label] = build_runtime(backbone, args.weights, size, "avg", runtime=rt, precision=prec,
                                        batch_size=batch_size)
        forwards[label].warmup()  # compile once, outside the timings
        print(f"built {label:14s} in {time.perf_counter() - t:5.1f}s (warm-up included)", flush=True)

    def raw(label):
        forward = forwards[label]
        c0, t0 = cpu_seconds(), time.perf_counter()
        outs = list(forward.map(batches))  # as extract runs it: the next batch queued behind the running one
        wall = time.perf_counter() - t0
        return {"img_s": n_images / wall, "wall": wall, "cpu_ms": 1000 * (cpu_seconds() - c0) / n_images,
                "load": load()}, np.concatenate(outs)

    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-extract-"))
    out_path = tmp / "features.h5"

    def pipeline(label):
        _, rt, prec = next(c for c in configs if c[0] == label)
        cfg = ExtractConfig(base=args.base, data=str(data), split=args.split, weights=args.weights, out=out_path,
                            input_size=size, batch_size=batch_size, decode_threads=workers, limit=args.limit,
                            decode_nice=args.decode_nice, prefetch=args.prefetch, runtime=rt, precision=prec,
                            resume=False, force=True, progress=False)
        c0, t0 = cpu_seconds(), time.perf_counter()
        extract(cfg)
        wall = time.perf_counter() - t0
        with h5py.File(out_path, "r") as h5:
            loop = float(h5.attrs["extract_seconds"])
            timing = json.loads(h5.attrs.get("timing", "{}"))
            feats = np.concatenate([h5[s]["features"][:] for s in json.loads(h5.attrs["splits"])])
        return {"img_s": n_images / loop, "img_s_whole_call": n_images / wall, "wall": wall,
                "loop": loop, "timing": timing, "cpu_ms": 1000 * (cpu_seconds() - c0) / n_images, "load": load()}, feats

    runs = {label: {"raw": [], "pipeline": []} for label, _, _ in configs}
    feats = {}
    try:
        for r in range(args.repeats):
            # interleaved: every runtime's raw and pipeline in each round, order rotated per round
            order = [(c[0], side) for c in configs for side in ("raw", "pipeline")]
            if r % 2:
                order = order[::-1]
            for label, side in order:
                res, out = raw(label) if side == "raw" else pipeline(label)
                runs[label][side].append(res)
                feats.setdefault((label, side), out)
                extra = ""
                if side == "pipeline":
                    tm = res["timing"]
                    extra = (f" (loop {tm.get('seconds', 0):.1f}s = forward {tm.get('forward', 0):.1f}s + decode wait "
                             f"{tm.get('decode_wait', 0):.1f}s + write {tm.get('write', 0):.1f}s; "
                             f"workers {tm.get('decode_threads')}, nice {tm.get('decode_nice')})")
                print(f"  [{r + 1}/{args.repeats}] {label:14s} {side:8s} {res['img_s']:7.1f} img/s{extra}  "
                      f"cpu {res['cpu_ms']:.2f} ms/img  {res['load']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref_label = configs[0][0]
    ref_raw = median([x["img_s"] for x in runs[ref_label]["raw"]])
    ref_feats = feats[(ref_label, "raw")]
    rows, cpu_rows = [], []
    ref_cpu = median([x["cpu_ms"] for x in runs[ref_label]["raw"]])
    print(f"\n{'runtime':14s} {'raw img/s':>10s} {'e2e img/s':>10s} {'e2e/own raw':>12s} {'raw/TF raw':>11s} "
          f"{'e2e/TF raw':>11s} {'max|diff| vs TF':>16s} {'pipeline==raw':>14s}")
    for label, rt, prec in configs:
        raw_m = median([x["img_s"] for x in runs[label]["raw"]])
        pipe_m = median([x["img_s"] for x in runs[label]["pipeline"]])
        pair = [p["img_s"] / q["img_s"] for p, q in zip(runs[label]["pipeline"], runs[label]["raw"])]
        diff = float(np.max(np.abs(feats[(label, "raw")] - ref_feats)))
        same = bool(np.array_equal(feats[(label, "raw")], feats[(label, "pipeline")]))
        raw_cpu = median([x["cpu_ms"] for x in runs[label]["raw"]])
        pipe_cpu = median([x["cpu_ms"] for x in runs[label]["pipeline"]])
        cpu_rows.append(f"{label:14s} {raw_cpu:10.2f} {pipe_cpu:10.2f} {raw_cpu / pipe_cpu:12.3f} "
                        f"{ref_cpu / raw_cpu:11.2f} {ref_cpu / pipe_cpu:11.2f}")
        row = {"runtime": rt, "precision": prec, "raw_img_s": round(raw_m, 1), "pipeline_img_s": round(pipe_m, 1),
               "raw_cpu_ms_per_img": round(raw_cpu, 2), "pipeline_cpu_ms_per_img": round(pipe_cpu, 2),
               "e2e_over_own_raw": round(pipe_m / raw_m, 3), "pair_ratios": [round(x, 3) for x in pair],
               "raw_over_tf_raw": round(raw_m / ref_raw, 3), "e2e_over_tf_raw": round(pipe_m / ref_raw, 3),
               "max_abs_diff_vs_tf": diff, "max_abs_tf": float(np.max(np.abs(ref_feats))),
               "pipeline_equals_raw": same}
        rows.append(row)
        print(f"{label:14s} {raw_m:10.1f} {pipe_m:10.1f} {pipe_m / raw_m:12.3f} {raw_m / ref_raw:11.2f} "
              f"{pipe_m / ref_raw:11.2f} {diff:16.2e} {str(same):>14s}")
    # CPU time per image (process CPU, all threads): what each side costs, less sensitive than wall-clock
    # rates to other processes on a shared machine (OpenVINO's threads wait rather than spin when preempted)
    print(f"\n{'CPU ms/img':14s} {'raw':>10s} {'e2e':>10s} {'own raw/e2e':>12s} {'TF raw/raw':>11s} {'TF raw/e2e':>11s}")
    print("\n".join(cpu_rows))
    print(f"max |TF feature| {float(np.max(np.abs(ref_feats))):.3g}; decode {1000 * decode_s / n_images:.2f} ms/img "
          f"on one thread; {load()}")
    summary = {"base": args.base, "images": n_images, "batch_size": batch_size, "workers": workers,
               "decode_ms_per_img_one_thread": round(1000 * decode_s / n_images, 2), "rows": rows,
               "load_end": load(), "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
