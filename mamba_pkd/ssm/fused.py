"""The ``"fused"`` selective scan: a ``jax.custom_vjp`` with a hand-written backward.

This module owns the fused method (called through
:func:`mamba_pkd.ssm.scan.selective_scan` with ``method="fused"``): its tiling
(:func:`fused_geometry`), forward, and backward. The forward is a scan that saves
only the inputs and the states at chunk boundaries; the backward recomputes each
chunk's states and runs the reverse-time recurrence of the state gradient (bias,
softplus and the D skip are folded in). Batch tiles keep the state in cache.
Memory: O(batch * d_inner * N * L / FUSED_MAX_CHUNK) saved states plus one
chunk's O(bt * d_inner * N * FUSED_MAX_CHUNK) buffer, never
O(batch * L * d_inner * N). Notation as in :mod:`mamba_pkd.ssm.scan`.
:func:`scan_fused_streams` runs several equal-shaped scans (both directions of a
bidirectional mixer) through one ``custom_vjp`` and one loop over their tiles.

It imports nothing from ``mamba_pkd``; inputs are validated by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

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


# The core works on K tasks, the batch tiles of one or more independent scans: u,
# delta [K, nc, T, bt, d]; B, C [K, nc, T, bt, N]; and per task At [K, N, d], D,
# bias [K, d]. Its backward returns per-task gradients of At, D and bias; the
# broadcast of each scan's parameters to its tasks (in scan_fused_streams) sums
# them by autodiff.


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_core(u, delta, At, B, C, D, bias, softplus):
  return lax.map(lambda x: _fused_tile_forward(*x, softplus, False), (u, delta, At, B, C, D, bias))


def _fused_core_fwd(u, delta, At, B, C, D, bias, softplus):
  y, h_starts = lax.map(
      lambda x: _fused_tile_forward(*x, softplus, True), (u, delta, At, B, C, D, bias)
  )
  return y, (u, delta, At, B, C, D, bias, h_starts)


def _fused_core_bwd(softplus, res, gy):
  u, delta, At, B, C, D, bias, h_starts = res
  (gu, gdelta, gB, gC), gA, gD, gbias = lax.map(
      lambda x: _fused_tile_backward(*x, softplus), (u, delta, At, B, C, D, bias, gy, h_starts)
  )
  return gu, gdelta, gA, gB, gC, gD, gbias


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def scan_fused_streams(streams, reverse, delta_softplus):
  """Several independent fused scans of equal shapes in one fused call.

  Args:
    streams: sequence of S tuples ``(u, delta, A, B, C, D, delta_bias)``, each as
      in :func:`scan_fused` (own parameters; same shapes and dtype in all).
    reverse: sequence of S bools, the direction of each scan.
    delta_softplus: as in :func:`scan_fused` (shared).

  Returns:
    list of S outputs y [b, l, d], each equal to ``scan_fused`` of its stream.

  The S * nb batch tiles of all streams (e.g. both directions of a bidirectional
  mixer, each with its own B, C, A, D and bias) go through one ``custom_vjp``
  and one loop over tiles, forward and backward. Each tile is computed exactly
  as in a separate call, so values are equal; the gradients of A, D and
  delta_bias (sums over tiles) are equal to float32 rounding.
  """
  batch, length, d_inner = streams[0][0].shape
  dtype = streams[0][0].dtype
  nb, bt, nc, chunk = fused_geometry(batch, length, d_inner, streams[0][2].shape[1])
  zeros = jnp.zeros((d_inner,), dtype)
  parts = {k: [] for k in ("u", "delta", "At", "B", "C", "D", "bias")}
  for (u, delta, A, B, C, D, bias), rev in zip(streams, reverse):
    if rev:
      u, delta, B, C = (jnp.flip(x, axis=1) for x in (u, delta, B, C))
    for k, x in (("u", u), ("delta", delta), ("B", B), ("C", C)):
      parts[k].append(_to_tiles(x, nb, bt, nc, chunk))  # [nb, nc, T, bt, .]
    for k, x in (
        ("At", A.T),
        ("D", zeros if D is None else D),
        ("bias", zeros if bias is None else bias),
    ):
      parts[k].append(jnp.broadcast_to(x, (nb,) + x.shape))
  cat = {k: v[0] if len(v) == 1 else jnp.concatenate(v, axis=0) for k, v in parts.items()}
  y = _fused_core(
      cat["u"],
      cat["delta"],
      cat["At"],
      cat["B"],
      cat["C"],
      cat["D"],
      cat["bias"],
      bool(delta_softplus),
  )  # [S * nb, nc, T, bt, d]
  outs = []
  for s, rev in enumerate(reverse):
    y_s = _from_tiles(y[s * nb : (s + 1) * nb] if len(reverse) > 1 else y, batch, length)
    outs.append(jnp.flip(y_s, axis=1) if rev else y_s)
  return outs


def scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus, reverse):
  """Fused method on raw inputs (bias, softplus and the D skip happen inside).

  Args: u, delta [b, l, d]; A [d, n]; B, C [b, l, n]; D, delta_bias [d] or None;
  all in the compute dtype. Returns y [b, l, d] including ``D * u``.
  """
  (y,) = scan_fused_streams([(u, delta, A, B, C, D, delta_bias)], [reverse], delta_softplus)
  return y
