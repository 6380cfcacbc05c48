"""A fitted head as built-in Keras layers (what ``tlpipe export`` and ``fine-tune`` put on top of a base)."""

from __future__ import annotations

import numpy as np


def logistic_layers(model, n_classes: int, dim: int):
    """Fold the StandardScaler into the logistic regression: one ``Dense(K, softmax)`` layer."""
    import keras

    scaler, lr = model.steps[0][1], model.steps[-1][1]
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(dim)
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(dim)
    coef, icpt = np.asarray(lr.coef_, np.float64), np.asarray(lr.intercept_, np.float64)
    classes = [int(c) for c in lr.classes_]
    W = np.zeros((dim, n_classes))
    b = np.full(n_classes, -1e4)  # classes absent from train: probability 0
    if coef.shape[0] == 1:  # binary: softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)]
        pairs = [(classes[0], np.zeros(dim), 0.0), (classes[1], coef[0], icpt[0])]
    else:
        pairs = [(c, coef[i], icpt[i]) for i, c in enumerate(classes)]
    for c, w, bias in pairs:
        W[:, c] = w / scale
        b[c] = bias - float(np.dot(mean / scale, w))
    dense = keras.layers.Dense(n_classes, activation="softmax", name="logistic")
    dense.build((None, dim))
    dense.set_weights([W.astype("float32"), b.astype("float32")])
    return dense
