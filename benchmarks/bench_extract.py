"""Stage-one throughput: tlpipe ``extract`` (JPEG files -> HDF5) vs the raw compiled forward pass.

Both sides use the same model (``build_with_weights`` + ``build_extractor``) and the same
``Forward`` call on the same fixed-size batches; the raw side gets those batches already
decoded in memory, the pipeline reads JPEGs from disk, decodes, runs the model and writes
HDF5.  Measurements are interleaved (raw, pipeline, pipeline, raw, ...) so background
load on a shared machine hits both sides alike; the load average is printed with each.

Run from the repo root (defaults read ../shared)::

    python benchmarks/bench_extract.py                      # mobilenet_0.75, 3 repeats
    python benchmarks/bench_extract.py --repeats 5 --batch-size 64 --workers 1
    KERAS_BACKEND=jax python benchmarks/bench_extract.py    # same, on JAX (GPU if present)

Printed: raw img/s, pipeline img/s (extraction loop, and whole call incl. model build),
their ratio, CPU-ms per image of each side, and whether the cached features equal the
raw forward's output bit for bit.
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
    args = ap.parse_args(argv)

    data = require(args.data, "image folder")
    require(args.weights, "weights") if args.weights not in ("imagenet", "none") else None

    import numpy as np
    import h5py

    from pipeline.backbones import get_backbone
    from pipeline.data import open_source
    from pipeline.extract import ExtractConfig, _decode_batch, extract
    from pipeline.model import Forward, build_extractor
    from pipeline.weights import build_with_weights, parse_weights

    defaults = ExtractConfig(base=args.base)
    batch_size = args.batch_size or defaults.batch_size
    workers = args.workers if args.workers is not None else defaults.workers
    print(machine_line())
    print(f"base={args.base} data={data} batch_size={batch_size} workers={workers or 'auto'} {load()}")

    backbone = get_backbone(args.base)
    size = backbone.input_size
    source = open_source(str(data), "80/10/10", None, args.limit)
    # The raw side's input: every batch decoded up front with the pipeline's own decoder and
    # the pipeline's batch boundaries (per split, batch_size items; the last one short).
    batches = []
    t = time.perf_counter()
    for split in source.splits:
        items = list(source.iter_items(split))
        for i in range(0, len(items), batch_size):
            batch, ids, _, skipped = _decode_batch(items[i:i + batch_size], size)
            batches.append(batch[: len(ids)])
    n_images = sum(len(b) for b in batches)
    decode_s = time.perf_counter() - t
    print(f"decoded {n_images} images in {decode_s:.1f}s on one thread "
          f"({n_images / decode_s:.0f} img/s, {1000 * decode_s / n_images:.2f} ms/img)")

    base_model, _ = build_with_weights(backbone, parse_weights(args.weights, backbone), size, "avg")
    model = build_extractor(backbone, base_model, size)
    forward = Forward(model, batch_size)
    forward(batches[0])  # compile once, outside the timings

    def raw():
        c0, t0 = cpu_seconds(), time.perf_counter()
        outs = [forward(b) for b in batches]
        wall = time.perf_counter() - t0
        return {"img_s": n_images / wall, "wall": wall, "cpu_ms": 1000 * (cpu_seconds() - c0) / n_images,
                "load": load()}, outs

    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-extract-"))
    out_path = tmp / "features.h5"

    def pipeline():
        cfg = ExtractConfig(base=args.base, data=str(data), weights=args.weights, out=out_path,
                            batch_size=batch_size, workers=workers, limit=args.limit,
                            decode_nice=args.decode_nice, prefetch=args.prefetch,
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

    runs = {"raw": [], "pipeline": []}
    identical = None
    try:
        for r in range(args.repeats):
            order = ("raw", "pipeline") if r % 2 == 0 else ("pipeline", "raw")
            for side in order:
                res, outs = raw() if side == "raw" else pipeline()
                runs[side].append(res)
                extra = ""
                if side == "pipeline":
                    tm = res["timing"]
                    extra = (f" (whole call incl. model build {res['img_s_whole_call']:6.1f} img/s; loop "
                             f"{tm.get('seconds', 0):.1f}s = forward {tm.get('forward', 0):.1f}s "
                             f"[{n_images / max(tm.get('forward', 0), 1e-9):.1f} img/s] + decode wait "
                             f"{tm.get('decode_wait', 0):.1f}s + write {tm.get('write', 0):.1f}s; "
                             f"workers {tm.get('workers')}, nice {tm.get('decode_nice')})")
                print(f"  [{r + 1}/{args.repeats}] {side:8s} {res['img_s']:6.1f} img/s{extra}  "
                      f"cpu {res['cpu_ms']:.2f} ms/img  {res['load']}", flush=True)
                if side == "raw":
                    raw_feats = np.concatenate(outs)
                else:
                    pipe_feats = outs
            if identical is None:
                identical = bool(np.array_equal(raw_feats, pipe_feats))
                maxdiff = float(np.max(np.abs(raw_feats - pipe_feats))) if raw_feats.shape == pipe_feats.shape else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    raw_m = median([x["img_s"] for x in runs["raw"]])
    pipe_m = median([x["img_s"] for x in runs["pipeline"]])
    whole_m = median([x["img_s_whole_call"] for x in runs["pipeline"]])
    pair_ratios = [p["img_s"] / q["img_s"] for p, q in zip(runs["pipeline"], runs["raw"])]
    summary = {
        "base": args.base, "images": n_images, "batch_size": batch_size, "workers": workers,
        "raw_img_s": round(raw_m, 1), "pipeline_img_s": round(pipe_m, 1),
        "pipeline_whole_call_img_s": round(whole_m, 1),
        "ratio": round(pipe_m / raw_m, 3), "ratio_whole_call": round(whole_m / raw_m, 3),
        "pair_ratios": [round(x, 3) for x in pair_ratios],
        "raw_cpu_ms_per_img": round(median([x["cpu_ms"] for x in runs["raw"]]), 2),
        "pipeline_cpu_ms_per_img": round(median([x["cpu_ms"] for x in runs["pipeline"]]), 2),
        "decode_ms_per_img_one_thread": round(1000 * decode_s / n_images, 2),
        "features_bit_identical": identical, "max_abs_diff": maxdiff,
        "load_end": load(), "runs": runs,
    }
    print(f"raw compiled forward : {raw_m:6.1f} img/s (median of {args.repeats})")
    print(f"tlpipe extract       : {pipe_m:6.1f} img/s extraction loop, {whole_m:6.1f} img/s whole call")
    print(f"ratio                : {summary['ratio']:.3f} (loop)  {summary['ratio_whole_call']:.3f} (whole call)"
          f"  per pair: {summary['pair_ratios']}")
    print(f"features identical to raw forward: {identical} (max abs diff {maxdiff})")
    print(load())
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
