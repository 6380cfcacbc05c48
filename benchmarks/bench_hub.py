"""Extraction rate of a small KerasHub base (a DINOv2-small config, random weights) against MobileNet-0.75.

Same photos (the first N of ../shared/data/cats_vs_dogs_small/train, both classes), each base at its own
input size, random weights for both (no hub weights are reachable offline; a rate, not an accuracy).
The DINOv2-small architecture (patch 14, 12 layers, width 384, 6 heads, MLP 1536, 224 px: 256 patch
tokens + the class token) is saved once as a preset folder and passed as ``--weights DIR``.

    PYTHONPATH=. python benchmarks/bench_hub.py [--images 200] [--runtime keras|openvino|auto] [--repeat 2]

Prints images/s per base (the best of ``--repeat`` runs, each a fresh extraction) and the load averages.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_DATA, load, machine_line, require


def dinov2_small_preset(root: Path) -> Path:
    """``root/dinov2_small``: the DINOv2-small architecture with random weights, as a preset folder."""
    import keras
    import keras_hub

    folder = root / "dinov2_small"
    keras.utils.set_random_seed(0)
    keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
        layer_scale_init_value=1.0, image_shape=(224, 224, 3), position_embedding_shape=(518, 518, 3),
    ).save_to_preset(str(folder))
    keras_hub.layers.DINOV2ImageConverter(
        image_size=(224, 224), scale=[1 / (255 * s) for s in (0.229, 0.224, 0.225)],
        offset=[-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
    ).save_to_preset(str(folder))
    return folder


def photos(data: Path, n: int, into: Path) -> Path:
    """A folder of the first n/2 cats and n/2 dogs (symlinks), split 80/10/10 by tlpipe."""
    for cls in ("cat", "dog"):
        (into / cls).mkdir(parents=True)
        for p in sorted((data / "train" / cls).glob("*.jpg"))[: n // 2]:
            (into / cls / p.name).symlink_to(p)
    return into


def rate(base: str, weights: str, data: Path, runtime: str, cache: Path) -> tuple[float, str]:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.store.features import read_attrs

    t = time.perf_counter()
    out = extract(ExtractConfig(base=base, data=str(data), weights=weights, cache_dir=cache, batch_size=32,
                                progress=False, runtime=runtime, force=True, resume=False))
    wall = time.perf_counter() - t
    a = read_attrs(out)
    n = sum(a["counts"].values())
    what = (f"{n} images, {a['feature_size']} features, runtime {a['runtime']} {a['precision']}, "
            f"extract {a['extract_seconds']:.1f} s (wall {wall:.1f} s)")
    return n / a["extract_seconds"], what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runtime", default="keras")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    data = require(args.data, "cats_vs_dogs_small")
    tmp = Path(tempfile.mkdtemp(prefix="bench_hub_"))
    try:
        images = photos(data, args.images, tmp / "images")
        preset_root = tmp / "presets"
        dinov2_small_preset(preset_root)
        print(machine_line())
        results = {}
        for base, weights in (("mobilenet_0.75", "none"), ("hub:dinov2_small", str(preset_root))):
            best = None
            for i in range(args.repeat):
                r, what = rate(base, weights, images, args.runtime, tmp / f"cache_{i}")
                print(f"  {base:18s} {r:7.1f} images/s  ({what}; load {load()})", flush=True)
                best = max(best or 0.0, r)
            results[base] = best
        ratio = results["mobilenet_0.75"] / results["hub:dinov2_small"]
        print(f"best: mobilenet_0.75 {results['mobilenet_0.75']:.1f} images/s, hub:dinov2_small "
              f"{results['hub:dinov2_small']:.1f} images/s: MobileNet-0.75 is {ratio:.1f}x faster "
              f"(load {load()})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
