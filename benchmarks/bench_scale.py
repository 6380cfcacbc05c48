"""Scale-out: images/s of ``tlpipe extract`` with the local engine and with 1 and 2 Ray workers.

One local Ray cluster (``ray.init(num_cpus=CPUs)``) serves every Ray run; runs are interleaved
(local, ray x1, ray x2, then the same again for each repeat) and the load average is printed with
each, because the cores may be shared.  Every run extracts the same images from scratch (--force).

Printed per run: wall seconds of the whole call (model build, decode, forward, write, and for Ray
the actor start-up, the shard files and their merge), images/s over that wall time, and the rate of
the busy part (local: the extraction loop after compile; Ray: images / (actor busy seconds / actors),
decode + forward + write of the actors: each actor runs the same runner as the local engine).  Ray overhead per image = (Ray x1 wall - local wall) / images.

Then a projection, from the measured per-worker busy rates, of the workers a run of --images images
needs to finish within each of --hours hours (pure arithmetic: rate x workers, no coordination cost),
and, if ``benchmarks/bench_stream.py`` exists, its output (streaming heads' memory).

    python benchmarks/bench_scale.py                         # cats_vs_dogs_small, 150 images per split
    python benchmarks/bench_scale.py --limit 500 --repeats 2 --hours 24,72
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, DEFAULT_WEIGHTS, REPO, load, machine_line, median, require  # noqa: E402


def run_once(engine: str, workers: int, args, out: Path) -> dict:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.store.features import read_attrs

    cfg = ExtractConfig(base=args.base, data=args.data, weights=args.weights, out=out, batch_size=args.batch_size,
                        limit=args.limit, force=True, resume=False, progress=False, engine=engine,
                        actors=workers if engine == "ray" else 0, shard_size=args.shard_size)
    before = load()
    t = time.perf_counter()
    extract(cfg)
    wall = time.perf_counter() - t
    a = read_attrs(out)
    timing = json.loads(a["timing"])
    images = sum(a["counts"].values()) + int(a["skipped_count"])
    if engine == "local":
        busy_rate = images / timing["seconds"]
    else:
        busy_rate = images / (timing["actor_seconds"] / workers) if timing["actor_seconds"] else float("nan")
    out.unlink()
    return {"engine": engine, "workers": workers, "images": images, "wall": wall, "rate": images / wall,
            "busy_rate": busy_rate, "per_worker": busy_rate / max(1, workers), "load_before": before,
            "load_after": load()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--limit", type=int, default=150, help="images per split (0: all)")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--shard-size", type=int, default=75, help="ray engine: images per shard (a multiple of the batch: no part-filled batches)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--images", type=float, default=100e6, help="size of the projected run")
    ap.add_argument("--hours", default="4,24,72", help="comma-separated wall-clock budgets for the projection")
    ap.add_argument("--no-stream", action="store_true", help="do not run benchmarks/bench_stream.py")
    args = ap.parse_args(argv)
    require(args.data, "data")
    if args.weights not in ("none", "imagenet"):
        require(args.weights, "weights")
    import ray

    print(machine_line())
    print(f"data {args.data}, base {args.base}, {args.limit or 'all'} images per split, batch {args.batch_size}, "
          f"shard size {args.shard_size}")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                order = [("local", 0), ("ray", 1), ("ray", 2)]
                for engine, workers in (order if r % 2 == 0 else order[::-1]):
                    row = run_once(engine, workers, args, Path(tmp) / f"{engine}{workers}.h5")
                    rows.append(row)
                    print(f"{engine:5s} x{max(workers, 1)}: {row['images']} images, {row['wall']:6.1f} s wall, "
                          f"{row['rate']:6.1f} img/s wall, {row['busy_rate']:6.1f} img/s busy "
                          f"({row['per_worker']:.1f} per worker)  [{row['load_before']} -> {row['load_after']}]",
                          flush=True)
    finally:
        ray.shutdown()

    def med(engine, workers, key):
        return median([x[key] for x in rows if x["engine"] == engine and x["workers"] == workers])

    images = rows[0]["images"]
    print("\nmedians over repeats:")
    for engine, workers in (("local", 0), ("ray", 1), ("ray", 2)):
        print(f"  {engine:5s} x{max(workers, 1)}: {med(engine, workers, 'rate'):6.1f} img/s wall, "
              f"{med(engine, workers, 'busy_rate'):6.1f} img/s busy, {med(engine, workers, 'wall'):6.1f} s")
    overhead = (med("ray", 1, "wall") - med("local", 0, "wall")) / images
    print(f"Ray overhead (1 worker vs local, whole call, {images} images): "
          f"{med('ray', 1, 'wall') - med('local', 0, 'wall'):.1f} s = {1000 * overhead:.1f} ms per image "
          f"(mostly fixed: Ray start, actor start and model build, shard files and merge)")
    print(f"speed-up 2 vs 1 Ray workers (wall): {med('ray', 2, 'rate') / med('ray', 1, 'rate'):.2f}x "
          f"on {os.cpu_count()} CPUs")

    per_worker = {"local process (decode+model)": med("local", 0, "busy_rate"),
                  "ray model actor (x1)": med("ray", 1, "per_worker"),
                  "ray model actor (x2)": med("ray", 2, "per_worker")}
    print(f"\nprojection: workers needed for {args.images:,.0f} images (measured per-worker busy rates, "
          "this CPU; linear scaling assumed, start-up and merge not counted). Ray model actors decode "
          "their own shards.")
    hours = [float(h) for h in args.hours.split(",")]
    print("  rate source                   img/s/worker  " + "  ".join(f"{h:g} h".rjust(9) for h in hours))
    for name, rate in per_worker.items():
        need = [math.ceil(args.images / (rate * 3600 * h)) for h in hours]
        print(f"  {name:29s} {rate:12.1f}  " + "  ".join(f"{n:9,d}" for n in need))

    stream = REPO / "benchmarks" / "bench_stream.py"
    if args.no_stream:
        pass
    elif stream.is_file():
        print(f"\n$ python {stream.relative_to(REPO)}", flush=True)
        proc = subprocess.run([sys.executable, str(stream)], cwd=str(REPO), capture_output=True, text=True)
        print(proc.stdout.rstrip())
        if proc.returncode:
            print(f"bench_stream.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    else:
        print("\n(benchmarks/bench_stream.py not found: streaming-head memory not measured here)")
    print(load())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
