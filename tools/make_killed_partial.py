"""Make ``tests/golden/killed_mid_flush.h5.gz``: a partial features file whose writer was SIGKILLed
mid-flush, in a state where appending to it in place fails ("bad heap index").

A child process appends two rows at a time (ids are variable-length strings), flushes, and then
records the row count in a checkpoint, like stage one's writer; the parent kills it at random
moments and restarts it, resuming in place after the checkpoint (what stage one did before
``pipeline.store.writer.salvage``), until a resume fails.  The file and checkpoint as they were
before that resume are kept: ``python tools/make_killed_partial.py`` (a few minutes).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "killed_mid_flush.h5.gz"
CHILD = """
import os, sys, numpy as np
from pipeline.store.writer import FeaturesWriter
rows = int(open("ck").read()) if os.path.exists("ck") else 0
w = FeaturesWriter("p.h5", "a")
w.open_split("train", 4, rows)
k = rows
while True:
    w.append(np.zeros((2, 4), "f4"), np.zeros(2, "i8"), [f"c/{k + j:05d}.png" for j in range(2)])
    k += 2
    w.flush()
    open("ck.tmp", "w").write(str(k)); os.replace("ck.tmp", "ck")
"""


def _attempt(work: Path) -> bool:
    """Run the child for a random while, kill it; True if it failed on its own (a bad resume)."""
    env = {**os.environ, "PYTHONPATH": str(OUT.parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(random.uniform(1.0, 1.6))
    proc.kill()
    _, err = proc.communicate()
    return "Error" in err


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for trial in range(500):
            for name in ("p.h5", "ck"):
                (work / name).unlink(missing_ok=True)
            for _ in range(5):
                if (work / "p.h5").exists():
                    shutil.copy(work / "p.h5", work / "keep.h5")
                    shutil.copy(work / "ck", work / "keep.ck")
                if _attempt(work):
                    rows = int((work / "keep.ck").read_text())
                    with open(work / "keep.h5", "rb") as src, gzip.open(OUT, "wb", compresslevel=9) as dst:
                        shutil.copyfileobj(src, dst)
                    OUT.with_suffix(".json").write_text(json.dumps({"split": "train", "rows": rows}) + "\n")
                    print(f"wrote {OUT} after {trial + 1} trials: {rows} checkpointed rows")
                    return
    sys.exit("no failing resume in 500 trials")


if __name__ == "__main__":
    main()
