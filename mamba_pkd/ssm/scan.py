"""Selective scan (Mamba-1 S6 recurrence): one contract, several methods.

This module owns the public entry points :func:`selective_scan` (validation via
:mod:`mamba_pkd.ssm.common`, then dispatch on :class:`ScanMethod`) and
:func:`selective_scan_streams` (several equal-shaped scans, e.g. both directions
of a bidirectional mixer, in one fused call), and the plain
XLA methods ``"sequential"``, ``"parallel"`` and ``"chunked"``. The ``"fused"``
method lives in :mod:`mamba_pkd.ssm.fused`, the ``"native"`` CPU kernel in
:mod:`mamba_pkd.ssm.native`, the ``"pallas"`` kernel in
:mod:`mamba_pkd.ssm.pallas_scan`; none imports this module.

Notation (code name -> paper symbol, Gu & Dao 2023, Algorithm 2):

  ==========  ===========  ===============================================
  code        paper        meaning
  ==========  ===========  ===============================================
  ``u``       x            input sequence, [batch, L, d_inner]
  ``delta``   Delta        raw step size (before bias and softplus)
  ``dt``      Delta        step size after ``softplus(delta + delta_bias)``
  ``A``       A            state matrix (diagonal per channel), [d_inner, N]
  ``B``       B            input projection, [batch, L, N]
  ``C``       C            output projection, [batch, L, N]
  ``D``       D            skip connection, [d_inner]
  ``dA``      A-bar        ``exp(dt * A)``, [batch, d_inner, N] per step
  ``dBu``     B-bar x      ``dt * B * u``, [batch, d_inner, N] per step
  ``h``       h            hidden state, [batch, d_inner, N]
  ==========  ===========  ===============================================

Recurrence (zero initial state): ``h_t = dA_t * h_{t-1} + dBu_t`` and
``y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]``. ``reverse=True`` runs it from
``t = L - 1`` down to ``0``.

Methods (all agree to float32 rounding and are differentiable):

* ``"sequential"``: ``lax.scan`` over time, discretising inside the step; the
  reference. Memory O(batch * d_inner * N) per step, autodiff saves every state.
* ``"parallel"``: ``lax.associative_scan`` over ``(dA, dBu)`` pairs; materialises
  [batch, L, d_inner, N] tensors (the textbook formulation, memory heavy).
* ``"chunked"``: associative scan inside chunks of ``chunk_size`` steps, state
  carried sequentially across chunks; memory bounded by ``chunk_size``.
* ``"fused"``: :mod:`mamba_pkd.ssm.fused`, ``jax.custom_vjp`` with a scan
  forward that saves only the inputs and the states at chunk boundaries, and a
  hand-written backward that recomputes each chunk's states (memory never
  O(batch * L * d_inner * N)). The fast path on CPU: forward+backward at
  (64, 196, 128, 16) on a quiet 2-core machine, 92 ms against 642 ms for
  "parallel" (6.98x in wall clock, 11.3x in CPU time: XLA spreads "parallel"'s
  large ops over both cores, while the fused tile loops run on one; issue 14,
  experiments/bench_scan.py). Independent loops do not help: XLA:CPU (JAX
  0.10.2) was profiled running two data-independent while loops one after the
  other on one thread.
* ``"native"``: :mod:`mamba_pkd.ssm.native`, the fused method's algorithm as a C++
  kernel called through ``jax.ffi`` (compiled on first use with the system's
  C++ compiler; CPU, float32; the batch rows spread over threads). On the same
  benchmark shape it is several times faster than ``"fused"`` (README, "Speed").
* ``"pallas"``: the kernel in :mod:`mamba_pkd.ssm.pallas_scan` (``interpret=True``
  off GPU).
* ``"auto"``: ``"pallas"`` on GPU; on CPU ``"native"`` where its kernel builds,
  else ``"fused"`` (the reason is logged once).

Inputs may be float32 or bfloat16; everything is accumulated in float32 (float64
if the inputs are float64, for gradient checks) and ``y`` is returned in
``u.dtype``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax import lax

from mamba_pkd.ssm import fused
from mamba_pkd.ssm import native
from mamba_pkd.ssm import pallas_scan
from mamba_pkd.ssm.common import SCAN_METHODS
from mamba_pkd.ssm.common import ScanMethod
from mamba_pkd.ssm.common import check_chunk_size
from mamba_pkd.ssm.common import compute_dt
from mamba_pkd.ssm.common import compute_dtype
from mamba_pkd.ssm.common import as_scan_method
from mamba_pkd.ssm.common import shapes_match
from mamba_pkd.ssm.common import validate_scan_inputs

__all__ = [
    "SCAN_METHODS",
    "ScanMethod",
    "compute_dt",
    "selective_scan",
    "selective_scan_streams",
    "validate_scan_inputs",
]

_logger = logging.getLogger(__name__)
_AUTO_LOGGED = set()


# --------------------------------------------------------------------------
# XLA scans: inputs u, dt [b, l, d]; A [d, n]; B, C [b, l, n] in the compute
# dtype. They return the SSM output without the D skip, [b, l, d].
# --------------------------------------------------------------------------


def _scan_sequential(u, dt, A, B, C, reverse, unroll=1):
  """lax.scan over time; discretises inside the step."""
  batch, _, d_inner = u.shape
  n_state = A.shape[1]
  xs = tuple(jnp.swapaxes(x, 0, 1) for x in (u, dt, B, C))  # time-major

  def step(h, x):
    u_t, dt_t, b_t, c_t = x  # [b, d], [b, d], [b, n], [b, n]
    dA = jnp.exp(dt_t[:, :, None] * A)  # [b, d, n]
    h = dA * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]  # [b, d, n]
    y_t = jnp.sum(h * c_t[:, None, :], axis=-1)  # [b, d]
    return h, y_t

  h0 = jnp.zeros((batch, d_inner, n_state), u.dtype)
  _, ys = lax.scan(step, h0, xs, reverse=reverse, unroll=unroll)
  return jnp.swapaxes(ys, 0, 1)


def _combine(left, right):
  """Composition of affine maps h -> a*h + b; ``left`` acts first."""
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _scan_parallel(u, dt, A, B, C, reverse):
  """Associative scan over materialised (dA, dBu) of shape [b, l, d, n]."""
  dA = jnp.exp(dt[..., None] * A)  # [b, l, d, n]
  dBu = (dt * u)[..., None] * B[:, :, None, :]  # [b, l, d, n]
  _, h = lax.associative_scan(_combine, (dA, dBu), axis=1, reverse=reverse)
  return jnp.einsum("bldn,bln->bld", h, C)


def _pad_time(x, pad):
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)


def _to_chunks(x, n_chunks, chunk):
  """[b, n_chunks*chunk, ...] -> [n_chunks, b, chunk, ...]."""
  x = x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _scan_chunked(u, dt, A, B, C, reverse, chunk_size):
  """Associative scan inside chunks, sequential state carry across chunks.

  The sequence is zero-padded to a multiple of ``chunk_size``: ``dt = 0`` gives
  the identity element ``(dA, dBu) = (1, 0)``, so padding never changes the state.
  """
  if reverse:
    u, dt, B, C = (jnp.flip(x, axis=1) for x in (u, dt, B, C))
  batch, length, d_inner = u.shape
  n_state = A.shape[1]
  chunk = min(chunk_size, length)
  n_chunks = -(-length // chunk)
  pad = n_chunks * chunk - length
  xs = tuple(_to_chunks(_pad_time(x, pad), n_chunks, chunk) for x in (u, dt, B, C))

  def chunk_step(h, x):
    u_c, dt_c, b_c, c_c = x  # [b, T, d], [b, T, d], [b, T, n], [b, T, n]
    dA = jnp.exp(dt_c[..., None] * A)  # [b, T, d, n]
    dBu = (dt_c * u_c)[..., None] * b_c[:, :, None, :]  # [b, T, d, n]
    a_cum, h_loc = lax.associative_scan(_combine, (dA, dBu), axis=1)
    h_all = a_cum * h[:, None] + h_loc  # [b, T, d, n]
    y_c = jnp.einsum("btdn,btn->btd", h_all, c_c)
    return h_all[:, -1], y_c

  h0 = jnp.zeros((batch, d_inner, n_state), u.dtype)
  _, ys = lax.scan(chunk_step, h0, xs)  # [n_chunks, b, T, d]
  y = jnp.swapaxes(ys, 0, 1).reshape(batch, n_chunks * chunk, d_inner)[:, :length]
  if reverse:
    y = jnp.flip(y, axis=1)
  return y


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _resolve_auto():
  """PALLAS on GPU (when its kernel can run); on CPU NATIVE (when its kernel builds),
  else FUSED; logs the reason once."""
  platform = jax.default_backend()
  method, reason = ScanMethod.FUSED, f"default backend is {platform!r}"
  if platform == "cpu":
    ok, why = native.native_available()
    if ok:
      method, reason = ScanMethod.NATIVE, "default backend is 'cpu' and the native kernel built"
    else:
      reason = f"default backend is 'cpu' but the native kernel is unavailable ({why})"
  elif platform == "gpu":
    ok, why = pallas_scan.pallas_available(interpret=False)
    if ok:
      method, reason = ScanMethod.PALLAS, "default backend is 'gpu'"
    else:
      reason = f"default backend is 'gpu' but the Pallas kernel is unavailable ({why})"
  if (method, reason) not in _AUTO_LOGGED:
    _AUTO_LOGGED.add((method, reason))
    _logger.info("selective_scan method='auto' -> %r: %s", method.value, reason)
  return method


def resolve_method(method) -> ScanMethod:
  """``method`` (a :class:`ScanMethod` or its value) with ``"auto"`` resolved for the
  default backend, as :func:`selective_scan` resolves it."""
  method = as_scan_method(method)
  return _resolve_auto() if method is ScanMethod.AUTO else method


def _native(cdt, streams, reverse, delta_softplus):
  """The native kernel's outputs (each in its stream's ``u.dtype``), or None where the
  compute dtype is not float32 (float64 gradient checks), which then run ``"fused"``.

  Raises RuntimeError when the kernel cannot be built here.
  """
  native.require_native()
  if cdt != jnp.float32:
    return None
  ys = native.scan_native_streams(streams, reverse, delta_softplus)
  return [y.astype(s[0].dtype) for y, s in zip(ys, streams)]


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    *,
    delta_bias=None,
    delta_softplus=True,
    reverse=False,
    method="auto",
    chunk_size=64,
    unroll=1,
):
  """Selective scan ``y = S6(u)`` with Mamba's discretisation.

  Args:
    u: [batch, L, d_inner] input, float32 or bfloat16.
    delta: [batch, L, d_inner] raw step size (bias and softplus applied here).
    A: [d_inner, N] state matrix (negative real in practice, ``-exp(A_log)``).
    B: [batch, L, N] input-dependent input projection.
    C: [batch, L, N] input-dependent output projection.
    D: [d_inner] skip connection, or None.
    delta_bias: [d_inner] added to ``delta`` before the softplus, or None.
    delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
    reverse: run the recurrence from ``t = L - 1`` down to ``0``.
    method: a :class:`ScanMethod` or its string value (``SCAN_METHODS``).
    chunk_size: steps per chunk of the ``"chunked"`` method (>= 1).
    unroll: ``lax.scan`` unrolling of the ``"sequential"`` method (``True`` =
      fully unrolled: no while loop, so XLA's ``cost_analysis()`` counts every
      step, see ``mamba_pkd.flops.xla_forward_flops``).

  Returns:
    y: [batch, L, d_inner] in ``u.dtype``.

  Raises:
    ValueError: bad shapes, dtypes, ``method`` or ``chunk_size``.
  """
  method = as_scan_method(method)
  check_chunk_size(chunk_size)
  validate_scan_inputs(u, delta, A, B, C, D, delta_bias)
  method = resolve_method(method)
  if method is ScanMethod.PALLAS:
    return pallas_scan.selective_scan_pallas(
        u,
        delta,
        A,
        B,
        C,
        D,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        reverse=reverse,
        interpret=jax.default_backend() != "gpu",
    )

  cdt = compute_dtype(u, delta, A, B, C, D, delta_bias)
  if method is ScanMethod.NATIVE:
    ys = _native(cdt, [(u, delta, A, B, C, D, delta_bias)], [reverse], delta_softplus)
    if ys is not None:
      return ys[0]
    method = ScanMethod.FUSED
  uc, Ac, Bc, Cc = (x.astype(cdt) for x in (u, A, B, C))
  if method is ScanMethod.FUSED:
    Dc, biasc = (None if x is None else x.astype(cdt) for x in (D, delta_bias))
    y = fused.scan_fused(uc, delta.astype(cdt), Ac, Bc, Cc, Dc, biasc, delta_softplus, reverse)
    return y.astype(u.dtype)
  dt = compute_dt(delta, delta_bias, delta_softplus, cdt)
  if method is ScanMethod.SEQUENTIAL:
    y = _scan_sequential(uc, dt, Ac, Bc, Cc, reverse, unroll)
  elif method is ScanMethod.PARALLEL:
    y = _scan_parallel(uc, dt, Ac, Bc, Cc, reverse)
  elif method is ScanMethod.CHUNKED:
    y = _scan_chunked(uc, dt, Ac, Bc, Cc, reverse, chunk_size)
  else:  # a ScanMethod member added without a branch here
    raise NotImplementedError(f"selective_scan has no implementation of method={method.value!r}")
  if D is not None:
    y = y + uc * D.astype(cdt)
  return y.astype(u.dtype)


def selective_scan_streams(
    streams,
    *,
    reverse,
    delta_softplus=True,
    method="auto",
    chunk_size=64,
    unroll=1,
):
  """Several independent selective scans of equal shapes, e.g. both directions of a mixer.

  ``selective_scan_streams([f, b], reverse=[False, True])`` equals
  ``[selective_scan(*f), selective_scan(*b, reverse=True)]`` (values, and
  gradients to float32 rounding). With ``method="fused"`` or ``"native"`` (or
  ``"auto"`` when it resolves to one of them) the streams go through one call:
  one ``custom_vjp`` over all streams' batch rows, forward and backward. Other
  methods run one call per stream.

  Args:
    streams: sequence of tuples ``(u, delta, A, B, C, D, delta_bias)`` as in
      :func:`selective_scan` (``D`` and ``delta_bias`` may be None); every
      stream has the same shapes.
    reverse: sequence of bools, one per stream.
    delta_softplus, method, chunk_size, unroll: as in :func:`selective_scan`,
      shared by the streams.

  Returns:
    list of y [batch, L, d_inner], one per stream, each in its ``u.dtype``.

  Raises:
    ValueError: bad shapes, dtypes, ``method``, ``chunk_size``, streams of
      different shapes, or ``len(reverse) != len(streams)``.
  """
  streams = [tuple(s) for s in streams]
  reverse = [bool(r) for r in reverse]
  if not streams or len(reverse) != len(streams) or any(len(s) != 7 for s in streams):
    raise ValueError(
        f"selective_scan_streams needs >= 1 streams of 7 arrays (u, delta, A, B, C, D,"
        f" delta_bias) and one reverse flag each; got {len(streams)} streams and"
        f" {len(reverse)} flags"
    )
  method = as_scan_method(method)
  check_chunk_size(chunk_size)
  for s in streams:
    validate_scan_inputs(*s)
  u0, a0 = jnp.shape(streams[0][0]), jnp.shape(streams[0][2])
  for i, s in enumerate(streams[1:], 1):
    if not (shapes_match(jnp.shape(s[0]), u0) and shapes_match(jnp.shape(s[2]), a0)):
      raise ValueError(
          f"stream {i} has u {jnp.shape(s[0])} and A {jnp.shape(s[2])}; stream 0 has"
          f" u {u0} and A {a0} (all streams need equal shapes)"
      )
  method = resolve_method(method)
  cdt = compute_dtype(*(x for s in streams for x in s))
  if method is ScanMethod.NATIVE and len(streams) > 1:
    ys = _native(cdt, streams, reverse, delta_softplus)
    if ys is not None:
      return ys
    method = ScanMethod.FUSED
  if method is not ScanMethod.FUSED or len(streams) == 1:
    return [
        selective_scan(
            *s[:6],
            delta_bias=s[6],
            delta_softplus=delta_softplus,
            reverse=r,
            method=method,
            chunk_size=chunk_size,
            unroll=unroll,
        )
        for s, r in zip(streams, reverse)
    ]
  cast = [tuple(None if x is None else x.astype(cdt) for x in s) for s in streams]
  ys = fused.scan_fused_streams(cast, reverse, delta_softplus)
  return [y.astype(s[0].dtype) for y, s in zip(ys, streams)]
