"""Selective scan (Mamba-1 S6 recurrence): one contract, several methods.

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
* ``"fused"``: ``jax.custom_vjp`` with a scan forward that saves only the inputs
  and the states at chunk boundaries, and a hand-written backward that recomputes
  each chunk's states and runs the reverse-time recurrence of the state gradient
  (bias, softplus and the D skip are folded in). Batch tiles keep the state in
  cache. Memory: O(batch * d_inner * N * L / FUSED_MAX_CHUNK) saved states plus
  one chunk's O(bt * d_inner * N * FUSED_MAX_CHUNK) buffer, never
  O(batch * L * d_inner * N). The fast path on CPU: forward+backward at
  (64, 196, 128, 16) measured about 10x faster than "parallel" and 4x faster
  than "sequential" on a shared 2-core CPU (experiments/bench_scan.py).
* ``"pallas"``: the kernel in :mod:`mamba_pkd.ssm.pallas_scan` (imported lazily;
  ``interpret=True`` off GPU).
* ``"auto"``: ``"pallas"`` on GPU, ``"fused"`` elsewhere.

Inputs may be float32 or bfloat16; everything is accumulated in float32 (float64
if the inputs are float64, for gradient checks) and ``y`` is returned in
``u.dtype``.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax

SCAN_METHODS = ("sequential", "parallel", "chunked", "fused", "pallas", "auto")

_logger = logging.getLogger(__name__)
_AUTO_LOGGED = set()


# --------------------------------------------------------------------------
# Validation and shared preprocessing
# --------------------------------------------------------------------------


def _check_shape(name, x, expected, description):
  if x is None:
    raise ValueError(f"{name} is None; expected an array of shape {description} = {expected}")
  shape = tuple(jnp.shape(x))
  if shape != tuple(expected):
    raise ValueError(f"{name} has shape {shape}; expected {description} = {tuple(expected)}")


def _validate(u, delta, A, B, C, D, delta_bias, method, chunk_size):
  """Raises ValueError naming the first bad argument; cheap, shape-only."""
  if method not in SCAN_METHODS:
    raise ValueError(f"method={method!r} is not a valid scan method; valid: {SCAN_METHODS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
  validate_scan_inputs(u, delta, A, B, C, D, delta_bias)


def validate_scan_inputs(u, delta, A, B, C, D=None, delta_bias=None):
  """Shapes and dtypes of the scan's arrays (shared with the Pallas kernel).

  Raises:
    ValueError: naming the first bad argument and the expected shape or dtype.
  """
  if jnp.ndim(u) != 3:
    raise ValueError(f"u has shape {tuple(jnp.shape(u))}; expected 3 dims (batch, L, d_inner)")
  batch, length, d_inner = jnp.shape(u)
  if batch < 1 or length < 1 or d_inner < 1:
    raise ValueError(f"u has shape {tuple(jnp.shape(u))}; batch, L and d_inner must all be >= 1")
  if jnp.ndim(A) != 2 or jnp.shape(A)[0] != d_inner or jnp.shape(A)[1] < 1:
    raise ValueError(
        f"A has shape {tuple(jnp.shape(A))}; expected (d_inner, N) with d_inner = {d_inner}"
        " and N >= 1"
    )
  n_state = jnp.shape(A)[1]
  _check_shape("delta", delta, (batch, length, d_inner), "(batch, L, d_inner)")
  _check_shape("B", B, (batch, length, n_state), "(batch, L, N)")
  _check_shape("C", C, (batch, length, n_state), "(batch, L, N)")
  if D is not None:
    _check_shape("D", D, (d_inner,), "(d_inner,)")
  if delta_bias is not None:
    _check_shape("delta_bias", delta_bias, (d_inner,), "(d_inner,)")
  for name, x in (
      ("u", u),
      ("delta", delta),
      ("A", A),
      ("B", B),
      ("C", C),
      ("D", D),
      ("delta_bias", delta_bias),
  ):
    if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name} has dtype {jnp.result_type(x)}; expected a floating dtype")


def _compute_dtype(*arrays):
  """float32, or float64 when an input is float64 (x64 gradient checks)."""
  dtypes = [jnp.result_type(x) for x in arrays if x is not None]
  return jnp.result_type(jnp.float32, *dtypes)


def compute_dt(delta, delta_bias=None, delta_softplus=True, dtype=jnp.float32):
  """Step size ``dt = softplus(delta + delta_bias)`` in ``dtype``.

  Args:
    delta: [batch, L, d_inner] raw step size.
    delta_bias: [d_inner] or None.
    delta_softplus: apply softplus after the bias.
    dtype: accumulation dtype.

  Returns:
    [batch, L, d_inner] array of ``dtype``.
  """
  dt = delta.astype(dtype)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(dtype)
  if delta_softplus:
    dt = jax.nn.softplus(dt)
  return dt


# --------------------------------------------------------------------------
# Reference scans: inputs u, dt [b, l, d]; A [d, n]; B, C [b, l, n] in the compute
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
# Fused: custom_vjp with chunk-boundary checkpoints and a hand-written backward.
#
# Layout, chosen by measurement on a 2-core CPU (experiments/bench_scan.py):
#  * the state is kept as [bt, N, d_inner] (d_inner minor): reductions over N
#    are then vector adds, where a minor-axis reduction over N = 16 was ~2x slower;
#  * the batch is cut into tiles of bt rows (lax.map over tiles) so that a tile's
#    state (~64 KiB) stays in L1/L2 across all time steps; one big [batch, D, N]
#    state (512 KiB at batch 64, D 128) was ~2x slower per element;
#  * time is cut into nc chunks of T steps; the forward saves only the state at
#    each chunk start ([nb, nc, bt, N, d_inner]); the backward recomputes one
#    chunk's states ([T, bt, N, d_inner]) and then runs the reverse recurrence
#    step by step, computing every gradient inside that step.
# Tiled arrays: u, dt, gy [nb, nc, T, bt, d]; B, C [nb, nc, T, bt, N]; At [N, d].
# --------------------------------------------------------------------------

# Largest chunk (time steps whose states the backward rebuilds at once) and the
# target number of state elements per batch tile (16384 floats = 64 KiB).
FUSED_MAX_CHUNK = 32
FUSED_TILE_ELEMENTS = 16384


def fused_geometry(batch, length, d_inner, n_state, max_chunk=None, tile_elements=None):
  """Tiling of the fused method: returns (nb, bt, nc, T).

  ``nb * bt >= batch`` and ``nc * T >= length``, with the padding kept small:
  ``bt`` rows per batch tile (about ``tile_elements`` state elements, default
  ``FUSED_TILE_ELEMENTS``) and ``T`` steps per chunk (at most ``max_chunk``,
  default ``FUSED_MAX_CHUNK``). A symbolic ``batch`` (``jax.export`` with a
  polymorphic batch) gets a single tile, ``nb = 1``, ``bt = batch``.
  """
  max_chunk = FUSED_MAX_CHUNK if max_chunk is None else max_chunk
  tile_elements = FUSED_TILE_ELEMENTS if tile_elements is None else tile_elements
  nc = -(-length // max_chunk)
  chunk = -(-length // nc)
  if not isinstance(batch, int):  # symbolic batch (jax.export): one tile of all rows
    return 1, batch, nc, chunk
  bt_max = max(1, min(batch, tile_elements // (d_inner * n_state)))
  nb = -(-batch // bt_max)
  bt = -(-batch // nb)
  return nb, bt, nc, chunk


def _to_tiles(x, nb, bt, nc, chunk):
  """[batch, L, k] -> [nb, nc, T, bt, k], zero-padded.

  Padding is inert: padded batch rows have u = B = C = 0, so their state, output
  and gradients are 0; padded steps come after the last real step (in scan order)
  and receive a zero output cotangent, so they change no real output or gradient.
  """
  batch, length, k = x.shape
  pad_batch = 0 if nb == 1 else nb * bt - batch  # nb == 1: bt == batch (maybe symbolic)
  pad_time = nc * chunk - length
  if pad_batch or pad_time:
    x = jnp.pad(x, ((0, pad_batch), (0, pad_time), (0, 0)))
  return x.reshape(nb, bt, nc, chunk, k).transpose(0, 2, 3, 1, 4)


def _from_tiles(x, batch, length):
  """[nb, nc, T, bt, k] -> [batch, L, k] (drops the padding)."""
  nb, nc, chunk, bt, k = x.shape
  x = x.transpose(0, 3, 1, 2, 4).reshape(nb * bt, nc * chunk, k)
  return x[:batch, :length]


def _fused_step(h, u_t, dt_t, b_t, At):
  """One step: h [bt, N, d]; u_t, dt_t [bt, d]; b_t [bt, N] -> (h_t, dA_t)."""
  dA = jnp.exp(dt_t[:, None, :] * At)  # [bt, N, d]
  return dA * h + (dt_t * u_t)[:, None, :] * b_t[:, :, None], dA


def _fused_chunk_dt(delta_c, bias, softplus):
  """dt of one chunk [T, bt, d] from raw delta, and its pre-activation."""
  pre = delta_c + bias
  return (jax.nn.softplus(pre) if softplus else pre), pre


def _fused_tile_forward(u, delta, At, B, C, D, bias, softplus, save_states):
  """Forward of one batch tile: y [nc, T, bt, d] (and chunk-start states [nc, bt, N, d])."""

  def chunk_step(h, x):
    u_c, delta_c, b_c, c_c = x
    dt_c, _ = _fused_chunk_dt(delta_c, bias, softplus)

    def step(h, xt):
      u_t, dt_t, b_t, c_t = xt
      h, _ = _fused_step(h, u_t, dt_t, b_t, At)
      return h, jnp.einsum("bnd,bn->bd", h, c_t)

    h_end, y_c = lax.scan(step, h, (u_c, dt_c, b_c, c_c))
    y_c = y_c + u_c * D
    return h_end, ((y_c, h) if save_states else y_c)

  h0 = jnp.zeros((u.shape[2],) + At.shape, u.dtype)
  _, out = lax.scan(chunk_step, h0, (u, delta, B, C))
  return out


def _fused_tile_backward(u, delta, At, B, C, D, bias, gy, h_starts, softplus):
  """Backward of one batch tile.

  Returns ((gu, gdelta, gB, gC) tiled, gA [N, d], gD [d], gbias [d]).

  With ``g_t = dL/dh_t`` (total, through later states):
  ``g_t = C_t gy_t + dA_{t+1} g_{t+1}``, and per step
  ``dL/dC_t = sum_d gy_t h_t``, ``dL/dB_t = sum_d g_t dt_t u_t``,
  ``dL/du_t = dt_t sum_N g_t B_t + D gy_t``,
  ``dL/ddt_t = u_t sum_N g_t B_t + sum_N A g_t dA_t h_{t-1}``,
  ``dL/dA = sum_{b,t} dt_t g_t dA_t h_{t-1}``; then
  ``dL/ddelta = dL/ddt * sigmoid(delta + bias)`` (softplus' derivative),
  ``dL/dbias = sum_{b,t} dL/ddelta`` and ``dL/dD = sum_{b,t} gy u``.
  ``h_{t-1}`` comes from recomputing the chunk forward from its saved start
  state (never from dividing by ``dA``, which may underflow to 0).
  """

  def chunk_step(carry, x):
    # g_next [bt, N, d] = dA_{t+1} g_{t+1} past the chunk end; gA [bt, N, d]; gD, gbias [d]
    g_next, gA, gD, gbias = carry
    u_c, delta_c, b_c, c_c, gy_c, h0 = x
    dt_c, pre = _fused_chunk_dt(delta_c, bias, softplus)

    def recompute(h, xt):
      u_t, dt_t, b_t, gy_t = xt
      h_new, _ = _fused_step(h, u_t, dt_t, b_t, At)
      return h_new, (h, jnp.einsum("bnd,bd->bn", h_new, gy_t))  # h_{t-1}, dL/dC_t

    _, (h_prev, gC) = lax.scan(recompute, h0, (u_c, dt_c, b_c, gy_c))

    def reverse_step(carry, xt):
      g_next, gA = carry
      u_t, dt_t, b_t, c_t, gy_t, hp_t = xt
      dA = jnp.exp(dt_t[:, None, :] * At)  # [bt, N, d]
      g = c_t[:, :, None] * gy_t[:, None, :] + g_next  # [bt, N, d]
      gB = jnp.einsum("bnd,bd->bn", g, dt_t * u_t)
      g_bsum = jnp.sum(g * b_t[:, :, None], axis=1)  # [bt, d]
      r = g * dA * hp_t  # [bt, N, d] = g_t dA_t h_{t-1}
      gdt = g_bsum * u_t + jnp.sum(r * At, axis=1)
      gA = gA + r * dt_t[:, None, :]  # summed over the tile after the scan
      return (dA * g, gA), (g_bsum * dt_t, gdt, gB)

    (g_next, gA), (gu, gdt, gB) = lax.scan(
        reverse_step, (g_next, gA), (u_c, dt_c, b_c, c_c, gy_c, h_prev), reverse=True
    )
    gdelta = gdt * jax.nn.sigmoid(pre) if softplus else gdt
    gD = gD + jnp.sum(gy_c * u_c, axis=(0, 1))
    gbias = gbias + jnp.sum(gdelta, axis=(0, 1))
    return (g_next, gA, gD, gbias), (gu + gy_c * D, gdelta, gB, gC)

  zeros = jnp.zeros(h_starts.shape[1:], u.dtype)  # [bt, N, d]
  zeros_d = jnp.zeros(D.shape, u.dtype)
  (_, gA, gD, gbias), grads = lax.scan(
      chunk_step, (zeros, zeros, zeros_d, zeros_d), (u, delta, B, C, gy, h_starts), reverse=True
  )
  return grads, jnp.sum(gA, axis=0), gD, gbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_core(u, delta, At, B, C, D, bias, softplus):
  return lax.map(
      lambda x: _fused_tile_forward(x[0], x[1], At, x[2], x[3], D, bias, softplus, False),
      (u, delta, B, C),
  )


def _fused_core_fwd(u, delta, At, B, C, D, bias, softplus):
  y, h_starts = lax.map(
      lambda x: _fused_tile_forward(x[0], x[1], At, x[2], x[3], D, bias, softplus, True),
      (u, delta, B, C),
  )
  return y, (u, delta, At, B, C, D, bias, h_starts)


def _fused_core_bwd(softplus, res, gy):
  u, delta, At, B, C, D, bias, h_starts = res
  (gu, gdelta, gB, gC), gA, gD, gbias = lax.map(
      lambda x: _fused_tile_backward(x[0], x[1], At, x[2], x[3], D, bias, x[4], x[5], softplus),
      (u, delta, B, C, gy, h_starts),
  )
  return (gu, gdelta, jnp.sum(gA, axis=0), gB, gC, jnp.sum(gD, axis=0), jnp.sum(gbias, axis=0))


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def _scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus, reverse):
  """Fused method on raw inputs (bias, softplus and the D skip happen inside).

  Args: u, delta [b, l, d]; A [d, n]; B, C [b, l, n]; D, delta_bias [d] or None;
  all in the compute dtype. Returns y [b, l, d] including ``D * u``.
  """
  if reverse:
    u, delta, B, C = (jnp.flip(x, axis=1) for x in (u, delta, B, C))
  batch, length, d_inner = u.shape
  zeros = jnp.zeros((d_inner,), u.dtype)
  D = zeros if D is None else D
  delta_bias = zeros if delta_bias is None else delta_bias
  nb, bt, nc, chunk = fused_geometry(batch, length, d_inner, A.shape[1])
  tiles = functools.partial(_to_tiles, nb=nb, bt=bt, nc=nc, chunk=chunk)
  y = _fused_core(
      tiles(u), tiles(delta), A.T, tiles(B), tiles(C), D, delta_bias, bool(delta_softplus)
  )  # [nb, nc, T, bt, d]
  y = _from_tiles(y, batch, length)
  if reverse:
    y = jnp.flip(y, axis=1)
  return y


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _resolve_auto():
  """'pallas' on GPU (when its kernel can run), 'fused' elsewhere; logs the reason once."""
  platform = jax.default_backend()
  method, reason = "fused", f"default backend is {platform!r}, not 'gpu'"
  if platform == "gpu":
    try:
      from mamba_pkd.ssm import pallas_scan  # pylint: disable=g-import-not-at-top

      ok, why = pallas_scan.pallas_available(interpret=False)
    except ImportError as e:
      ok, why = False, f"mamba_pkd.ssm.pallas_scan failed to import: {e}"
    if ok:
      method, reason = "pallas", "default backend is 'gpu'"
    else:
      reason = f"default backend is 'gpu' but the Pallas kernel is unavailable ({why})"
  if (method, reason) not in _AUTO_LOGGED:
    _AUTO_LOGGED.add((method, reason))
    _logger.info("selective_scan method='auto' -> %r: %s", method, reason)
  return method


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
    method: one of ``SCAN_METHODS``.
    chunk_size: steps per chunk of the ``"chunked"`` method (>= 1).
    unroll: ``lax.scan`` unrolling of the ``"sequential"`` method (``True`` =
      fully unrolled: no while loop, so XLA's ``cost_analysis()`` counts every
      step, see ``mamba_pkd.flops.xla_forward_flops``).

  Returns:
    y: [batch, L, d_inner] in ``u.dtype``.

  Raises:
    ValueError: bad shapes, dtypes, ``method`` or ``chunk_size``.
  """
  _validate(u, delta, A, B, C, D, delta_bias, method, chunk_size)
  if method == "auto":
    method = _resolve_auto()
  if method == "pallas":
    return _selective_scan_pallas(u, delta, A, B, C, D, delta_bias, delta_softplus, reverse)

  cdt = _compute_dtype(u, delta, A, B, C, D, delta_bias)
  uc, Ac, Bc, Cc = (x.astype(cdt) for x in (u, A, B, C))
  if method == "fused":
    Dc, biasc = (None if x is None else x.astype(cdt) for x in (D, delta_bias))
    y = _scan_fused(uc, delta.astype(cdt), Ac, Bc, Cc, Dc, biasc, delta_softplus, reverse)
    return y.astype(u.dtype)
  dt = compute_dt(delta, delta_bias, delta_softplus, cdt)
  if method == "sequential":
    y = _scan_sequential(uc, dt, Ac, Bc, Cc, reverse, unroll)
  elif method == "parallel":
    y = _scan_parallel(uc, dt, Ac, Bc, Cc, reverse)
  else:  # chunked
    y = _scan_chunked(uc, dt, Ac, Bc, Cc, reverse, chunk_size)
  if D is not None:
    y = y + uc * D.astype(cdt)
  return y.astype(u.dtype)


def _selective_scan_pallas(u, delta, A, B, C, D, delta_bias, delta_softplus, reverse):
  try:
    from mamba_pkd.ssm import pallas_scan  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "method='pallas' needs mamba_pkd.ssm.pallas_scan, which failed to import: "
        f"{e}; use method='fused' instead"
    ) from e
  interpret = jax.default_backend() != "gpu"
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
      interpret=interpret,
  )
