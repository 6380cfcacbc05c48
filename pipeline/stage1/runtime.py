"""The stage-one runtime: the object turning a ``uint8[B, S, S, 3]`` batch into float32 features.

One factory, ``build_runtime``, builds it from plain arguments (so a worker process or a Ray
actor can build its own):

* ``keras``: today's extractor (``model.build_extractor`` + ``model.Forward``), on any backend
  and device; the reference.  Precision ``f32``, or ``fp16`` (mixed float16) on accelerators.
* ``openvino``: the same Keras extractor converted once with ``openvino.convert_model`` and
  compiled for the CPU.  Precision ``f32`` (features within 1e-4 relative of Keras) or ``bf16``
  (OpenVINO's ``INFERENCE_PRECISION_HINT``; only on CPUs with native bfloat16: AMX or AVX512-BF16).

``auto`` (runtime): OpenVINO on x86-64 CPUs (no accelerator) with the TensorFlow backend and
OpenVINO installed; Keras everywhere else (GPUs, ARM, ``KERAS_BACKEND=jax``/``torch``, no
OpenVINO).  ``auto`` (precision): see ``AUTO_PRECISION_BF16`` and docs/guide/extract.md (CPU runtime).

The converted model (IR ``.xml`` + ``.bin``) is cached in ``openvino_cache_dir()``, keyed by
base, weights sha256, input size, pooling and the Keras / OpenVINO / tlpipe versions; it is
written atomically (a temporary folder renamed into place) with the ``.bin``'s sha256, and a
cached model that does not read back or does not match its hash is rebuilt.  The precision is
applied when compiling the IR; OpenVINO's own compiled-blob cache (``CACHE_DIR``, beside the IR)
is keyed by that precision hint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.core.errors import TlpipeError, UsageError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "f32", "bf16", "fp16")
# What ``--precision auto`` picks with the OpenVINO runtime on a CPU with native bfloat16.
# Measured (benchmarks/RESULTS.md, "CPU runtime"): bf16 needs 1/3 (MobileNet-0.75) to 1/5 (ResNet50) of
# f32's CPU time per image and moved head accuracy by -0.3 to +0.26 points, but its features are not the
# reference's (max abs diff ~1.5 on features up to ~6): the exported Keras float32 model would not give
# the metrics measured on them, and they differ between CPUs with and without bf16.  So auto is f32.
AUTO_PRECISION_BF16 = False
IR_FORMAT = 1  # bump when the cached IR's layout or conversion changes

_X86 = {"x86_64", "amd64", "i686", "x86"}
_said_lock = threading.Lock()
_said: set[str] = set()


def say_runtime(runtime: str, precision: str, detail: str = "", why: str = "") -> None:
    """Log once which runtime runs: ``runtime: keras f32 (openvino is not installed)``."""
    text = "; ".join(x for x in (detail, why) if x)
    _say_once(f"runtime: {runtime} {precision}" + (f" ({text})" if text else ""))


def _say_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` once per process (which runtime runs, fallbacks)."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    log.log(level, message)


# --------------------------------------------------------------------------------------------- probes

def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def is_x86() -> bool:
    return platform.machine().lower() in _X86


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or None where it cannot be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def bf16_slower_than_f32() -> bool:
    """True on a CPU with AVX512-BF16 but no AMX (e.g. AMD EPYC Zen 4): OpenVINO's bf16 runs slower there
    than f32 (measured: 219 against 348 images/s, MobileNet-0.75, raw forward pass)."""
    flags = cpu_flags() or set()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


@lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True when the CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16).

    Linux: the ``/proc/cpuinfo`` flags; elsewhere OpenVINO's ``OPTIMIZATION_CAPABILITIES``.
    """
    flags = cpu_flags()
    if flags is not None:
        return "amx_bf16" in flags or "avx512_bf16" in flags
    if not openvino_available():
        return False
    try:  # pragma: no cover - non-Linux
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001
        return False


def detect_accelerator() -> str | None:
    """The Keras backend's accelerator, without importing TensorFlow where no GPU device node exists
    (so that an up-to-date check stays fast)."""
    if _backend() == "tensorflow" and "tensorflow" not in sys.modules:
        if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
            return None
    from pipeline.nets.extractor import accelerator

    return accelerator()


def _backend() -> str:
    """The Keras backend's name, read as Keras reads it (``KERAS_BACKEND``, else ``keras.json`` in
    ``KERAS_HOME`` or ``~/.keras``) without importing Keras, which imports TensorFlow: option checks
    stay fast."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        return str(json.loads(Path(home, "keras.json").read_text()).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


# --------------------------------------------------------------------------------------------- choice

@dataclass(frozen=True)
class Choice:
    """The runtime and precision a request resolves to, and why (for the one line saying which runs)."""

    runtime: str
    precision: str
    why: str = ""


def resolve(runtime: str = "auto", precision: str = "auto", mixed_precision: str = "auto", **probes) -> tuple[str, str]:
    """``(runtime, precision)`` actually used for a request; ``UsageError`` (exit 2) when impossible.
    (``resolve_choice`` also says why.)"""
    choice = resolve_choice(runtime, precision, mixed_precision, **probes)
    return choice.runtime, choice.precision


def resolve_choice(runtime: str = "auto", precision: str = "auto", mixed_precision: str = "auto", *,
                   openvino_ok: bool | None = None, bf16_ok: bool | None = None,
                   accelerator: str | None | bool = False, backend: str | None = None,
                   x86: bool | None = None) -> Choice:
    """The ``Choice`` for a request; ``UsageError`` (exit 2) when impossible.

    The keyword arguments override the probes (tests simulate other machines with them).
    ``mixed_precision`` is the older ``--mixed-precision`` option (Keras float16 on GPUs).
    """
    runtime = str(runtime).strip().lower()
    precision = str(precision).strip().lower()
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime '{runtime}': choose {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}': choose {', '.join(PRECISIONS)}")
    openvino_ok = openvino_available() if openvino_ok is None else openvino_ok
    backend = _backend() if backend is None else backend
    x86 = is_x86() if x86 is None else x86
    acc = detect_accelerator() if accelerator is False else accelerator
    runtime, why = _choose_runtime(runtime, precision, mixed_precision, acc, x86, backend, openvino_ok)
    if runtime == "keras":
        return Choice("keras", _keras_precision(precision, mixed_precision, acc), why)
    bf16 = bf16_supported() if bf16_ok is None else bf16_ok
    if precision == "fp16":
        raise UsageError("--precision fp16 is for the Keras runtime on GPUs; with openvino use f32 or bf16")
    if precision == "bf16" and not bf16:
        raise UsageError("--precision bf16: this CPU has no native bfloat16 (AMX or AVX512-BF16); "
                         "use --precision f32")
    if precision == "auto":
        precision = "bf16" if (bf16 and AUTO_PRECISION_BF16) else "f32"
    if precision == "bf16":
        warn_if_bf16_slow()
    return Choice(runtime, precision, why)


def _choose_runtime(runtime: str, precision: str, mixed_precision: str, acc, x86: bool, backend: str,
                    openvino_ok: bool) -> tuple[str, str]:
    """The runtime (keras | openvino) for a request, and why Keras when auto did not pick OpenVINO."""
    if mixed_precision == "on" and precision not in ("auto", "fp16"):
        raise UsageError(f"--precision {precision} contradicts --mixed-precision on (Keras float16): "
                         "drop one of them")
    fp16 = "--precision fp16" if precision == "fp16" else "--mixed-precision on" if mixed_precision == "on" else ""
    if fp16 and runtime == "openvino":
        raise UsageError(f"{fp16} is Keras float16; with --runtime openvino use --precision f32 or bf16")
    if runtime == "auto" and fp16:
        return "keras", fp16  # asked for Keras float16 explicitly (as before the OpenVINO runtime)
    if runtime == "auto":
        if acc is None and x86 and backend == "tensorflow" and openvino_ok:
            return "openvino", ""
        return "keras", ("an accelerator" if acc is not None else "not an x86-64 CPU" if not x86
                         else f"KERAS_BACKEND={backend}" if backend != "tensorflow" else "openvino is not installed")
    if runtime == "openvino":
        if not openvino_ok:
            raise UsageError("--runtime openvino: the openvino package is not installed "
                             "(pip install openvino), or use --runtime keras")
        if backend != "tensorflow":
            raise UsageError(f"--runtime openvino converts the TensorFlow-backend model; KERAS_BACKEND={backend}: "
                             "use --runtime keras (or auto)")
    return runtime, ""


def _keras_precision(precision: str, mixed_precision: str, acc) -> str:
    """The Keras runtime's precision for a request (f32, or fp16: mixed float16)."""
    fp16 = "--precision fp16" if precision == "fp16" else "--mixed-precision on" if mixed_precision == "on" else ""
    if precision == "bf16":
        raise UsageError("--precision bf16 needs --runtime openvino (Keras' bfloat16 on a CPU is slower "
                         "than float32); use f32")
    if precision == "auto":
        mixed = mixed_precision == "on" or (mixed_precision == "auto" and acc is not None)
        precision = "fp16" if mixed else "f32"
    if precision == "fp16" and acc is None:
        _say_once(f"{fp16 or 'float16'} on a CPU: Keras float16 is slower than float32 here (no native "
                  "float16 math); it is meant for GPUs", logging.WARNING)
    return precision


def warn_if_bf16_slow() -> None:
    """One warning line where bf16 was asked for on a CPU on which OpenVINO's bf16 is slower than f32."""
    if bf16_slower_than_f32():
        _say_once("--precision bf16 on a CPU with AVX512-BF16 but no AMX: OpenVINO bf16 is slower than f32 here "
                  "(measured 219 against 348 images/s, MobileNet-0.75); use --precision f32 (or auto)",
                  logging.WARNING)


# --------------------------------------------------------------------------------------------- cache

def openvino_cache_dir() -> Path:
    """Where converted models live: ``$TLPIPE_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/tlpipe/openvino``
    (``~/.cache/tlpipe/openvino``)."""
    env = os.environ.get("TLPIPE_OPENVINO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tlpipe" / "openvino"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_ir(key_fields: dict[str, Any], convert: Callable[[], Any], cache_dir: Path | None = None):
    """The OpenVINO model for ``key_fields``: read from the cache, or made by ``convert()`` and cached.

    Returns ``(ov.Model, meta, folder, converted)``; ``meta`` is what ``convert`` returned beside the
    model (plain JSON) and was stored with it.  A cached entry that does not read back, or whose
    ``.bin`` does not match its recorded sha256, is removed and rebuilt.
    """
    import openvino as ov

    fields = {**key_fields, "openvino": ov.__version__, "ir_format": IR_FORMAT}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else openvino_cache_dir()
    folder = root / key
    core = ov.Core()
    if folder.exists():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("bin_sha256") != _file_sha256(folder / "model.bin"):
                raise ValueError("model.bin does not match its recorded sha256")
            model = core.read_model(str(folder / "model.xml"), str(folder / "model.bin"))
            return model, meta.get("extra", {}), folder, False
        except Exception as exc:  # noqa: BLE001 - anything unreadable is rebuilt
            log.warning("cached OpenVINO model %s is unusable (%s); converting again", folder,
                        error_reason(exc))
            shutil.rmtree(folder, ignore_errors=True)
    model, extra = convert()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        meta = {"key": fields, "bin_sha256": _file_sha256(tmp / "model.bin"), "extra": extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted to OpenVINO and cached in %s", folder)
    return model, extra, folder, True


def error_reason(exc: BaseException) -> str:
    """The first line of ``exc`` that says something: OpenVINO puts "Exception from src/...cpp:117:" first."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not (ln.startswith("Exception from ") and ln.endswith(":"))]
    return (useful or lines or [type(exc).__name__])[0]


def compile_cpu(ov_model, config: dict[str, Any], cache_dir: Path | None = None):
    """``ov_model`` compiled for the CPU, through OpenVINO's blob cache in ``cache_dir`` when given.

    OpenVINO's cache is not safe for processes that write one blob at once (Ray actors, shard workers:
    "cannot set permissions: No such file or directory [...blob]"), so a file lock lets one compile
    while the others wait and then read its blob; a cache that still fails is bypassed with a warning.
    """
    import openvino as ov
    from filelock import FileLock

    if cache_dir is None:
        return ov.Core().compile_model(ov_model, "CPU", config)
    core = ov.Core()
    core.set_property({"CACHE_DIR": str(cache_dir)})
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with FileLock(str(Path(cache_dir) / ".compile.lock")):
            return core.compile_model(ov_model, "CPU", config)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: compile without it
        log.warning("OpenVINO's compiled-model cache in %s failed (%s); compiling without it",
                    cache_dir, error_reason(exc))
        return ov.Core().compile_model(ov_model, "CPU", config)


# --------------------------------------------------------------------------------------------- runtimes

class Runtime:
    """``runtime(uint8 batch) -> float32 features``; ``name``, ``precision``, ``feature_size``, ``weights``."""

    name = "keras"
    precision = "f32"
    depths: list[tuple[str, int]] | None = None  # [(layer, width)] of a multi-depth extractor (nets.depths)

    def __init__(self, batch_size: int, input_size: int, feature_size: int, weights):
        self.batch_size = batch_size
        self.input_size = input_size
        self.feature_size = feature_size
        self.weights = weights  # pipeline.nets.weights.WeightsInfo

    def warmup(self) -> None:
        """Compile / first-run once on a zero batch before real data arrives."""
        self(np.zeros((self.batch_size, self.input_size, self.input_size, 3), dtype=np.uint8))

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The features of each batch, in order.  A runtime that runs asynchronously starts a batch
        before handing back the one before it, so the model is not idle while the caller writes."""
        for batch in batches:
            yield self(batch)

    def describe(self) -> str:
        return f"{self.name} {self.precision}"


class KerasRuntime(Runtime):
    """The Keras extractor (``model.build_extractor``) behind ``model.Forward``."""

    name = "keras"

    def __init__(self, model, batch_size: int, input_size: int, weights, precision: str = "f32"):
        from pipeline.nets.extractor import Forward

        from pipeline.nets.depths import depth_layout

        super().__init__(batch_size, input_size, int(model.output_shape[-1]), weights)
        self.model = model
        self.precision = precision
        self.depths = depth_layout(model)
        self._forward = Forward(model, batch_size)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch)


class OpenVINORuntime(Runtime):
    """An OpenVINO model compiled for the CPU on fixed-size batches (the last one zero-padded).

    ``streams`` > 1 splits each batch across that many inference requests run in parallel
    (OpenVINO's throughput mode); 1 runs the batch as one request on every core.
    """

    name = "openvino"

    def __init__(self, ov_model, batch_size: int, input_size: int, feature_size: int, weights,
                 precision: str = "f32", streams: int = 1, cache_dir: Path | None = None):
        super().__init__(batch_size, input_size, feature_size, weights)
        self.precision = precision
        self.streams = max(1, min(int(streams), batch_size))
        per = -(-batch_size // self.streams)
        self._per = per
        ov_model.reshape({ov_model.inputs[0].get_any_name(): [per, input_size, input_size, 3]})
        # no pinning: tlpipe's own decode threads (and other processes) share these cores; pinned
        # inference threads then wait at every barrier for a preempted one (measured: RESULTS.md)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "ENABLE_CPU_PINNING": False}
        if self.streams > 1:
            config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(self.streams)})
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        self.compiled = compile_cpu(ov_model, config, cache_dir)
        # two sets of requests: one batch running (a request per stream), the next queued behind it
        self._requests = [[self.compiled.create_infer_request() for _ in range(self.streams)] for _ in range(2)]
        self._turn = 0

    def _start(self, batch: np.ndarray) -> tuple[int, list, np.ndarray]:
        """Start ``batch`` on the next set of requests (the set must be collected already)."""
        n = batch.shape[0]
        total = self._per * self.streams
        if n != total:
            full = np.zeros((total, *batch.shape[1:]), dtype=np.uint8)
            full[:n] = batch
            batch = full
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        requests = self._requests[self._turn]
        self._turn ^= 1
        for i, request in enumerate(requests):
            request.start_async({0: batch[i * self._per:(i + 1) * self._per]}, share_inputs=True)
        return n, requests, batch  # the batch stays referenced while the requests read it

    @staticmethod
    def _collect(job: tuple[int, list, np.ndarray]) -> np.ndarray:
        n, requests, _ = job
        parts = []
        for request in requests:
            request.wait()  # raises if the inference failed
            parts.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
        return np.concatenate(parts)[:n]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._collect(self._start(batch))

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        running = None
        try:
            for batch in batches:
                done, running = running, self._start(batch)
                if done is not None:
                    yield self._collect(done)
            if running is not None:
                done, running = running, None
                yield self._collect(done)
        finally:
            if running is not None:  # the caller stopped early: let the requests finish with their input
                for request in running[1]:
                    request.wait()


def default_streams() -> int:
    """Inference requests run in parallel per batch (``TLPIPE_OPENVINO_STREAMS`` overrides).

    Two when there are two cores or more: each stream then runs on its own thread(s), with no barrier
    between the cores.  Measured on 2 shared cores (benchmarks/RESULTS.md, "CPU runtime"): as fast as
    one request on both cores when the machine is quiet, 1.9x faster at f32 when other processes load it.
    """
    try:
        env = os.environ.get("TLPIPE_OPENVINO_STREAMS")
        if env:
            return max(1, int(env))
    except ValueError:
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _build_keras_extractor(backbone, weights, input_size: int, pooling: str, fp16: bool = False,
                           layers: tuple[str, ...] | None = None):
    """The Keras extractor, built as extraction always has (seeded: --weights none is reproducible);
    ``layers``: the pooled depths side by side (pipeline.nets.depths) instead of the base's output."""
    import random

    import keras

    from pipeline.nets.extractor import build_extractor
    from pipeline.nets.weights import build_with_weights

    previous_policy = keras.mixed_precision.global_policy().name
    if fp16:
        keras.mixed_precision.set_global_policy("mixed_float16")
    rng_state = random.getstate()
    random.seed(0)
    try:
        hub_depths = tuple(layers) if layers and backbone.hub else None  # pooled inside the hub base
        base_model, winfo = build_with_weights(backbone, weights, input_size, pooling, depths=hub_depths)
        if layers:
            from pipeline.nets.depths import build_depth_extractor, resolve_layers

            if not backbone.hub:  # a hub base resolved its pyramid levels when it was built
                layers = resolve_layers(backbone.name, layers, base_model)
            model = build_depth_extractor(backbone, base_model, input_size, layers, pooling)
        else:
            model = build_extractor(backbone, base_model, input_size)
    finally:
        random.setstate(rng_state)
        keras.mixed_precision.set_global_policy(previous_policy)
    return model, winfo


@dataclass(frozen=True)
class RuntimeSpec:
    """What building a runtime needs, resolved once (picklable: Ray actors build their own from it).

    ``requested`` is the ``--runtime`` asked for: under ``auto`` a failed OpenVINO conversion falls
    back to Keras, under ``openvino`` it is an error naming ``--runtime keras``."""

    base: str
    weights: Any  # parsed --weights (pipeline.nets.weights.parse_weights)
    size: int
    pooling: str
    batch_size: int
    choice: Choice
    requested: str = "auto"
    layers: tuple[str, ...] | None = None  # pooled depths side by side (pipeline.nets.depths); None: last


def build(spec: RuntimeSpec) -> "Runtime":
    """THE model factory of stage one: every distributor builds its runtime here."""
    return build_runtime(spec.base, spec.weights, spec.size, spec.pooling, runtime=spec.requested,
                         batch_size=spec.batch_size, choice=spec.choice, layers=spec.layers)


def build_runtime(backbone, weights, input_size: int, pooling: str = "avg", runtime: str = "auto",
                  precision: str = "auto", batch_size: int = 32, mixed_precision: str = "auto",
                  cache_dir: Path | None = None, streams: int | None = None, choice: Choice | None = None,
                  layers: tuple[str, ...] | None = None) -> Runtime:
    """Build the stage-one runtime from plain arguments.

    ``backbone`` is a ``Backbone`` or a base name; ``weights`` is what ``weights.parse_weights``
    returns (``None``, ``"imagenet"`` or a ``Path``), or the raw ``--weights`` string.
    ``choice``: the runtime and precision already resolved (else resolved here from the request).
    Under ``runtime="auto"`` a failed conversion warns and falls back to Keras; with
    ``runtime="openvino"`` it is a ``UsageError`` naming the fallback.  ``layers``: pooled depths side
    by side (pipeline.nets.depths) instead of the base's pooled output; the runtime's ``depths`` lists them.
    (It seeds Keras' initializers so that ``--weights none`` gives the same random base everywhere.)
    """
    from pipeline.nets.backbones import Backbone, get_backbone
    from pipeline.nets.weights import parse_weights

    backbone = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    if isinstance(weights, str) and weights not in ("imagenet",):
        weights = parse_weights(weights, backbone)
    requested = str(runtime).strip().lower()
    choice = choice or resolve_choice(runtime, precision, mixed_precision)
    if choice.runtime == "keras":
        model, winfo = _build_keras_extractor(backbone, weights, input_size, pooling, fp16=choice.precision == "fp16",
                                              layers=layers)
        say_runtime("keras", choice.precision, why=choice.why)
        return KerasRuntime(model, batch_size, input_size, winfo, choice.precision)
    return _build_openvino(backbone, weights, input_size, pooling, choice.precision, batch_size,
                           requested == "openvino", cache_dir, streams, layers)


def _build_openvino(backbone, weights, input_size: int, pooling: str, precision: str, batch_size: int,
                    strict: bool, cache_dir: Path | None, streams: int | None,
                    layers: tuple[str, ...] | None = None) -> Runtime:
    """The OpenVINO runtime (converted once, cached); on failure Keras, or a ``UsageError`` if ``strict``."""
    import keras

    from pipeline import __version__
    from pipeline.nets.weights import WeightsInfo, known_weights

    built: dict[str, Any] = {}

    def keras_model():
        if "model" not in built:
            built["model"], built["winfo"] = _build_keras_extractor(backbone, weights, input_size, pooling,
                                                                    layers=layers)
        return built["model"], built["winfo"]

    def convert():
        import openvino as ov

        from pipeline.nets.depths import depth_layout

        model, winfo = keras_model()
        with warnings.catch_warnings():  # Keras warns that the converter names the input differently
            warnings.simplefilter("ignore", UserWarning)
            ov_model = ov.convert_model(model, input=[(-1, input_size, input_size, 3)])
        return ov_model, {"feature_size": int(model.output_shape[-1]), "weights_kind": winfo.kind,
                          "weights_sha256": winfo.sha256, "keras": keras.__version__,
                          "depths": depth_layout(model)}

    try:
        known = known_weights(backbone, weights)
        if known is None:  # ImageNet weights not downloaded yet: their identity is known after the build
            winfo = keras_model()[1]
            known = (winfo.kind, winfo.sha256)
        key = {"base": backbone.name, "weights": known[0], "weights_sha256": known[1],
               "input_size": input_size, "pooling": pooling, "keras": keras.__version__, "tlpipe": __version__,
               **({"layers": list(layers), "depths_format": 1} if layers else {})}
        ov_model, extra, folder, _ = cached_ir(key, convert, cache_dir)
        winfo = built.get("winfo") or WeightsInfo(
            extra["weights_kind"], str(weights.resolve()) if isinstance(weights, Path) else "", extra["weights_sha256"])
        rt = OpenVINORuntime(ov_model, batch_size, input_size, int(extra["feature_size"]), winfo, precision,
                             streams or default_streams(), cache_dir=folder / "compiled")
    except TlpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - conversion / compilation failures of any kind
        first = error_reason(exc)
        if strict:
            raise UsageError(f"OpenVINO could not convert or compile {backbone.name} ({first}); "
                             "use --runtime keras") from None
        log.warning("OpenVINO could not convert or compile %s (%s); using the keras runtime", backbone.name, first)
        model, winfo = keras_model()
        return KerasRuntime(model, batch_size, input_size, winfo, "f32")
    say_runtime("openvino", precision, f"OpenVINO {__import__('openvino').__version__}, CPU")
    rt.depths = [(str(n), int(w)) for n, w in extra["depths"]] if extra.get("depths") else None
    return rt


def _without_resize(model):
    """The exported model with its ``Resizing`` layers as identities (sharing every other layer and its
    weights): what it computes on images already decoded at the input size, as ``tlpipe predict`` feeds
    them (OpenVINO has no antialiased resize op)."""
    import keras

    def clone(layer):
        if isinstance(layer, keras.layers.Resizing):
            return keras.layers.Identity(name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=clone)


def compile_keras_model(model, runtime: str = "auto", precision: str = "auto", key: dict | None = None,
                        cache_dir: Path | None = None, input_sizes: list[int] | None = None):
    """A callable ``batch (array or list of arrays) -> numpy outputs`` for any Keras model (``tlpipe predict``
    on an exported model): the model itself (``keras``) or its OpenVINO conversion, cached under ``key``.
    ``input_sizes``: the exported model's inputs get images of exactly these sizes (its resize is then the
    identity and is left out of the converted model).

    Returns ``(callable, runtime, precision)``.  Under ``auto`` a failed conversion warns and uses Keras.
    """
    requested = str(runtime).strip().lower()
    if str(precision).strip().lower() == "fp16":
        raise UsageError("--precision fp16 is for extract (Keras float16 on GPUs); the exported model runs "
                         "in float32 here: use --precision f32 or bf16")
    choice = resolve_choice(runtime, precision, "off")
    runtime, precision = choice.runtime, choice.precision
    if runtime == "keras":
        say_runtime("keras", precision, why=choice.why)
        return (lambda batch: np.asarray(model.predict_on_batch(batch))), "keras", precision
    try:
        import openvino as ov

        def convert():
            view = _without_resize(model) if input_sizes else model
            sizes = list(input_sizes or [None] * len(model.inputs))
            shapes = [(-1, s, s, 3) if s else (-1, *tuple(int(d) if d is not None else -1 for d in t.shape[1:]))
                      for s, t in zip(sizes, view.inputs)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return ov.convert_model(view, input=shapes), {}

        ov_model, _, folder, _ = cached_ir({"model": key or {}, "kind": "exported", "sizes": input_sizes},
                                           convert, cache_dir)
        compiled = compile_cpu(ov_model, {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                          "ENABLE_CPU_PINNING": False}, folder / "compiled")
    except Exception as exc:  # noqa: BLE001
        first = error_reason(exc)
        if requested == "openvino":
            raise UsageError(f"OpenVINO could not convert or compile the model ({first}); use --runtime keras") from None
        log.warning("OpenVINO could not convert or compile the model (%s); using the keras runtime", first)
        return (lambda batch: np.asarray(model.predict_on_batch(batch))), "keras", "f32"
    request = compiled.create_infer_request()

    def call(batch):
        arrays = batch if isinstance(batch, (list, tuple)) else [batch]
        out = request.infer({i: np.ascontiguousarray(a) for i, a in enumerate(arrays)})
        return np.array(out[0], copy=True)

    say_runtime("openvino", precision, f"OpenVINO {ov.__version__}, CPU")
    return call, "openvino", precision
