"""Images for the training loop: decoded by threads (kept in memory within a budget), served as
seeded, resumable epochs of batches, and scored by a model.

The data the image-training stages (``fine-tune``, ``baseline``) train on; ``views`` serves cached
activations through the same ``epoch_batches``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from pipeline.data.sources import decode_item
from pipeline.heads.metrics import normalise_proba

MEMO_BYTES = 2 << 30  # decoded training images are kept in memory up to this size


class Images:
    """Decode items at one size with threads; keep decoded images in memory up to a budget."""

    def __init__(self, items: list, size: int, workers: int, memo: bool):
        self.items, self.size = items, size
        self.pool = ThreadPoolExecutor(workers or max(1, min(4, os.cpu_count() or 1)))
        self.memo: dict[int, np.ndarray] | None = {} if memo else None

    def get(self, idx: np.ndarray) -> np.ndarray:
        """``uint8[len(idx), S, S, 3]`` of the items at ``idx``."""

        def one(i: int) -> np.ndarray:
            if self.memo is not None and i in self.memo:
                return self.memo[i]
            arr = decode_item(self.items[i], self.size)
            if self.memo is not None:
                self.memo[i] = arr
            return arr

        return np.stack(list(self.pool.map(one, [int(i) for i in idx])))

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def epoch_batches(n: int, batch_size: int, epoch: int, order: Callable[[int], Any], batch: Callable[[Any, int], Any]):
    """A ``keras.utils.PyDataset`` of ``ceil(n / batch_size)`` batches per epoch, starting at ``epoch``:
    ``order(epoch)`` draws the epoch's order (seeded by the epoch, so a resumed run sees what an
    uninterrupted one would), ``batch(order, i)`` builds batch ``i`` from it."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = epoch
            self.order = order(epoch)

        def __len__(self):
            return math.ceil(n / batch_size)

        def __getitem__(self, i):
            return batch(self.order, i)

        def on_epoch_end(self):
            self.epoch += 1
            self.order = order(self.epoch)

    return Batches()


def image_batches(images: Images, labels: np.ndarray, rows: np.ndarray, batch_size: int, shuffle: bool,
                  seed: int, epoch: int = 0):
    """A ``keras.utils.PyDataset`` of ``(uint8 images, labels)`` over ``rows``; reshuffled per epoch
    (``seed`` + epoch), so a resumed run sees the same order as an uninterrupted one."""

    def order(e):
        return np.random.default_rng([seed, e]).permutation(rows) if shuffle else rows

    def batch(drawn, i):
        idx = drawn[i * batch_size:(i + 1) * batch_size]
        return images.get(idx), labels[idx].astype("int32")

    return epoch_batches(len(rows), batch_size, epoch, order, batch)


def predict_proba(model, images: Images, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """``model``'s probabilities (float64, normalised) on the images of ``rows``, batch by batch."""
    out = []
    for s in range(0, len(rows), batch_size):
        out.append(np.asarray(model.predict_on_batch(images.get(rows[s:s + batch_size])), np.float64))
    p = np.concatenate(out) if out else np.zeros((0, 1))
    return normalise_proba(p)
