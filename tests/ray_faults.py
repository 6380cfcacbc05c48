"""Fault injection for the Ray engine's tests, from outside the package (nothing in ``pipeline`` knows).

* ``arm_actors``: a Ray ``worker_process_setup_hook``; when ``$TLPIPE_TEST_KILL_ACTOR`` names a marker
  file, the first model actor to flush a batch once the marker exists claims it (removes it) and is
  SIGKILLed: an actor lost mid-shard.
* ``arm_driver(marker)``: in a driver process, SIGKILL it right after its first finished shard (when it
  claims ``marker``).
"""

from __future__ import annotations

import os
import signal

ACTOR_ENV = "TLPIPE_TEST_KILL_ACTOR"


def claim(marker: str) -> bool:
    """True for the one process that removes ``marker``."""
    try:
        os.remove(marker)
    except OSError:
        return False
    return True


def arm_actors() -> None:
    marker = os.environ.get(ACTOR_ENV)
    if not marker:
        return
    from pipeline.store.writer import FeaturesWriter

    flush = FeaturesWriter.flush

    def flush_then_die(self) -> None:
        flush(self)
        if claim(marker):
            os.kill(os.getpid(), signal.SIGKILL)

    FeaturesWriter.flush = flush_then_die


def arm_driver(marker: str) -> None:
    from pipeline.stage1.distribute_ray import ShardProgress

    done = ShardProgress.done

    def done_then_die(self, result) -> None:
        done(self, result)
        if claim(marker):
            os.kill(os.getpid(), signal.SIGKILL)

    ShardProgress.done = done_then_die
