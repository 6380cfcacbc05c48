"""What fine-tuning starts from: the kind of head, the pooled depths it reads and whether it predicts
with the mean over each image and its mirror, and the checks made on them before TensorFlow starts.

A head fitted on a features file of several depths (``extract --layers blocks|NAMES``) reads the
global pools of some layers of the base; fine-tuning rebuilds those pools from the image in one pass of
the base (``pipeline.nets.depth_graph.depth_trunk``), puts the fitted head on them (``dense``, ``logistic`` folded into one
``Dense``, ``auto`` as its affine map: per-depth standardisation folded in) and, when the head predicted
so, averages with the mirror image, so that the model at step 0 gives the head's probabilities.
Heads without layers to train through (``svm``, ``rbf-svm``, ``knn``, ``ensemble``) are refused.

``check_unfreeze`` validates ``--unfreeze`` from ``pipeline.stage3.unfreeze_table`` (no TensorFlow):
a wrong block or number is one line before TensorFlow is imported and before an existing output is
compared with this run's settings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import UsageError
from pipeline.nets.backbones import get_backbone
from pipeline.nets.depths import depths_of
from pipeline.stage3.unfreeze_table import UNFREEZE

FINE_TUNABLE = ("dense", "logistic", "auto")


@dataclass
class Start:
    """The head fine-tuning starts from."""

    kind: str  # dense | logistic | auto
    depths: list[str] | None  # the pooled depths it reads, in column order (None: the base's pooled output)
    mirror: bool  # it predicts with the mean of the image's and its mirror's probabilities

    def record(self) -> dict[str, Any]:
        """evaluation.json / model metadata fields (empty for a plain head)."""
        out: dict[str, Any] = {}
        if self.depths:
            out["depths"] = list(self.depths)
        if self.mirror:
            out["test_time_mirror"] = True
        return out


def read_start(head_dir: Path, model_dir: Path, info: dict[str, Any], attrs: dict[str, Any]) -> Start:
    """The head's kind, depths and mirror, from its folder (no TensorFlow); other heads: one line."""
    kind = check_kind(info)
    stored = [name for name, _ in depths_of(attrs)]
    used = _recorded_depths(Path(head_dir))
    if kind == "auto":
        from pipeline.heads.auto import load_any_head

        head = load_any_head(model_dir)
        depths, mirror = list(head.names), bool(head.tta)
    else:
        depths, mirror = list(used.get("depths") or stored), bool(used.get("test_time_mirror"))
    if stored == ["last"]:
        return Start(kind, None, mirror)
    unknown = [d for d in depths if d not in stored]
    if unknown:
        raise UsageError(f"the head reads depths {', '.join(unknown)} that its features file does not store "
                         f"({', '.join(stored)}): fit the head again")
    return Start(kind, depths, mirror)


def check_kind(info: dict[str, Any]) -> str:
    """The head's kind, if fine-tuning can start from it; else one line naming the heads it can."""
    kind = str(info.get("head"))
    if kind not in FINE_TUNABLE:
        raise UsageError(f"fine-tune starts from a dense, logistic or auto head (on any depths), not '{kind}', "
                         "which has no layers to train through the base; fit one of those on the same features")
    return kind


def _recorded_depths(head_dir: Path) -> dict[str, Any]:
    """evaluation.json's ``depths`` (which depths the head used, whether it predicted with the mirror)."""
    path = head_dir / "evaluation.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("depths") or {})


def check_unfreeze(base: str, spec: str, depths: list[str] | None) -> None:
    """One line for an ``--unfreeze`` that ``base`` (or the depths the head reads) cannot take."""
    text = str(spec).strip()
    name = get_backbone(base).name
    row = UNFREEZE.get(name)
    if text.lower() == "block" and row is not None and not row[1]:
        raise UsageError(f"{name} has no named blocks; give --unfreeze N or all")
    if text.lower() in ("all", "block"):
        return
    if re.fullmatch(r"\d+", text):
        n, most = int(text), _layers(row, depths)
        if not 1 <= n <= (most or n):
            where = f"{name} has {most} layers{' up to the depths the head reads' if depths else ''}; "
            raise UsageError(f"--unfreeze {n} is out of range: {where if most else ''}give "
                             f"{f'1..{most}' if most else '1 or more'}, a block name, or all")
        return
    if row is None:  # not in the table: checked on the built base
        return
    _, blocks, depth_at = row
    starts = dict(blocks)
    if text not in starts:
        raise UsageError(f"--unfreeze: unknown block '{text}' for {name}; valid blocks: "
                         f"{', '.join(b for b, _ in blocks)} (or a number of layers, or all)")
    reach = max((depth_at[d] for d in depths or () if d in depth_at), default=None)
    if reach is not None and starts[text] > reach:
        deepest = max((d for d in depths or () if d in depth_at), key=depth_at.__getitem__)
        can = [b for b, i in blocks if i <= reach]
        raise UsageError(f"--unfreeze {text}: the head reads depths up to {deepest}, which come before that "
                         f"block; blocks it can train: {', '.join(can)} (or a number of layers, or all)")


def _layers(row: tuple | None, depths: list[str] | None) -> int | None:
    """The layers ``--unfreeze N`` counts: the base's (its pooling included), or, for a head on pooled
    depths, the base's up to the deepest depth, its pools and their concatenation (None: not known)."""
    if row is None:
        return None
    if not depths:
        return row[0]
    at = [row[2][d] for d in depths if d in row[2]]
    return max(at) + len(depths) + (len(depths) > 1) if len(at) == len(depths) else None


def check_weights(attrs: dict[str, Any], weights: str | None) -> None:
    """``--weights`` (default: the features file's) resolved and compared with the features' (no TensorFlow)."""
    from pipeline.nets.weights import check_imagenet_reachable, weights_of_features

    backbone, resolved = weights_of_features(attrs, weights)
    check_imagenet_reachable(backbone, resolved)


def check_cached_views(start: Start, views: int | None) -> None:
    """``--views`` caches the bottom of one pass of the base; a head averaged with the mirror needs two."""
    if views and start.mirror:
        raise UsageError("--views with a head that predicts with the mean over each image and its mirror "
                         "(fitted on a features file with --views) is not supported yet; fine-tune without "
                         "--views, or fit the head on a file without views")


# ----------------------------------------------------------------------------- Keras (after the checks)


def head_layers(start: Start, model_dir: Path, k: int, dim: int):
    """The fitted head as Keras layers (features -> probabilities) and the width it reads."""
    import keras

    from pipeline.heads.folded import logistic_layers
    from pipeline.heads.models import load_head

    if start.kind == "auto":
        from pipeline.heads.auto import load_any_head

        W, b, _ = load_any_head(model_dir).linear()
        dense = keras.layers.Dense(W.shape[1], activation="softmax", name="auto_head")
        dense.build((None, W.shape[0]))
        dense.set_weights([W, b])
        return dense, int(W.shape[0])
    head = load_head(model_dir)
    if start.kind == "dense":
        return head.model, int(head.model.input_shape[-1])
    return logistic_layers(head.model, k, dim), dim
