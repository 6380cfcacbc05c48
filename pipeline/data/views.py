"""Augmented views for stage one (``tlpipe extract --views K``).

With ``K`` views, each training image is also stored ``K`` more times, transformed: view 1 is its
mirror image, views 2.. are small crops (about 88 % of the side, at a corner or the centre, mirrored
on even views), resized back to the input size.  Val and test get their mirror (view 1) only: the
test-time view that a head may average with the clean one.  A view is stored as its own split,
``<split>_view<k>``, with the same ids as the clean rows (so grouped cross-validation keeps a photo
and its views in one fold); ``train``/``val``/``test`` themselves are unchanged.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pipeline.core.errors import UsageError

MAX_VIEWS = 8
CROP = 0.88  # side of the crop views, relative to the image


def view_split(split: str, k: int) -> str:
    """The split holding view ``k`` of ``split``."""
    return f"{split}_view{k}"


def parse_view_split(name: str) -> tuple[str, int]:
    """``("train", 2)`` for ``train_view2``; ``(name, 0)`` for a plain split."""
    base, sep, k = name.rpartition("_view")
    return (base, int(k)) if sep and k.isdigit() else (name, 0)


def check_views(views: int) -> None:
    """One line for a bad ``--views``."""
    if not 0 <= int(views) <= MAX_VIEWS:
        raise UsageError(f"--views must be between 0 and {MAX_VIEWS}, not {views}")


def views_of(split: str, views: int) -> list[str]:
    """The view splits stored for ``split``: K for train, the mirror for val and test."""
    if not views:
        return []
    return [view_split(split, k) for k in range(1, (views if split == "train" else 1) + 1)]


class ViewSource:
    """A ``Source`` whose splits include the view splits (the items of the clean split, again)."""

    def __init__(self, source: Any, views: int):
        self._source = source
        self.views = int(views)
        base = list(source.splits)
        extra = [v for s in base for v in views_of(s, self.views)]
        self.counts = {**{s: source.counts[s] for s in base},
                       **{v: source.counts[parse_view_split(v)[0]] for v in extra}}
        self._splits = base + extra

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def iter_items(self, split: str, start: int = 0) -> Iterator[Any]:
        return self._source.iter_items(parse_view_split(split)[0], start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def with_views(source: Any, views: int) -> Any:
    """``source`` itself (no views) or a ``ViewSource``."""
    return ViewSource(source, views) if views else source


def apply_view(image: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (1: mirror; 2..: a mirrored-or-not corner/centre crop) of a decoded uint8 image."""
    if k <= 0:
        return image
    if k == 1:
        return np.ascontiguousarray(image[:, ::-1])
    from pipeline.data.images import resize_array

    size = image.shape[0]
    side = max(1, int(round(size * CROP)))
    spare = size - side
    corners = [(spare // 2, spare // 2), (0, 0), (0, spare), (spare, 0), (spare, spare)]
    top, left = corners[(k - 2) % len(corners)]
    crop = image[top:top + side, left:left + side]
    if k % 2 == 0:
        crop = crop[:, ::-1]
    return resize_array(np.ascontiguousarray(crop), size)
