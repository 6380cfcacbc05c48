"""Stage one: run a frozen base once over every split and cache pooled features in HDF5.

    plan (pipeline.stage1.plan: every setting resolved once)
      -> a distributor runs partitions (item ranges) through one Runner each
         (pipeline.stage1.runner: reader -> runtime -> sink, timing each step):
           local  (pipeline.stage1.local): the whole range, or --shard I/N, in this process;
           ray    (pipeline.stage1.distribute_ray): shards on model actors, merged at the end
      -> a features file (pipeline.store: the only code that touches the HDF5 layout)

An exclusive lock (``.<name>.lock``) stops two runs writing the same output.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import LockedError
from pipeline.stage1.local import extract_local
from pipeline.stage1.plan import ExtractConfig, Plan, plan
from pipeline.stage1.reader import decode_batch
from pipeline.data.sources import decode_item
from pipeline.store.writer import hidden_sibling

__all__ = ["ExtractConfig", "Plan", "extract", "plan", "hidden_sibling", "decode_batch", "decode_item"]


def extract(cfg: ExtractConfig) -> Path:
    """Extract features for every split of ``cfg.data`` with ``cfg.base``; return the HDF5 path.

    ``cfg.shard = "I/N"`` writes shard I of N instead (a shard file, see pipeline.store.shards);
    ``cfg.engine = "ray"`` runs the same runner on Ray actors."""
    p = plan(cfg)
    from filelock import FileLock, Timeout

    lock_path = hidden_sibling(p.out, ".lock")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another tlpipe extract is writing {p.out} (lock {lock_path})") from None
    try:
        if cfg.engine == "ray":
            from pipeline.stage1.distribute_ray import extract_ray

            return extract_ray(p)
        return extract_local(p)
    finally:
        # remove the lock file while still holding it (no empty .NAME.lock left beside the output);
        # another run that opened it meanwhile fails at once (timeout 0) rather than writing too
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()
