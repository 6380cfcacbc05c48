""""Cache once, fit many": tlpipe extract + fit_head vs the tutorials' frozen-base model.fit.

tlpipe side: ``extract`` (JPEGs -> HDF5 features, once) then ``fit_head(head="logistic")``.
Tutorial side (as in the TensorFlow / Keras transfer-learning tutorials): images read with
``keras.utils.image_dataset_from_directory`` and decoded again every epoch, a frozen base
(same weights) + GlobalAveragePooling2D + Dropout(0.2) + Dense(1) trained with
``model.fit`` for 10 epochs (Adam, learning rate 1e-4, binary cross-entropy on logits),
no augmentation (augmentation would only make the tutorial slower).  Same images: the
folder's train/ and val/ splits.  Both sides are timed wall-clock, model build included.

    python benchmarks/bench_tutorial.py                    # defaults read ../shared
    python benchmarks/bench_tutorial.py --epochs 10 --lr 1e-4 --data DIR --weights DIR

Printed: each side's seconds and val accuracy, and the time ratio tlpipe / tutorial.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, DEFAULT_WEIGHTS, load, machine_line, require  # noqa: E402


def run_tlpipe(args, data: Path, tmp: Path) -> dict:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.fit_head import FitConfig, fit_head

    t0 = time.perf_counter()
    h5 = extract(ExtractConfig(base=args.base, data=str(data), weights=args.weights,
                               out=tmp / "features.h5", force=True, resume=False, progress=False))
    t1 = time.perf_counter()
    head_dir = fit_head(FitConfig(features=[h5], head=args.head, out=tmp / "head"))
    t2 = time.perf_counter()
    metrics = json.loads((Path(head_dir) / "metrics.json").read_text())
    return {"seconds": t2 - t0, "extract_seconds": t1 - t0, "fit_seconds_wall": t2 - t1,
            "fit_seconds": metrics.get("fit_seconds"), "val_accuracy": metrics["val"]["accuracy"],
            "load": load()}


def run_tutorial(args, data: Path) -> dict:
    import keras

    from pipeline.nets.backbones import get_backbone
    from pipeline.nets.weights import parse_weights

    backbone = get_backbone(args.base)
    size = backbone.input_size
    weights = parse_weights(args.weights, backbone)
    t0 = time.perf_counter()
    kw = dict(image_size=(size, size), batch_size=32, label_mode="binary", seed=0)
    train_ds = keras.utils.image_dataset_from_directory(str(data / "train"), shuffle=True, **kw)
    val_ds = keras.utils.image_dataset_from_directory(str(data / "val"), shuffle=False, **kw)
    try:  # the tutorials' tf.data tuning
        import tensorflow as tf

        train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
        val_ds = val_ds.prefetch(tf.data.AUTOTUNE)
    except ImportError:  # pragma: no cover
        pass
    constructor = getattr(keras.applications, backbone.constructor)
    base = constructor(include_top=False, weights=str(weights) if weights else None,
                       input_shape=(size, size, 3), **backbone.kwargs)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = backbone.preprocess_input(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(args.lr),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    hist = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=2)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "epochs": args.epochs, "val_accuracy": float(hist.history["val_accuracy"][-1]),
            "best_val_accuracy": float(max(hist.history["val_accuracy"])), "load": load()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train/ and val/ class subfolders")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--base", default="mobilenet_0.75")
    ap.add_argument("--head", default="logistic")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--skip-tutorial", action="store_true", help="only time the tlpipe side")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    data = require(args.data, "image folder")
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        print(f"SKIP: {data} has no train/ and val/ folders")
        return 0
    if args.weights not in ("imagenet", "none"):
        require(args.weights, "weights")
    print(machine_line())
    print(f"base={args.base} data={data} {load()}")
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-bench-tutorial-"))
    try:
        ours = run_tlpipe(args, data, tmp)
        print(f"tlpipe   : {ours['seconds']:7.1f} s (extract {ours['extract_seconds']:.1f} s + "
              f"{args.head} head {ours['fit_seconds_wall']:.1f} s)  val accuracy {ours['val_accuracy']:.4f}  "
              f"{ours['load']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"base": args.base, "tlpipe": ours}
    if not args.skip_tutorial:
        tut = run_tutorial(args, data)
        print(f"tutorial : {tut['seconds']:7.1f} s ({args.epochs} epochs of model.fit)  "
              f"val accuracy {tut['val_accuracy']:.4f} (best epoch {tut['best_val_accuracy']:.4f})  "
              f"{tut['load']}", flush=True)
        result["tutorial"] = tut
        result["time_ratio"] = round(ours["seconds"] / tut["seconds"], 3)
        print(f"time ratio tlpipe / tutorial: {result['time_ratio']:.3f}  "
              f"val accuracy {ours['val_accuracy']:.4f} vs {tut['val_accuracy']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
