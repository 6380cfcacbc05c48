"""Small helpers: atomic writes, the file hasher, progress bars, logging set-up."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import UsageError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, the one file hasher of tlpipe (memoised on path, size and mtime: weights
    files are large); of a folder (a KerasHub preset), sha256 over its files' relative paths and sha256s
    (hidden files left out)."""
    if Path(path).is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        return digest.hexdigest()
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class LogBar:
    """Progress where stderr is not a terminal (a file, a DVC log): no ``\\r`` redraws, one log line at
    most every ``interval`` seconds (count, rate, time left), none at the end (the stage logs its result)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "img", interval: float = 15.0):
        self.total, self.n, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.start_n, self.postfix = initial, ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last < self.interval or self.n >= self.total:
            return
        self.last = now
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        left = f", about {(self.total - self.n) / rate:.0f} s left" if rate > 0 else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        logging.getLogger("tlpipe.progress").info("%s: %d/%d %s, %.1f %s/s%s", self.desc, self.n, self.total,
                                                  self.unit, rate, self.unit, left + extra)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True, unit: str = "img"):
    """A tqdm bar counting ``unit`` (images by default; rate per second, ETA) on stderr when it is a
    terminal; a ``LogBar`` (a log line at most every 15 s) when it is not; quiet when disabled."""
    if not enabled:
        return _NullBar()
    if not sys.stderr.isatty():
        return LogBar(total, initial, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, smoothing=0.1)


def setup_logging(verbose: int = 0) -> None:
    """Log INFO (or DEBUG with -vv) to stderr; silence TensorFlow's C++ chatter."""
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("absl", "tensorflow", "h5py", "filelock", "matplotlib", "PIL"):
        # their warnings (e.g. tfds' "folder has no dataset_info.json") are noise to users: -v shows them
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose >= 1 else logging.ERROR)


@contextlib.contextmanager
def _stderr_fd_silenced():
    """Point file descriptor 2 at /dev/null (C++ code writes there directly), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Silences stderr while ``tensorflow`` is imported: absl and oneDNN print their start-up lines
    there from C++ during the import, whatever ``TF_CPP_MIN_LOG_LEVEL`` says."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def quiet_exec(module):
                with _stderr_fd_silenced():
                    exec_module(module)

            spec.loader.exec_module = quiet_exec
        return spec


_LEVEL_SET_HERE = False  # TF_CPP_MIN_LOG_LEVEL was set by quiet_tensorflow, not by the user


def quiet_tensorflow() -> None:
    """Keep TensorFlow's start-up lines off stderr: the log level for later messages (unless the user
    set ``TF_CPP_MIN_LOG_LEVEL``), and a silent import (installed before TensorFlow is imported)."""
    global _LEVEL_SET_HERE
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        _LEVEL_SET_HERE = True
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def quiet_tensorflow_by_default() -> None:
    """What ``import pipeline`` does, so the Python API is as quiet as the CLI: ``quiet_tensorflow``,
    unless the user asked TensorFlow for every line (``TF_CPP_MIN_LOG_LEVEL=0``)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() != "0":
        quiet_tensorflow()


def loud_tensorflow() -> None:
    """Undo ``quiet_tensorflow`` (``-v``): TensorFlow's start-up lines and log as it would by itself."""
    global _LEVEL_SET_HERE
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
    if _LEVEL_SET_HERE and "tensorflow" not in sys.modules:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        _LEVEL_SET_HERE = False


_PARAM_REF = re.compile(r"(?P<file>[^:]+\.ya?ml):(?P<key>[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)")


def param_reference(value):
    """``value``, or, when it is written ``FILE.yaml:KEY`` (``params.yaml:data.source``), the value of
    the dotted ``KEY`` in that YAML file (``UsageError`` when the file or key is missing).  dvc.yaml
    passes path parameters this way: a path interpolated into a shell command breaks on quotes."""
    from pipeline.core.errors import UsageError

    match = _PARAM_REF.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return value
    import yaml

    try:
        data = yaml.safe_load(Path(match["file"]).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{value}: cannot read {match['file']} ({exc})") from None
    for part in match["key"].split("."):
        if not isinstance(data, dict) or part not in data:
            raise UsageError(f"{value}: no key {match['key']} in {match['file']}")
        data = data[part]
    if data is None or isinstance(data, (dict, list)):
        raise UsageError(f"{value}: {match['key']} in {match['file']} is not a single value ({data!r})")
    return str(data)


def require_tensorboard() -> None:
    """``--tensorboard`` needs the tensorboard package (Keras' TensorBoard callback writes through it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host cannot be reached (a TCP connect within ``timeout`` s), or None if it can.

    Lets a download fail in seconds with one line, where the downloaders retry for minutes."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    if not u.hostname:
        return None
    try:
        socket.create_connection((u.hostname, u.port or (80 if u.scheme == "http" else 443)), timeout=timeout).close()
    except socket.gaierror:
        return f"{u.hostname}: name lookup failed"
    except (socket.timeout, TimeoutError):
        return f"{u.hostname}: connection timed out"
    except OSError as exc:
        return f"{u.hostname}: {exc.strerror or exc}"
    return None
