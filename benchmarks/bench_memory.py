"""Peak memory of extraction vs number of images: 1x and 10x images, each in a fresh process.

Synthetic JPEGs (random smooth colour images, 180x180) are written to a temporary
folder (class subfolders, hash split), then ``tlpipe extract`` runs over N and 10*N of
them, each in its own subprocess, which reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS just before extracting
(after importing TensorFlow/Keras).  Flat memory means peak(10x) / peak(1x) <= 1.1.

With ``--engine ray`` the subprocess is the Ray driver of a local cluster (``ray.init(num_cpus=...)``):
its peak RSS is the driver's (which must not grow with the images beyond the shard list and the
folder listing: actors get file paths, never pixels), and each run also prints the model actors'
peak RSS (the largest, from the features file's ``timing``).  ``--repo`` runs another checkout
(e.g. one from before the refactor; ``--old-api`` then passes ``workers`` instead of ``actors``).

    python benchmarks/bench_memory.py                     # N=200, mobilenet_0.25 at 96 px, --weights none
    python benchmarks/bench_memory.py --n 300 --base mobilenet_0.75 --size 224 --weights ../shared/weights
    python benchmarks/bench_memory.py --engine ray --n 500 --size 32 --actors 2 --num-cpus 2 --shard-size 250

Needs no shared data (weights ``none`` by default: memory does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RSS_MB_SOURCE, load, machine_line  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
import keras, h5py, numpy  # import everything the run needs before the baseline reading
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store.features import read_attrs
extra = json.loads({extra!r})
if extra.get("engine") == "ray":
    import ray
    ray.init(num_cpus={num_cpus!r}, include_dashboard=False, log_to_driver=False, configure_logging=False)
""" + RSS_MB_SOURCE + r"""before = rss_mb()
t = time.perf_counter()
out = extract(ExtractConfig(base={base!r}, data={data!r}, weights={weights!r}, out=Path({out!r}),
                            input_size={size!r}, batch_size={batch!r}, force=True, resume=False, progress=False,
                            **extra))
timing = json.loads(read_attrs(out)["timing"])
print(json.dumps({{"rss_before_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "actor_peak_rss_mb": timing.get("actor_peak_rss_mb"),
                  "seconds": time.perf_counter() - t}}))
"""


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "a" if i % 2 == 0 else "b"
        d = folder / cls
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((180, 180), Image.Resampling.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)


def run_child(args, data: Path, out: Path) -> dict:
    extra = {}
    if args.engine == "ray":
        extra = {"engine": "ray", "shard_size": args.shard_size, ("workers" if args.old_api else "actors"): args.actors}
    code = CHILD.format(repo=str(args.repo), base=args.base, data=str(data), weights=args.weights,
                        out=str(out), size=args.size, batch=args.batch_size, extra=json.dumps(extra),
                        num_cpus=args.num_cpus)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"extraction subprocess failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images in the 1x run (10x run: 10*n)")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--base", default="mobilenet_0.25")
    ap.add_argument("--size", type=int, default=96, help="input size (small: quick run)")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--actors", type=int, default=2, help="ray: model actors")
    ap.add_argument("--num-cpus", type=int, default=2, help="ray: CPUs of the local cluster")
    ap.add_argument("--shard-size", type=int, default=250, help="ray: images per shard")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    ap.add_argument("--old-api", action="store_true", help="the checkout's ExtractConfig has 'workers', not 'actors'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    print(machine_line(), f"| engine {args.engine}, repo {args.repo}")
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-memory-"))
    results = {}
    try:
        for mult in (1, args.factor):
            n = args.n * mult
            data = tmp / f"x{mult}"
            make_images(data, n)
            res = run_child(args, data, tmp / f"x{mult}.h5")
            res["images"] = n
            results[f"x{mult}"] = res
            print(f"{n:6d} images: peak RSS {res['peak_rss_mb']:7.1f} MiB (RSS before extract "
                  f"{res['rss_before_mb']:.1f} MiB, growth {res['peak_rss_mb'] - res['rss_before_mb']:.1f} MiB), "
                  f"{res['seconds']:.1f} s" + (f", actors' peak RSS {res['actor_peak_rss_mb']} MiB"
                                                 if args.engine == "ray" else "") + f"  {load()}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, many = results["x1"], results[f"x{args.factor}"]
    ratio = many["peak_rss_mb"] / one["peak_rss_mb"]
    print(f"peak RSS {args.factor}x / 1x = {ratio:.3f} (target <= 1.1)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratio": ratio, "args": vars(args)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
