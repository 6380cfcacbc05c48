"""Joining or starting a Ray cluster for the Ray distributor, with one-line failures: Ray not installed
(the ``tlpipe[ray]`` extra), an unreachable ``--ray-address``, a cluster that does not start."""

from __future__ import annotations

import logging
import socket
from typing import Any

from pipeline.core.errors import TlpipeError, UsageError

log = logging.getLogger(__name__)

PROBE_SECONDS = 3.0
RAY_EXTRA = 'pip install "tlpipe[ray]"'


def require_ray() -> None:
    """Refuse ``--engine ray`` in one line (exit 2) when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA}") from None


def check_address(address: str | None) -> None:
    """Refuse an unreachable ``--ray-address`` in seconds (Ray itself retries for a long time)."""
    if address in (None, "", "local", "auto"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, not '{address}'")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS) as conn:
            # Ray's GCS (and its client server) speak gRPC: an HTTP/2 server answers the connection
            # preface with a SETTINGS frame. Anything else on that port would make ray.init retry for
            # many minutes, so it is refused here.
            conn.sendall(_H2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        why = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or str(exc))
        raise TlpipeError(f"cannot reach the Ray cluster at {address} ({why}); start one with "
                          f"'ray start --head' or fix --ray-address") from None
    if len(reply) < 9 or reply[3] != 0x04:
        raise TlpipeError(f"{address} answers, but not as a Ray cluster (no gRPC); give the address that "
                          f"'ray start --head' printed, or fix --ray-address")


# HTTP/2 connection preface + an empty SETTINGS frame (RFC 9113, 3.4)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (so it shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": log.isEnabledFor(logging.DEBUG), "configure_logging": False}
    try:
        if address not in (None, "", "local"):
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TlpipeError(f"cannot start or join Ray ({address or 'local'}): {text}") from None
    return True
