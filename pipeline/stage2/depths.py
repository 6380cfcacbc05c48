"""Stage two on features files with several pooled depths (``extract --layers``) or stored views
(``extract --views``): which depths a head sees, how it trains on the views and predicts with them.

* ``--layers all`` (default): the auto head chooses among every stored depth by CV on train; other
  heads see every stored depth.  ``--layers NAME,NAME``: only those depths' columns.
* Several features files of one base at different input sizes (``--features m224.h5 --features
  m320.h5``): the auto head sees every stored depth at every size (``NAME@SIZE``) and chooses sizes
  and depths together; other heads fuse them as before (``pipeline.store.features.fuse``).
* Views: every head trains on the clean rows and their views, with the views of one photo in one CV
  fold (grouped CV: otherwise CV scores a photo against its own mirror image), and scores a split
  with the mean of the probabilities of each image and its stored mirror.  The auto head decides by
  CV on train whether that mean helps (``test_time_mirror``); the others always use it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.heads.auto import columns, parse_subset
from pipeline.heads.models import Head
from pipeline.nets.depths import depths_of
from pipeline.store.features import FeatureSet, load_fused_views, load_views, read_attrs

log = logging.getLogger(__name__)

Views = dict[str, list[np.ndarray]]  # {split: [view 1 rows, view 2 rows, ...]} (view 1: the mirror)


def prepare_depths(fs: FeatureSet, head_cls: type[Head], layers: str, streamed: bool) -> tuple[dict[str, Any], Views]:
    """Which stored depths the head sees (``--layers``) and the stored views (in memory only).

    Heads other than auto get the columns of the requested depths only (features and views).
    Returns what evaluation.json records about depths ({} for a file of one depth) and the views."""
    stored = [n for n, _ in depths_of(fs.attrs)]
    requested = str(layers or "all").strip().lower() not in ("all", "")
    if len(fs.paths) > 1 and fs.attrs.get("input_sizes") and head_cls.name == "auto" and not streamed:
        # one base at several input sizes: every (depth, size) is a candidate of the auto head
        return ({"stored": stored, "requested": layers, "stored_input_sizes": list(fs.attrs["input_sizes"])},
                load_fused_views(fs.paths, fs.splits))
    if len(fs.paths) > 1 and head_cls.name == "auto" and any(depths_of(read_attrs(p)) != [("last", int(
            read_attrs(p)["feature_size"]))] for p in fs.paths):
        raise UsageError("--head auto chooses among the depths and input sizes of one base: these files hold "
                         f"other bases or weights ({fs.base}); give files of one base and weights at different "
                         "--input-size, or one file")
    if len(fs.paths) > 1 or stored == ["last"]:
        if requested:
            raise UsageError("--layers needs one features file extracted with --layers blocks or NAME,NAME")
        return {}, ({} if streamed or len(fs.paths) > 1 else load_views(fs.paths[0], fs.splits))
    if streamed:
        if requested:
            raise UsageError("--layers with a streamed fit is not supported; fit in memory (--no-stream)")
        return {"stored": stored, "requested": "all", "depths": stored, "how": "every stored depth (streamed)"}, {}
    views = load_views(fs.paths[0], fs.splits)
    if head_cls.name == "auto":
        return {"stored": stored, "requested": layers}, views
    layout = depths_of(fs.attrs)
    names, _ = parse_subset(layers, stored)
    if names != stored:
        def keep(X: np.ndarray) -> np.ndarray:
            parts = columns(layout, X)
            return np.concatenate([parts[n] for n in names], axis=1)

        for key, split in list(fs.splits.items()):
            fs.splits[key] = replace(split, X=keep(split.X))
        views = {key: [keep(v) for v in vs] for key, vs in views.items()}
    return {"stored": stored, "requested": layers, "depths": names,
            "how": "given by --layers" if requested else "every stored depth (depth choice: --head auto)"}, views


def fit(head: Head, fs: FeatureSet, views: Views, layers: str) -> list[dict]:
    """Fit ``head`` on train (and its views, grouped by photo); val is never used to choose anything."""
    train, val = fs.splits["train"], fs.splits["val"]
    if hasattr(head, "configure"):  # the auto head: the depth layout, --layers and the views
        head.configure(depths_of(fs.attrs), layers, views)
        return head.fit((train.X, train.y), (val.X, val.y))
    extra = views.get("train", [])
    if not extra:
        return head.fit((train.X, train.y), (val.X, val.y))
    X = np.concatenate([train.X, *extra])
    y = np.tile(train.y, len(extra) + 1)
    groups = np.tile(np.arange(len(train.y)), len(extra) + 1)  # a photo and its views in one fold
    log.info("%s: training on %d rows (%d photos x %d views), grouped CV", head.name, len(y), len(train.y),
             len(extra) + 1)
    return head.fit((X, y), (val.X, val.y), groups=groups)


def predict(head: Head, fs: FeatureSet, views: Views, name: str) -> np.ndarray:
    """Probabilities of split ``name``: with stored views, the mean over the image and its mirror
    (the auto head: only when CV on train chose it)."""
    X, mirror = fs.splits[name].X, views.get(name, [])[:1]
    if hasattr(head, "configure"):
        return head.predict_proba(X, views=mirror)
    proba = head.predict_proba(X)
    if mirror:
        proba = (proba + head.predict_proba(mirror[0])) / 2
    return proba


def record(depth_info: dict[str, Any], head: Head, views: Views) -> dict[str, Any] | None:
    """evaluation.json's ``depths``: the depths stored, asked for and used, how they were chosen,
    and the views (None: one depth and no views)."""
    if not depth_info and not views:
        return None
    keys = ("depths", "input_sizes", "test_time_mirror", "train_views") if views else ("depths", "input_sizes")
    out = {**depth_info, **{k: v for k, v in (head.chosen or {}).items() if k in keys}}
    if views and not hasattr(head, "configure"):
        out.update(train_views=len(views.get("train", [])), test_time_mirror=bool(views.get("val")))
    if "depths" in out and (head.tuning or {}).get("depth_choice"):
        out["how"] = head.tuning["depth_choice"].get("method", out.get("how"))
    return out
