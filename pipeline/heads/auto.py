"""The ``auto`` head: one recipe on a features file with several depths and (optionally) views.

1. Each stored depth is standardised on its own (pipeline.heads.depths.DepthScaler).
2. Depths: with ``--layers all`` (the default) greedy forward selection by leave-one-group-out
   ridge accuracy on train chooses them; with explicit names those are used.
3. Classifier: one-vs-rest ridge regression on the chosen depths (a linear head), its strength
   chosen by exact leave-one-photo-out CV on train (a photo and its views held out together),
   probabilities by a softmax whose temperature minimises the held-out log loss.  Ridge, not
   logistic regression: its CV is closed-form (one eigendecomposition for every strength and every
   held-out photo), so choosing depths costs seconds where logistic CV costs minutes; on trashnet
   it scored as well (benchmarks/RESULTS.md).
4. Test-time views: when the features file holds mirror views of val/test, the mean of the
   probabilities of the image and its mirror is used if grouped CV on train prefers it.

Nothing is chosen on val or test.  ``chosen``/``tuning`` say what was picked and why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UsageError
from pipeline.heads.depths import DepthScaler, select_depths
from pipeline.heads.ensemble import EnsembleHead
from pipeline.heads.models import Head, HeadParams
from pipeline.store.features import load_views, split_size

__all__ = ["AutoHead", "EXTRA_HEADS", "get_any_head", "load_any_head", "load_views", "parse_subset",
           "columns", "subset_features", "sizes_of", "by_size", "compact_depths"]

log = logging.getLogger(__name__)



def parse_subset(layers: str | list[str] | None, stored: list[str]) -> tuple[list[str], bool]:
    """``(depths, choose)``: the depths a head may use and whether CV chooses among them."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
        return list(stored), len(stored) > 1
    names = [n.strip() for n in (layers.split(",") if isinstance(layers, str) else layers) if n.strip()]
    out = []
    for name in names:
        hits = _matches(name, stored)
        if not hits:
            raise UsageError(f"--layers: '{name}' is not stored in the features file; stored depths: "
                             f"{', '.join(stored)}")
        out.extend(h for h in hits if h not in out)
    return [n for n in stored if n in out], False


def _matches(name: str, stored: list[str]) -> list[str]:
    """The stored depths ``name`` stands for: itself, or the first ``NAME_...`` (``conv_pw_7`` for
    ``conv_pw_7_relu``); for files fused at several input sizes, that depth at every size unless
    ``NAME@SIZE`` names one."""
    depth, size = split_size(name)
    pairs = [(s, *split_size(s)) for s in stored]
    pairs = [p for p in pairs if size is None or p[2] == size]
    exact = [s for s, d, _ in pairs if d == depth]
    if exact:
        return exact
    out, seen = [], set()
    for s, d, at in pairs:
        if d.startswith(depth + "_") and at not in seen:
            out.append(s)
            seen.add(at)
    return out


def sizes_of(names: list[str]) -> list[int]:
    """The input sizes of depths named ``NAME@SIZE`` (``[]`` for depths of one file), in order."""
    return list(dict.fromkeys(size for size in (split_size(n)[1] for n in names) if size is not None))


def by_size(names: list[str]) -> dict[str, list[str]]:
    """``{"all@SIZE": [every depth at SIZE]}`` for depths of several input sizes (``{}`` otherwise)."""
    sizes = sizes_of(names)
    if len(sizes) < 2:
        return {}
    return {f"all@{size}": [n for n in names if split_size(n)[1] == size] for size in sizes}


def compact_depths(depths: list[str], stored: list[str]) -> str:
    """``conv_pw_7_relu,conv_pw_13_relu``; depths at several sizes grouped by size, ``all 13`` for every
    stored depth at that size: ``224 px: all 13; 320 px: conv_pw_12_relu,conv_pw_13_relu``."""
    sizes = sizes_of(depths)
    if not sizes:
        return ",".join(depths)
    parts = []
    for size in sizes:
        here = [split_size(n)[0] for n in depths if split_size(n)[1] == size]
        every = [n for n in stored if split_size(n)[1] == size]
        parts.append(f"{size} px: " + (f"all {len(here)}" if len(here) == len(every) else ",".join(here)))
    return "; ".join(parts)


def columns(layout: list[tuple[str, int]], X: np.ndarray) -> dict[str, np.ndarray]:
    """``{depth: X[:, its columns]}``."""
    out, start = {}, 0
    for name, width in layout:
        out[name] = X[:, start:start + width]
        start += width
    if start != X.shape[1]:
        raise UsageError(f"the features have {X.shape[1]} columns but the stored depths add up to {start}")
    return out


class AutoHead(Head):
    """Per-depth standardisation; depths, ridge strength and test-time mirror chosen by CV on train."""

    name = "auto"
    description = ("ridge classifier on per-depth standardised pooled depths; depths, ridge strength and "
                   "test-time mirror chosen by leave-one-photo-out cross-validation on train")
    file = "head.joblib"

    def __init__(self, n_classes: int, params: HeadParams):
        super().__init__(n_classes, params)
        self.layout: list[tuple[str, int]] = []
        self.layers: str | list[str] | None = "all"
        self.views: dict[str, list[np.ndarray]] = {}
        self.depth_rows: list[dict[str, Any]] = []
        self.names: list[str] = []
        self.tta = False

    def configure(self, layout: list[tuple[str, int]], layers: str | list[str] | None = "all",
                  views: dict[str, list[np.ndarray]] | None = None) -> None:
        """The stored depths (``[(name, width)]``), the ``--layers`` request and the view rows per split."""
        self.layout = list(layout)
        self.layers = layers
        self.views = views or {}

    # ------------------------------------------------------------------ fit
    def fit(self, train, val=None):
        X, y = train
        if not self.layout:
            self.layout = [("last", X.shape[1])]
        names, choose = parse_subset(self.layers, [n for n, _ in self.layout])
        views = self.views.get("train", [])
        Xall = np.concatenate([X, *views])
        yall = np.tile(y, len(views) + 1)
        groups = np.tile(np.arange(len(y)), len(views) + 1)
        self.scaler = DepthScaler(names).fit(columns(self.layout, Xall))
        t0 = time.perf_counter()
        how = self._choose_depths(Xall, yall, groups, names, choose, bool(views))
        select_seconds = time.perf_counter() - t0
        self.scaler.names = list(self.names)
        Z = self.scaler.transform(columns(self.layout, Xall))
        rows, lam, tta, cv, temperature, loss = self._choose_ridge(Z, yall, groups, bool(views))
        self._fit_ridge(Z, yall, lam, temperature)
        self.tta = tta
        sized = {"input_sizes": sizes_of(self.names)} if sizes_of(names) else {}  # several sizes: those chosen
        self.chosen = {"depths": self.names, "ridge": lam, "test_time_mirror": tta, "train_views": len(views),
                       "temperature": temperature, **sized}
        self.tuning = {"method": "leave-one-photo-out CV on train (a photo and its views held out together)",
                       "param": "ridge", "chosen": lam, "cv_accuracy": cv, "cv_log_loss": loss, "depths": self.names,
                       "depth_choice": how, "depth_select_seconds": round(select_seconds, 2),
                       "test_time_mirror": tta, "train_views": len(views), "temperature": temperature,
                       **sized, "val_used_for_tuning": False}
        log.info("auto: depths %s, ridge %.3g, test-time mirror %s (leave-one-photo-out accuracy %.4f on train)",
                 compact_depths(self.names, [n for n, _ in self.layout]), lam, "on" if tta else "off", cv)
        return rows

    def _choose_depths(self, Xall, yall, groups, names, choose: bool, views: bool) -> dict[str, Any]:
        if not choose:
            self.names = names
            return {"method": "given by --layers" if self.layers not in (None, "all") else "the only stored depth"}
        Z = self.scaler.transform(columns(self.layout, Xall))
        sel = select_depths(Z, yall, groups, names, [dict(self.layout)[n] for n in names], self.n_classes,
                            positions=(0, 1) if views else (0,), extra=by_size(names))
        self.names = sel.chosen
        self.depth_rows = ([{"step": 0, "depth": n, "set": n, "cv_accuracy": a, "kind": "alone"}
                            for n, a in sel.alone.items()]
                           + [{"step": i + 1, "depth": s["added"], "set": "+".join(s["set"]),
                               "cv_accuracy": s["cv_accuracy"], "kind": "set"} for i, s in enumerate(sel.steps)])
        how = {"method": sel.how, "cv_accuracy": round(sel.cv_accuracy, 4), "alone": sel.alone, "steps": sel.steps}
        if by_size(names):  # features of one base at several input sizes: the sizes were chosen too
            how["input_sizes"] = sizes_of(self.names)
        return how

    def _choose_ridge(self, Z, y, groups, views: bool):
        """Ridge strength and test-time mirror by exact leave-one-photo-out CV; the softmax temperature
        that minimises the held-out log loss."""
        from pipeline.heads.depths import LAMBDAS, group_matrix, logo_scores

        G = group_matrix(groups)
        yg = y[G[:, 0]]
        rows, best = [], None
        for tta in ([False, True] if views else [False]):
            held: dict[float, np.ndarray] = {}
            accs = logo_scores(Z, y, G, self.n_classes, scores_out=held, positions=(0, 1) if tta else (0,))
            for lam, acc in zip(LAMBDAS, accs):
                rows.append({"param": "ridge" + (" +mirror" if tta else ""), "value": lam, "cv_accuracy": float(acc),
                             "cv_log_loss": None, "train_accuracy": None, "train_loss": None})
                if best is None or acc > best[0] + 1e-9:
                    best = (float(acc), lam, tta, held[lam])
        temperature, loss = _temperature(best[3], yg)
        return rows, best[1], best[2], best[0], temperature, loss

    def _fit_ridge(self, Z, y, lam: float, temperature: float) -> None:
        from sklearn.linear_model import Ridge

        from pipeline.heads.depths import ridge_alpha

        Y = np.eye(self.n_classes)[y]
        model = Ridge(alpha=ridge_alpha(Z, lam), fit_intercept=True).fit(Z, Y)
        self.coef = (model.coef_.T * temperature).astype(np.float64)  # [D, k]
        self.intercept = (model.intercept_ * temperature).astype(np.float64)

    # ------------------------------------------------------------------ predict / save
    def predict_proba(self, X, views: list[np.ndarray] | None = None):
        proba = self._proba(X)
        if self.tta and views:
            proba = (proba + self._proba(views[0])) / 2
        return proba

    def _proba(self, X):
        Z = self.scaler.transform(columns(self.layout, np.asarray(X)))
        return _softmax(Z.astype(np.float64) @ self.coef + self.intercept)

    def linear(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(W, b, depths)``: the head as one affine map on the chosen depths' raw pooled features."""
        W, b = self.coef, self.intercept
        scale = np.concatenate([self.scaler.scale[n] for n in self.names]).astype(np.float64)
        mean = np.concatenate([self.scaler.mean[n] for n in self.names]).astype(np.float64)
        Ws = W * scale[:, None]
        return Ws.astype(np.float32), (b - mean @ Ws).astype(np.float32), list(self.names)

    def save(self, folder):
        import joblib

        path = Path(folder) / self.file
        joblib.dump({"head": self.name, "n_classes": self.n_classes, "chosen": self.chosen, "tuning": self.tuning,
                     "coef": self.coef, "intercept": self.intercept, "scaler": self.scaler.to_json(),
                     "layout": self.layout,
                     "names": self.names, "tta": self.tta}, path)
        return path

    @classmethod
    def load(cls, folder):
        import joblib

        data = joblib.load(Path(folder) / cls.file)
        head = cls(data["n_classes"], HeadParams())
        head.coef, head.intercept = data["coef"], data["intercept"]
        head.chosen, head.tuning = data["chosen"], data.get("tuning", {})
        head.scaler = DepthScaler.from_json(data["scaler"])
        head.layout = [tuple(x) for x in data["layout"]]
        head.names, head.tta = list(data["names"]), bool(data["tta"])
        return head


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _temperature(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The softmax temperature for ridge scores minimising the log loss of held-out scores."""
    best = None
    for t in np.logspace(0, 2.5, 31):
        p = _softmax(scores * t)
        loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1)).mean())
        if best is None or loss < best[1]:
            best = (float(t), loss)
    return round(best[0], 4), round(best[1], 4)


def subset_features(fs: Any, layers: str | list[str] | None) -> list[str]:
    """Keep only the ``--layers`` depths' columns in ``fs`` (for heads that do not choose depths);
    returns the depths kept."""
    from dataclasses import replace as dc_replace

    from pipeline.nets.depths import depths_of

    layout = depths_of(fs.attrs)
    names, _ = parse_subset(layers, [n for n, _ in layout])
    if names == [n for n, _ in layout]:
        return names
    for key, split in list(fs.splits.items()):
        parts = columns(layout, split.X)
        fs.splits[key] = dc_replace(split, X=np.concatenate([parts[n] for n in names], axis=1))
    return names


EXTRA_HEADS: dict[str, type[Head]] = {AutoHead.name: AutoHead, EnsembleHead.name: EnsembleHead}


def get_any_head(name: str) -> type[Head]:
    """A head of ``pipeline.heads.models`` or one of the depth-aware heads (auto, ensemble)."""
    from pipeline.heads.models import HEADS, get_head

    key = name.strip().lower()
    if key in EXTRA_HEADS:
        return EXTRA_HEADS[key]
    if key not in HEADS:
        import difflib

        names = [*HEADS, *EXTRA_HEADS]
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown head '{name}'; {hint}valid heads: {', '.join(names)}")
    return get_head(key)


def load_any_head(folder: str | Path) -> Head:
    """Load a fitted head of any kind from its folder."""
    import json

    from pipeline.heads.models import load_head

    folder = Path(folder)
    meta = folder / "model" / "head.json" if (folder / "model" / "head.json").is_file() else folder / "head.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("head") in EXTRA_HEADS:
            return EXTRA_HEADS[info["head"]].load(meta.parent)
    return load_head(folder)
