"""Shared helpers for the benchmarks: paths, machine description, load averages."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # ../shared from the repo root
DEFAULT_DATA = SHARED / "data" / "cats_vs_dogs_small"
DEFAULT_WEIGHTS = SHARED / "weights"

# Source for the memory benchmarks' child processes (no braces: they go into str.format templates):
# the process's resident memory now, in MiB, read from /proc
RSS_MB_SOURCE = """def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
"""

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require(path: str | Path, what: str) -> Path:
    """Return ``path`` if it exists, else print a message and exit cleanly (status 0)."""
    p = Path(path).expanduser()
    if not p.exists():
        print(f"SKIP: {what} not found at {p} (pass --data / --weights, or put it under {SHARED})")
        sys.exit(0)
    return p


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    try:
        return "load %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load n/a"


def machine_line() -> str:
    import keras

    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"keras {keras.__version__} backend={keras.backend.backend()}")


def median(xs):
    return statistics.median(xs) if xs else float("nan")
