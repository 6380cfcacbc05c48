"""Stage one's plan: every setting of an extraction resolved once, before any image is decoded.

``plan(cfg)`` checks the options, resolves the base, the weights (and their sha256 when known
without building the model), the input size, the runtime and precision (with the reason for the
choice), the output path, lists the data source and computes the item ranges this job covers.
Distributors (``pipeline.stage1.local``, ``pipeline.stage1.distribute_ray``) take a ``Plan``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError, TlpipeError, UsageError
from pipeline.core.safety import check_out_path
from pipeline.data.sources import Source, open_source
from pipeline.nets.backbones import Backbone, get_backbone
from pipeline.nets.hub import file_stem
from pipeline.stage1 import cluster
from pipeline.stage1.runtime import Choice, RuntimeSpec, resolve_choice
from pipeline.store import schema
from pipeline.store.shards import parse_shard, partition, shard_name
from pipeline.store.writer import guard_existing, up_to_date

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class ExtractConfig:
    """Everything ``extract`` needs; the CLI and DVC fill it from options / params.

    What: ``base``, ``weights``, ``input_size``, ``pooling``.  Data: ``data``, ``split``, ``limit``,
    ``tfds_data_dir``.  Output: ``out``, ``cache_dir``, ``resume``, ``force``, ``progress``.
    Runtime: ``runtime``, ``precision``, ``mixed_precision``, ``batch_size``.  Reader (in every
    process that runs the model): ``decode_threads``, ``prefetch``, ``decode_nice``.  Distribution:
    ``engine``, ``shard`` (local), ``ray_address``, ``actors``, ``gpus_per_worker``, ``shard_size`` (ray).
    Depths and views: ``layers`` (pipeline.nets.depths), ``views`` (pipeline.data.views).
    """

    base: str
    data: str = "tfds:cats_vs_dogs"
    split: str = "80/10/10"
    weights: str = "imagenet"
    out: Path | None = None  # default: <cache_dir>/features/<base>.h5
    cache_dir: Path = Path("cache")
    input_size: int | None = None  # default: the base's own
    pooling: str = "auto"  # auto: the base's own (avg for keras.applications; a hub base's: pipeline.nets.hub)
    batch_size: int = 32
    decode_threads: int = 0  # decode threads per model (this process, or each Ray actor); 0 = auto
    prefetch: int = 0  # batches decoded ahead; 0 = 2 * decode_threads + 2
    decode_nice: int | None = None  # niceness of decode threads (Linux); None = auto (see reader.decode_nice)
    limit: int | None = None  # cap images per split (quick runs)
    resume: bool = True
    force: bool = False
    tfds_data_dir: str | None = None
    progress: bool = True
    mixed_precision: str = "auto"  # auto (on for GPUs) | on | off
    runtime: str = "auto"  # auto | keras | openvino (pipeline.stage1.runtime)
    precision: str = "auto"  # auto | f32 | bf16 | fp16 (pipeline.stage1.runtime)
    engine: str = "local"  # local | ray: who runs the partitions
    shard: str | None = None  # "I/N": write shard I of N (local engine; merge with `tlpipe merge`)
    ray_address: str | None = None  # ray: a running cluster (host:port, ray://host:port, auto); None: start one
    actors: int = 0  # ray: model actors (0: 1)
    gpus_per_worker: float = 0.0  # ray: GPUs per model actor
    shard_size: int = 1000  # ray: images per shard (the unit of work and of resume)
    layers: str = "last"  # last | blocks | NAME,NAME: pooled depths stored side by side (pipeline.nets.depths)
    views: int = 0  # augmented views of each training image (and a mirror of val/test) stored beside it

    def output_path(self, shard: tuple[int, int] | None = None) -> Path:
        """The output file: --out, else CACHE/features/BASE.h5 (a shard: CACHE/features/BASE.shards/...)."""
        if self.out:
            return Path(self.out)
        name = file_stem(self.base)
        if shard is not None:
            return Path(self.cache_dir) / "features" / f"{name}.shards" / shard_name(name, *shard)
        return Path(self.cache_dir) / "features" / f"{name}.h5"


@dataclass
class Plan:
    """One extraction, resolved: what runs, on which items, where it writes."""

    cfg: ExtractConfig
    backbone: Backbone
    weights: Any  # parsed --weights (pipeline.nets.weights.parse_weights)
    size: int
    source: Source
    out: Path
    shard: tuple[int, int] | None  # (index, count) for a shard file
    choice: Choice  # runtime and precision
    weights_id: tuple[str, str] | None  # (kind, sha256); None: ImageNet weights not cached yet
    ranges: dict[str, tuple[int, int]]  # {split: (start, stop)} this job covers
    layers: tuple[str, ...] | None = None  # pooled depths (None: the base's pooled output, --layers last)

    @property
    def runtime_id(self) -> tuple[str, str]:
        return self.choice.runtime, self.choice.precision

    def spec(self, strict: bool = False) -> RuntimeSpec:
        """What building the runtime needs; ``strict``: the resolved runtime or an error (no fallback)."""
        requested = self.choice.runtime if strict else self.cfg.runtime
        return RuntimeSpec(self.backbone.name, self.weights, self.size, self.cfg.pooling, self.cfg.batch_size,
                           self.choice, requested, self.layers)

    @property
    def depth_id(self) -> dict[str, Any]:
        """The depths and views, as the fingerprint and the settings take them (empty: last, no views)."""
        return {"layers": self.layers, "views": int(self.cfg.views)}

    def fingerprint(self, weights_id: tuple[str, str], runtime_id: tuple[str, str]) -> str:
        return schema.fingerprint(self.backbone, weights_id, self.size, self.cfg.pooling, self.source, runtime_id,
                                  **self.depth_id)

    def prepare(self, weights_id: tuple[str, str], runtime_id: tuple[str, str]) -> str | None:
        """The fingerprint, or None when ``out`` is already up to date; refuses (before any work) to
        replace a file made from other settings."""
        fp = self.fingerprint(weights_id, runtime_id)
        if not self.cfg.force and up_to_date(self.out, fp, self.shard):
            return None
        new = schema.settings(self.backbone, weights_id, self.size, self.cfg.pooling, self.cfg.limit, self.source,
                              fp, runtime_id, **self.depth_id)
        guard_existing(self.out, new, self.cfg.force, self.shard)
        return fp

    def reopen_args(self) -> tuple | None:
        """What a worker elsewhere needs to open the data source itself (``reopen_source``), with its view
        splits; None for a folder, whose partitions are listed for the worker (``ListedItems``)."""
        src = self.source
        if src.kind == "folder":
            return None
        return (self.cfg.data, self.cfg.split, self.cfg.tfds_data_dir, self.cfg.limit, src.fingerprint,
                int(self.cfg.views))

    def static_attrs(self, fingerprint: str) -> dict[str, Any]:
        """The features-file attributes fixed by the settings and the listed data."""
        return schema.static_attrs(self.backbone, self.cfg.base, self.size, self.cfg.pooling, self.source,
                                   fingerprint, self.cfg.limit, self.cfg.batch_size, self.cfg.layers, **self.depth_id)


@lru_cache(maxsize=2)
def reopen_source(data: str, split: str, tfds_data_dir: str | None, limit: int | None, fingerprint: str,
                  views: int = 0) -> Any:
    """The plan's source opened again where a worker runs (once per process; ``Plan.reopen_args``), with the
    same view splits, checked against the driver's listing."""
    from pipeline.data.views import with_views

    source = open_source(data, split, tfds_data_dir, limit)
    if source.fingerprint != fingerprint:
        raise DataError(f"{data} lists other items on this worker than on the driver (fingerprint differs)")
    return with_views(source, views)


def check_options(cfg: ExtractConfig) -> tuple[int, int] | None:
    """One line (exit 2) for options that contradict each other; the parsed ``--shard``."""
    if cfg.batch_size < 1:
        raise TlpipeError("--batch-size must be at least 1")
    if cfg.engine not in ENGINES:
        raise UsageError(f"--engine must be local or ray, not '{cfg.engine}'")
    shard = parse_shard(cfg.shard) if cfg.shard else None
    if shard and cfg.engine == "ray":
        raise UsageError("--shard is for the local engine (one shard per job); the ray engine shards by itself")
    if cfg.engine == "ray":
        cluster.require_ray()
        cluster.check_address(cfg.ray_address)  # an unreachable cluster fails in seconds, before any listing
    return shard


def plan(cfg: ExtractConfig) -> Plan:
    """Resolve ``cfg`` once (options, base, pooling, weights, runtime, output, data listing, ranges).
    The plan holds a copy of ``cfg`` with ``pooling`` resolved (``auto``: avg for keras.applications
    bases, so their fingerprints are those of ``avg``; a hub base's own pooling)."""
    from pipeline.nets.weights import check_imagenet_reachable, known_weights, parse_weights

    from pipeline.data.views import check_views, with_views
    from pipeline.nets.depths import resolve_layers

    backbone = get_backbone(cfg.base)
    cfg = replace(cfg, pooling=backbone.pooling_for(cfg.pooling))  # auto resolved: what is recorded is never auto
    shard = check_options(cfg)
    layers = resolve_layers(backbone.name, cfg.layers)  # a bad --layers: one line, before the data
    check_views(cfg.views)
    weights = parse_weights(cfg.weights, backbone)
    # Ray with GPU actors: the driver decides for them (Keras, fp16 per --mixed-precision), as they will run it
    gpu = {"accelerator": "gpu"} if cfg.engine == "ray" and cfg.gpus_per_worker > 0 else {}
    choice = resolve_choice(cfg.runtime, cfg.precision, cfg.mixed_precision, **gpu)  # one line, before the data
    size = cfg.input_size or backbone.input_size
    if not backbone.hub and size < backbone.min_size:  # one line before the data and TensorFlow (hub: its own check)
        raise UsageError(f"{backbone.name} needs inputs of at least {backbone.min_size} pixels, not {size}")
    out = cfg.output_path(shard)
    check_out_path(out, "file")  # a folder or a path under a file: one line, before the data is listed
    source = open_source(cfg.data, cfg.split, cfg.tfds_data_dir, cfg.limit)
    if not source.splits:
        raise DataError(f"no images in {cfg.data}")
    check_imagenet_reachable(backbone, weights)  # offline and not cached: one line before TensorFlow starts
    source = with_views(source, cfg.views)  # view splits (SPLIT_viewK) after the clean ones
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {s: source.counts[s] for s in source.splits}
    ranges = {s: (0, c) for s, c in counts.items()} if shard is None else partition(counts, shard[1])[shard[0]]
    return Plan(cfg, backbone, weights, size, source, out, shard, choice, known_weights(backbone, weights), ranges,
                layers)
