"""The features-file schema: its version, its attributes, and the fingerprint that says what made it.

Layout of a features file (schema 1)::

    /<split>/features  float32 [N, D]     split in train, val, test
    /<split>/labels    int64   [N]
    /<split>/ids       str     [N]        relative file path or tfds id
    /<split>_view<k>/  the same, for augmented view k of the split's images (``extract --views``;
                       same ids and order as ``/<split>``; pipeline.data.views)

With ``extract --layers blocks|NAMES`` the features matrix holds several pooled depths side by side:
attributes ``depths`` and ``depth_dims`` (JSON lists) name them and give their widths, in column order
(pipeline.nets.depths.depth_slices); files with ``--layers last`` have neither.
    attrs: see ``static_attrs`` (the settings and the listed data), ``runtime_attrs`` (where the
           features were computed), ``result_attrs`` (rows, skipped inputs, timings) and, for a shard
           file, ``shard_attrs``.

The fingerprint (``extraction_fingerprint`` over ``fingerprint_fields``) is what a rerun compares
to decide that a file is up to date: changing its fields makes every user's cache stale.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pipeline

SCHEMA_VERSION = 1
REQUIRED_ATTRS = ("schema_version", "base", "weights", "input_size", "pooling", "data_source",
                  "split_spec", "class_names", "fingerprint", "source_fingerprint", "feature_size")
JSON_ATTRS = ("class_names", "counts", "skipped", "splits", "constructor_kwargs", "depths", "depth_dims")
SHARD_ATTRS = ("shard_index", "shard_count", "shard_ranges")


def tlpipe_version() -> str:
    """The version written into fingerprints and attributes (read at call time: tests patch it)."""
    return pipeline.__version__


def extraction_fingerprint(**fields: Any) -> str:
    """sha256 over everything that determines the features (base, weights, data, split...)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def preprocessing_name(backbone: Any) -> str:
    """``keras.applications.<module>.preprocess_input``, or a hub base's image converter (``backbone.preprocessing``)."""
    return backbone.preprocessing


def depth_fields(layers: tuple[str, ...] | None = None, views: int = 0) -> dict[str, Any]:
    """The depths and views as fingerprint fields: only when not the default (``--layers last``,
    no views), so that every file made before they existed keeps its fingerprint."""
    out: dict[str, Any] = {"layers": list(layers)} if layers else {}
    if views:
        out["views"] = int(views)
    return out


def fingerprint_fields(backbone: Any, weights_id: tuple[str, str], size: int, pooling: str, source: Any,
                       runtime: tuple[str, str] = ("keras", "f32"), layers: tuple[str, ...] | None = None,
                       views: int = 0) -> dict[str, Any]:
    """What determines the features: base, weights, input size, pooling, preprocessing, data, and the
    runtime and precision that computed them (a bf16 cache is never taken for an f32 one); the pooled
    depths and the views only when not the default (``depth_fields``)."""
    from pipeline.data.images import RESIZE_METHOD

    return dict(**depth_fields(layers, views), base=backbone.name, weights=weights_id[0], weights_sha256=weights_id[1], input_size=size,
                pooling=pooling, preprocessing=preprocessing_name(backbone),
                source_fingerprint=source.fingerprint, split=source.split_spec, version=tlpipe_version(),
                resize=RESIZE_METHOD, runtime=runtime[0], precision=runtime[1])


def fingerprint(backbone: Any, weights_id: tuple[str, str], size: int, pooling: str, source: Any,
                runtime: tuple[str, str] = ("keras", "f32"), layers: tuple[str, ...] | None = None,
                views: int = 0) -> str:
    """The features file's fingerprint (see ``fingerprint_fields``)."""
    return extraction_fingerprint(**fingerprint_fields(backbone, weights_id, size, pooling, source, runtime,
                                                       layers, views))


def settings(backbone: Any, weights_id: tuple[str, str], size: int, pooling: str, limit: int | None,
             source: Any, fingerprint_: str, runtime: tuple[str, str] = ("keras", "f32"),
             layers: tuple[str, ...] | None = None, views: int = 0) -> dict[str, Any]:
    """What a features file records about how it was made (compared with an existing file)."""
    from pipeline.data.images import RESIZE_METHOD

    return {"base": backbone.name, "weights": weights_id[0], "weights_sha256": weights_id[1],
            "input_size": size, "pooling": pooling, "data_source": source.spec,
            "split_spec": source.split_spec, "split_rule": source.split_rule,
            "source_fingerprint": source.fingerprint, "limit": limit or 0, "tlpipe_version": tlpipe_version(), "resize": RESIZE_METHOD,
            "runtime": runtime[0], "precision": runtime[1], **depth_fields(layers, views), "fingerprint": fingerprint_}


def static_attrs(backbone: Any, base_requested: str, size: int, pooling: str, source: Any, fingerprint_: str,
                 limit: int | None, batch_size: int, layers_spec: str = "last", *,
                 layers: tuple[str, ...] | None = None, views: int = 0) -> dict[str, Any]:
    """The attributes fixed by the settings and the listed data (``layers``: the ``--layers`` request,
    and ``views``, recorded only when not the default)."""
    from pipeline.data.images import RESIZE_METHOD

    return {
        "schema_version": SCHEMA_VERSION,
        "base": backbone.name,
        "base_requested": base_requested,
        "constructor": backbone.constructor_path,
        "constructor_kwargs": json.dumps(backbone.kwargs),
        "input_size": size,
        "pooling": pooling,
        "preprocessing": preprocessing_name(backbone),
        "resize": RESIZE_METHOD,
        "data_source": source.spec,
        "data_kind": source.kind,
        "split_spec": source.split_spec,
        "source_fingerprint": source.fingerprint,
        "split_rule": source.split_rule,
        "fingerprint": fingerprint_,
        "class_names": json.dumps(source.class_names),
        "num_classes": len(source.class_names),
        "limit": limit or 0,
        "batch_size": batch_size,
        "tlpipe_version": tlpipe_version(),
        **({"layers": str(layers_spec)} if layers else {}),
        **({"views": int(views)} if views else {}),
    }


def runtime_attrs(rt: Any) -> dict[str, Any]:
    """The attributes that depend on the runtime (a ``pipeline.stage1.runtime.Runtime``: where it ran)."""
    import h5py
    import keras

    depths = getattr(rt, "depths", None)  # [(layer, width)] of a multi-depth extractor
    extra = {} if not depths else {"depths": json.dumps([str(d) for d, _ in depths]),
                                   "depth_dims": json.dumps([int(w) for _, w in depths])}
    return {**extra, "weights": rt.weights.label, "weights_sha256": rt.weights.sha256, "feature_size": int(rt.feature_size),
            "mixed_precision": rt.precision == "fp16", "runtime": rt.name, "precision": rt.precision,
            "openvino_version": _version("openvino") if rt.name == "openvino" else "",
            "keras_version": keras.__version__, "keras_backend": keras.backend.backend(),
            "tensorflow_version": _version("tensorflow"), "h5py_version": h5py.__version__}


def shard_attrs(shard: tuple[int, int] | None, ranges: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """A shard file's own attributes (none for a whole features file)."""
    if shard is None:
        return {}
    return {"shard_index": shard[0], "shard_count": shard[1], "shard_ranges": json.dumps(ranges)}


def result_attrs(counts: dict[str, int], skipped: list[dict], elapsed: float, timing: dict) -> dict[str, Any]:
    """The attributes of what a run produced: rows, skipped inputs, timings."""
    return {
        "splits": json.dumps(list(counts)),
        "counts": json.dumps(counts),
        "skipped_count": len(skipped),
        "skipped": json.dumps(skipped),
        "extract_seconds": round(elapsed, 3),
        "images_per_second": round(sum(counts.values()) / elapsed, 2) if elapsed > 0 else 0.0,
        "timing": json.dumps(timing),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # pragma: no cover - e.g. KERAS_BACKEND=jax without TF
        return ""
