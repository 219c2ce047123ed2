"""The ``"native"`` selective scan: the fused method as a C++ kernel on the CPU.

``native_scan.cc`` (beside this file) holds the kernel, called through JAX's
foreign-function interface (``jax.ffi``): a forward that saves the state at every
chunk start, and a backward that recomputes one chunk's states and runs the
reverse-time recurrence of the state gradient, the same algorithm as
:mod:`mamba_pkd.ssm.fused`, written as plain loops over ``d_inner`` that the C++
compiler vectorises (``exp`` included). Both directions of a bidirectional mixer
go through one call; each (stream, batch row) is independent, so the rows are
spread over ``threads`` threads without changing any result.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else
``g++``) against the XLA FFI headers shipped in ``jaxlib``, for this CPU
(``-march=native``), and cached as a shared library under ``$MAMBA_PKD_NATIVE_DIR``
(default ``~/.cache/mamba_pkd/native``) keyed by the source, compiler, flags,
jaxlib version and CPU; later processes load the cached file. Where that fails
(no compiler, no headers) :func:`native_available` says why, ``method="auto"``
keeps the XLA ``"fused"`` method, and ``method="native"`` raises.

The same library holds the backward of the mixer's causal depthwise convolution
with its SiLU (:func:`causal_conv_backward`), which
:class:`mamba_pkd.layers.CausalDepthwiseConv1d` uses when the mixer's scan method
resolves to ``"native"``: one pass that recomputes the pre-activation (XLA's own
gradient kept every shifted copy and elementwise op as a pass over memory of its own).

float32 only: other compute dtypes (float64 gradient checks) run the XLA
``"fused"`` method. CPU only (on a GPU ``"auto"`` means the Pallas kernel).
It imports nothing from ``mamba_pkd``.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

_logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("native_scan.cc")
# Flags of the kernel's object file. -ffast-math lets GCC vectorise exp (glibc's
# libmvec) and reorder the reductions over d_inner; it is not passed to the link
# step, so loading the library does not change the process's floating-point mode.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c++17")
FORWARD_TARGET = "mamba_pkd_native_scan_forward"
BACKWARD_TARGET = "mamba_pkd_native_scan_backward"
CONV_BACKWARD_TARGET = "mamba_pkd_native_conv_backward"
# Largest chunk of the backward's recompute buffer, and its target size in floats
# (one chunk's states and decays, ~256 KiB: stays in L2).
MAX_CHUNK = 32
CHUNK_ELEMENTS = 65536
# State updates (rows x L x d_inner x N) per thread below which a call stays on one thread.
MIN_WORK_PER_THREAD = 1 << 20

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> pathlib.Path:
  """Where the compiled kernel is kept (``$MAMBA_PKD_NATIVE_DIR`` or ``~/.cache``)."""
  env = os.environ.get("MAMBA_PKD_NATIVE_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "mamba_pkd" / "native"


def _cpu_signature() -> str:
  """The CPU's model and flags (``-march=native`` code is only valid on such a CPU)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    return "".join(lines)
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def _build(cxx: str) -> pathlib.Path:
  """Compiles the kernel (or finds it in the cache); returns the library's path."""
  version = subprocess.run(
      [cxx, "--version"], capture_output=True, text=True, check=True
  ).stdout.splitlines()[0]
  include = jax.ffi.include_dir()
  key = hashlib.sha256(
      "\0".join(
          [
              SOURCE.read_text(encoding="utf-8"),
              cxx,
              version,
              " ".join(COMPILE_FLAGS),
              jax.__version__,
              getattr(jax.lib, "__version__", ""),
              include,
              _cpu_signature(),
          ]
      ).encode()
  ).hexdigest()[:20]
  out_dir = cache_dir()
  lib = out_dir / f"native_scan-{key}.so"
  if lib.exists():
    return lib
  out_dir.mkdir(parents=True, exist_ok=True)
  # One compile per machine: processes starting together (test workers, a job's
  # subprocesses) wait for the first one's compile instead of each running their own.
  with open(out_dir / "build.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if lib.exists():
      return lib
    _compile(cxx, include, lib, out_dir)
  return lib


def _compile(cxx: str, include: str, lib: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Compiles the object with COMPILE_FLAGS and links it (without them) into ``lib``."""
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    obj = pathlib.Path(tmp) / "native_scan.o"
    so = pathlib.Path(tmp) / "native_scan.so"
    for cmd in (
        [cxx, *COMPILE_FLAGS, f"-I{include}", "-c", str(SOURCE), "-o", str(obj)],
        [cxx, "-shared", "-pthread", str(obj), "-o", str(so)],
    ):
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = [l for l in lines if "error" in l][:3] or lines[-3:]  # not a warning's tail
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed: {' | '.join(tail)}")
    os.replace(so, lib)  # atomic: a reader never sees a partial file
  _logger.info("native scan kernel compiled: %s", lib)


def native_available() -> tuple[bool, str]:
  """(True, path) once the kernel is compiled, loaded and registered; else (False, why)."""
  with _lock:
    if "ok" not in _state:
      _state["ok"], _state["why"] = _load()
    return _state["ok"], _state["why"]


def _load() -> tuple[bool, str]:
  if platform.system() != "Linux":
    return False, f"the native kernel is built for Linux only, not {platform.system()}"
  cxx = _compiler()
  if cxx is None:
    return False, f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} is not on PATH)"
  if not os.path.isdir(jax.ffi.include_dir()):
    return False, f"jaxlib has no FFI headers at {jax.ffi.include_dir()}"
  try:
    path = _build(cxx)
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(
        FORWARD_TARGET, jax.ffi.pycapsule(lib.MambaPkdScanForward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        BACKWARD_TARGET, jax.ffi.pycapsule(lib.MambaPkdScanBackward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        CONV_BACKWARD_TARGET, jax.ffi.pycapsule(lib.MambaPkdConvBackward), platform="cpu"
    )
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    return False, f"building the native kernel failed: {e}"
  _state["lib"] = lib  # keep the library loaded
  return True, str(path)


def require_native() -> None:
  """Raises RuntimeError (one line, the reason) unless the kernel can run."""
  ok, why = native_available()
  if not ok:
    raise RuntimeError(f"scan method 'native' is unavailable: {why}; use 'fused' instead")


def default_threads() -> int:
  """Threads per call: the cores this process may use over its local CPU devices.

  Training runs one program per device (``pmap``), each calling the kernel, so a
  2-core machine with 2 host devices gets 1 thread per call; with 1 device, 2.
  ``$MAMBA_PKD_NATIVE_THREADS`` overrides it.
  """
  env = os.environ.get("MAMBA_PKD_NATIVE_THREADS")
  if env:
    return max(1, int(env))
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  devices = max(1, len(jax.local_devices(backend="cpu")))
  return max(1, cores // devices)


def chunk_length(length: int, d_inner: int, n_state: int) -> int:
  """Steps per recompute chunk: at most MAX_CHUNK, about CHUNK_ELEMENTS floats of state."""
  t = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // (2 * d_inner * n_state)))
  return min(t, length)


# ----------------------------------------------------------------------------
# The custom_vjp over the stacked streams.
# ----------------------------------------------------------------------------


def _attrs(reverse_mask, softplus, chunk, threads):
  return dict(
      reverse_mask=np.int64(reverse_mask),
      softplus=np.int64(softplus),
      chunk=np.int64(chunk),
      threads=np.int64(threads),
  )


def _forward_call(u, delta, At, B, C, D, bias, statics):
  reverse_mask, softplus, chunk, threads = statics
  s, b, length, d = u.shape
  n = At.shape[1]
  nc = -(-length // chunk)
  f32 = jnp.float32
  return jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct(u.shape, f32), jax.ShapeDtypeStruct((s, b, nc, n, d), f32)),
      vmap_method="sequential",
  )(u, delta, At, B, C, D, bias, **_attrs(reverse_mask, softplus, chunk, threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(u, delta, At, B, C, D, bias, statics):
  y, _ = _forward_call(u, delta, At, B, C, D, bias, statics)
  return y


def _core_fwd(u, delta, At, B, C, D, bias, statics):
  y, hs = _forward_call(u, delta, At, B, C, D, bias, statics)
  return y, (u, delta, At, B, C, D, bias, hs)


def _core_bwd(statics, res, gy):
  u, delta, At, B, C, D, bias, hs = res
  reverse_mask, softplus, chunk, threads = statics
  s, b, length, d = u.shape
  n = At.shape[1]
  f32 = jnp.float32
  sd = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
  gu, gdelta, gB, gC, gA, gD, gbias = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (
          sd(s, b, length, d),
          sd(s, b, length, d),
          sd(s, b, length, n),
          sd(s, b, length, n),
          sd(s, b, n, d),
          sd(s, b, d),
          sd(s, b, d),
      ),
      vmap_method="sequential",
  )(
      u,
      delta,
      At,
      B,
      C,
      D,
      bias,
      gy.astype(f32),
      hs,
      **_attrs(reverse_mask, softplus, chunk, threads),
  )
  # Per-row parameter gradients, summed here in a fixed order (thread-independent).
  return gu, gdelta, gA.sum(axis=1), gB, gC, gD.sum(axis=1), gbias.sum(axis=1)


_core.defvjp(_core_fwd, _core_bwd)


def scan_native_streams(streams, reverse, delta_softplus, threads=None):
  """Several equal-shaped scans (e.g. both directions of a mixer) in one native call.

  Args:
    streams: sequence of tuples ``(u, delta, A, B, C, D, delta_bias)`` in float32:
      u, delta [b, l, d]; A [d, n]; B, C [b, l, n]; D, delta_bias [d] or None.
    reverse: one bool per stream.
    delta_softplus: apply softplus to ``delta + delta_bias``.
    threads: threads per call (default :func:`default_threads`, fewer for calls with
      less than MIN_WORK_PER_THREAD state updates a thread); results do not depend on it.

  Returns:
    list of y [b, l, d] (float32), each including ``D * u``.
  """
  require_native()
  batch, length, d_inner = streams[0][0].shape
  n_state = streams[0][2].shape[1]
  _require_concrete(batch, length, d_inner, n_state)
  zeros = jnp.zeros((d_inner,), jnp.float32)
  stack = lambda xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
  u = stack([s[0] for s in streams])
  delta = stack([s[1] for s in streams])
  At = stack([jnp.swapaxes(s[2], 0, 1) for s in streams])
  B = stack([s[3] for s in streams])
  C = stack([s[4] for s in streams])
  D = stack([zeros if s[5] is None else s[5] for s in streams])
  bias = stack([zeros if s[6] is None else s[6] for s in streams])
  mask = sum(1 << i for i, r in enumerate(reverse) if r)
  # A thread is started per call: worth it only for enough work (at batch 1 the
  # thread's start, tens of microseconds, exceeded a small member's whole scan).
  threads = _call_threads(len(streams) * batch * length * d_inner * n_state, threads)
  statics = (mask, int(bool(delta_softplus)), chunk_length(length, d_inner, n_state), threads)
  y = _core(u, delta, At, B, C, D, bias, statics)
  return [y[i] for i in range(len(streams))]


def _require_concrete(*dims) -> None:
  """Raises ValueError unless every dimension is a Python int (not symbolic)."""
  if not all(isinstance(v, int) for v in dims):
    raise ValueError(
        "scan method 'native' needs concrete shapes (it cannot be exported with a symbolic"
        " batch); use 'fused'"
    )


def _call_threads(work: int, threads: int | None) -> int:
  """Threads for a call doing ``work`` inner-loop updates (see MIN_WORK_PER_THREAD)."""
  if threads is not None:
    return max(1, int(threads))
  return max(1, min(default_threads(), work // MIN_WORK_PER_THREAD))


# ----------------------------------------------------------------------------
# The backward of the mixer's causal depthwise convolution and its SiLU.
# ----------------------------------------------------------------------------


def causal_conv_backward(x, kernel, bias, gy, *, silu=True, threads=None):
  """Gradients of ``sum(gy * silu(bias + sum_k kernel[k] * x[:, t - K + 1 + k]))``.

  The backward of :class:`mamba_pkd.layers.CausalDepthwiseConv1d` (with its SiLU) in
  one pass over each batch row: it recomputes the pre-activation and writes the
  input gradient and per-row kernel and bias gradients, which are summed here in a
  fixed order (the result does not depend on ``threads``). XLA's own gradient of the
  shifted sums kept every shifted copy and elementwise op as a pass of its own.

  Args:
    x: [batch, L, d] float32 (the convolution's input).
    kernel: [K, 1, d] (the Flax layer's parameter).
    bias: [d].
    gy: [batch, L, d], the output's cotangent.
    silu: the output went through SiLU (else the plain convolution).
    threads: threads per call (default: as for the scan).

  Returns:
    (gx [batch, L, d], gkernel [K, 1, d], gbias [d]), float32.
  """
  require_native()
  batch, length, d = x.shape
  _require_concrete(batch, length, d)
  taps = kernel.shape[0]
  f32 = jnp.float32
  sd = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
  gx, gw, gbias = jax.ffi.ffi_call(
      CONV_BACKWARD_TARGET,
      (sd(batch, length, d), sd(batch, taps, d), sd(batch, d)),
      vmap_method="sequential",
  )(
      jnp.asarray(x, f32),
      jnp.reshape(jnp.asarray(kernel, f32), (taps, d)),
      jnp.asarray(bias, f32),
      jnp.asarray(gy, f32),
      silu=np.int64(bool(silu)),
      threads=np.int64(_call_threads(batch * length * d * taps, threads)),
  )
  # Per-row parameter gradients, summed here in a fixed order (thread-independent).
  return gx, gw.sum(axis=0).reshape(kernel.shape), gbias.sum(axis=0)
