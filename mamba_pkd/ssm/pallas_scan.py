"""Pallas (Triton-backed) GPU kernel for the Mamba-1 selective scan.

A forward kernel and a backward kernel tied together by a `jax.custom_vjp`.
The kernels run compiled through the Pallas Triton backend on CUDA GPUs and
through Pallas' interpreter (`interpret=True`) everywhere else, which is how
the tests exercise them on CPU.

Notation (code name -> paper symbol, Mamba / S6, Gu & Dao 2023):

    u        x_t        input sequence              [batch, L, d_inner]
    delta    Delta_t    raw step size (pre softplus) [batch, L, d_inner]
    dt       Delta_t    step size after bias and softplus
    A        A          state matrix (diagonal)      [d_inner, N]
    B, C     B_t, C_t   input-dependent projections  [batch, L, N]
    D        D          skip connection              [d_inner]
    dA       A_bar_t    exp(dt * A)                  [d_inner, N] per step
    dBu      B_bar_t x_t  dt * B * u                 [d_inner, N] per step
    h        h_t        hidden state                 [d_inner, N]
    y        y_t        output <C_t, h_t> + D * u_t  [batch, L, d_inner]

Kernel layout. Both kernels run on the grid (batch, d_inner // block_d); each
program owns one batch row and one tile of `block_d` channels, keeps the state
tile h [block_d, N] in registers and walks over time with `lax.fori_loop`,
loading one time step at a time (u_t, delta_t: [block_d, 1] columns; B_t, C_t:
[N]) from refs that hold the whole sequence of its tile (per-channel arrays get
a trailing unit axis in the wrapper, so that per-channel values broadcast
against the state tile without a layout conversion through shared memory
and a barrier at every step). Every in-kernel array therefore
has a power-of-two size (Triton's requirement) whatever L is: the wrapper pads
d_inner to a multiple of `block_d` and N to a power of two (padded channels
and states have A = 0, B = C = 0, u = 0, so they stay exactly zero and are
sliced away). Loads go in blocks of `prefetch` steps, each block issued one
block ahead through the loop carry, so global-memory latency overlaps with
the arithmetic of the block before.

Forward: inputs are read once and y is written once. When differentiated the
forward also stores the state at the start of every chunk of `chunk_size`
steps ([batch, num_chunks, d_inner, N], small).

Backward: the same grid walks the chunks in reverse. For each chunk it
recomputes the chunk's states from the saved start state into a per-program
scratch buffer in global memory (the Triton backend has no scratch memory; the
buffer is an extra, discarded output of shape
[batch, d_tiles, chunk_size, block_d, N] that stays in L2), then runs the
reverse recurrence

    g_h_t = C_t * gy_t + dA_{t+1} * g_h_{t+1}

accumulating the gradients of u, delta (through bias and softplus), B, C
(per step, reduced over the channel tile: each tile writes a partial
[batch, d_tiles, L, N] that the wrapper sums), A, D and delta_bias
(accumulated per program, summed over batch in the wrapper). h_{t-1} is never
recovered by dividing by dA (that is unstable when exp underflows).

Everything accumulates in float32; bfloat16 inputs are upcast in the kernel
and y is returned in `u.dtype`.

Imports from `mamba_pkd` only `mamba_pkd.ssm.common` (the shared argument
checks); `mamba_pkd.ssm.scan.selective_scan(method="pallas")` calls
`selective_scan_pallas`. Tests compare it with the float64 reference in
`tests/scan_reference.py`.

Measured (`experiments/gpu_check.py`, one H200, JAX 0.11.2), at
(batch, L, d_inner, N) = (64, 784, 256, 16), float32: forward 0.37-0.46 ms and
forward+backward 1.5-1.7 ms, i.e. ~10x faster than the associative scan for
forward+backward, but only ~10-13% of the measured copy bandwidth for the
forward. The kernel is latency-bound, not bandwidth-bound: about 16k channel
rows of sequential work for 132 SMs, with each step's loads issued only a
fraction of a loop iteration ahead (ptxas schedules the prefetch loads late in
the body). Reaching a bandwidth bound needs parallelism along L (two-pass
chunked scan) or loads staged asynchronously through shared memory, neither
of which the Triton backend of Pallas exposes directly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from mamba_pkd.ssm import common

try:  # Pallas is an experimental, version-dependent API: import it here only.
  from jax.experimental import pallas as pl

  _PALLAS_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as _e:  # pragma: no cover - depends on the installed JAX
  pl = None
  _PALLAS_IMPORT_ERROR = _e

try:
  from jax.experimental.pallas import triton as pltriton

  _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as _e:  # pragma: no cover - depends on the installed JAX
  pltriton = None
  _TRITON_IMPORT_ERROR = _e

DEFAULT_BLOCK_D = 8  # best forward and forward+backward tile on an H200
DEFAULT_CHUNK_SIZE = 32
DEFAULT_PREFETCH = 4
DEFAULT_PREFETCH_BWD = 2
_MAX_BLOCK_D = 1024
_LOG2_E = 1.4426950408889634


def pallas_available(interpret: bool) -> tuple[bool, str]:
  """Says whether this JAX can run the kernel.

  Args:
    interpret: True for Pallas' interpreter (any backend), False for the
      compiled Triton kernel (CUDA GPUs).

  Returns:
    (available, reason): `reason` explains what is missing when unavailable.
  """
  if pl is None or not hasattr(pl, "pallas_call"):
    return False, (
        f"jax.experimental.pallas is unavailable in JAX {jax.__version__}: "
        f"{_PALLAS_IMPORT_ERROR!r}"
    )
  if not interpret:
    if pltriton is None or not hasattr(pltriton, "CompilerParams"):
      return False, (
          "jax.experimental.pallas.triton.CompilerParams is unavailable in JAX "
          f"{jax.__version__} ({_TRITON_IMPORT_ERROR!r}); the compiled kernel "
          "needs the Pallas Triton backend (use interpret=True or another "
          "scan method)"
      )
    if not hasattr(pltriton, "debug_barrier"):
      return False, (
          "jax.experimental.pallas.triton.debug_barrier is unavailable in JAX "
          f"{jax.__version__}; the compiled backward kernel needs it"
      )
  return True, ""


def _require_pallas(interpret: bool) -> None:
  ok, reason = pallas_available(interpret)
  if not ok:
    raise ImportError(f"selective_scan_pallas: {reason}")


# ----------------------------------------------------------------------------
# Static configuration.


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) parameters of one kernel instantiation."""

  seq_len: int  # L
  chunk_size: int  # K: steps between saved states (<= L)
  block_d: int  # channels per program
  reverse: bool
  delta_softplus: bool
  interpret: bool
  num_warps: int
  prefetch: int  # forward: steps per block of loads issued ahead
  prefetch_bwd: int  # backward: the same (more values per step)


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _chunk_layout(seq_len: int, chunk: int) -> tuple[int, int]:
  """Chunks in scan order: a partial head chunk of `rem` steps, then full ones.

  Returns:
    (rem, num_full): chunk 0 is [0, rem) when rem > 0; full chunk c covers
    [rem + c*chunk, rem + (c+1)*chunk). Putting the partial chunk first keeps
    every loop bound static: the backward walks the full chunks in a loop and
    the partial one last.
  """
  return seq_len % chunk, seq_len // chunk


# ----------------------------------------------------------------------------
# In-kernel helpers (pure jnp on small float32 tiles).


def _log1p_unit(z):
  """log(1 + z) for z in [0, 1], branch-free and to ~1e-7 relative.

  log1p(z) = 2 atanh(s) with s = z / (2 + z) in [0, 1/3]; the odd series of
  atanh up to s**13 leaves a relative error below 2e-8. On GPU this is a
  division and seven FMAs, against ~40 instructions and branches for
  libdevice's log1pf, which dominated the forward kernel's step.
  """
  s = z / (2.0 + z)
  s2 = s * s
  p = 1.0 / 13.0
  for coeff in (1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0):
    p = p * s2 + coeff
  return 2.0 * s * p


def _step_size(delta, bias, delta_softplus):
  """dt and d(dt)/d(delta) for raw `delta`, [block_d, 1] each."""
  x = delta + bias
  if not delta_softplus:
    return x, jnp.ones_like(x)
  # softplus(x) = max(x, 0) + log1p(z), z = exp(-|x|) in (0, 1];
  # sigmoid(x) = 1 / (1 + z) for x >= 0 and z / (1 + z) otherwise.
  z = jnp.exp2(jnp.abs(x) * -_LOG2_E)
  dt = jnp.maximum(x, 0.0) + _log1p_unit(z)
  return dt, jnp.where(x >= 0.0, 1.0, z) / (1.0 + z)


def _decay(dt, a_log2):
  """dA = exp(dt * A) as exp2(dt * A*log2(e)): one ex2 per element on GPU.

  Args:
    dt: [block_d, 1] step sizes.
    a_log2: [block_d, N] A * log2(e).

  Returns:
    [block_d, N] float32.
  """
  return jnp.exp2(dt * a_log2)


def _scan_index(i, cfg: _Config):
  """Sequence position of scan step i (reverse scans walk L-1 .. 0)."""
  return (cfg.seq_len - 1 - i) if cfg.reverse else i


def _run_steps(first, count, step_fn, load_fn, carry, *, backwards, prefetch, cfg):
  """Runs `count` (static) scan steps, loading blocks of steps ahead.

  With `prefetch` = S > 0 the steps go in blocks of S: while block j is
  computed, the loads of block j+1 are already in flight (issued at the top of
  the loop body, consumed one iteration later), so global-memory latency is
  hidden behind S steps of arithmetic. The block start is clamped into
  [0, L - S] rather than each index, so the S addresses of a block differ by
  constants (immediate offsets on GPU). Leftover steps (count % S) run last
  with direct loads.

  Args:
    first: scan step index (traced int) of the first step when not
      `backwards`, of the last step otherwise.
    count: static number of steps (>= 1).
    step_fn: (k, i, loaded, carry) -> carry, with k the position inside this
      run (0..count-1 in execution order) and i the scan step index.
    load_fn: i -> tuple of loaded arrays for scan step i (0 <= i < L).
    carry: loop carry.
    backwards: execute steps first+count-1 down to first.
    prefetch: steps per block (0: load each step right before it).
    cfg: static config.

  Returns:
    The final carry.
  """

  def index(k):
    return first + (count - 1 - k) if backwards else first + k

  block = min(prefetch, count)
  if block == 0:

    def body(k, c):
      i = index(k)
      return step_fn(k, i, load_fn(i), c)

    return lax.fori_loop(0, count, body, carry)

  num_blocks, tail = divmod(count, block)

  def load_block(j):
    # Steps j*block .. j*block+block-1 of this run, clamped into [0, L).
    if backwards:
      top = jnp.maximum(first + (count - 1) - j * block, block - 1)
      return tuple(load_fn(top - k) for k in range(block))
    bottom = jnp.minimum(first + j * block, cfg.seq_len - block)
    return tuple(load_fn(bottom + k) for k in range(block))

  def body_blocked(j, state):
    c, current = state
    upcoming = load_block(j + 1)
    for k in range(block):
      pos = j * block + k
      c = step_fn(pos, index(pos), current[k], c)
    return c, upcoming

  carry, _ = lax.fori_loop(0, num_blocks, body_blocked, (carry, load_block(0)))
  for k in range(tail):
    pos = num_blocks * block + k
    carry = step_fn(pos, index(pos), load_fn(index(pos)), carry)
  return carry


def _barrier(cfg: _Config) -> None:
  """Orders global-memory scratch writes before reads across the program."""
  if not cfg.interpret:
    pltriton.debug_barrier()


# ----------------------------------------------------------------------------
# Forward kernel. Per-channel quantities are [block_d, 1] columns (u, delta,
# dt, y, D, bias): they broadcast against the [block_d, N] state tile without
# a layout conversion in Triton, and per-state rows B_t, C_t are [1, N].


def _forward_kernel(
    u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, y_ref, *hs_refs, cfg: _Config
):
  """One (batch row, channel tile) program of the forward scan.

  Refs (leading batch dim squeezed by the BlockSpecs):
    u_ref, delta_ref: [L, block_d, 1]; a_ref: [block_d, N];
    b_ref, c_ref: [L, N]; d_ref, bias_ref: [block_d, 1];
    y_ref: [L, block_d, 1];
    hs_refs: () or ([num_chunks, block_d, N],) the state at each chunk start.
  """
  f32 = jnp.float32
  a_log2 = a_ref[...].astype(f32) * _LOG2_E  # [bd, N]
  d_skip = d_ref[...].astype(f32)  # [bd, 1]
  bias = bias_ref[...].astype(f32)  # [bd, 1]

  def load(i):
    t = _scan_index(i, cfg)
    return (u_ref[t], delta_ref[t], b_ref[t, :], c_ref[t, :])

  def step(k, i, loaded, h):
    del k
    u, delta, b, c = (x.astype(f32) for x in loaded)  # [bd,1] x2, [N] x2
    dt, _ = _step_size(delta, bias, cfg.delta_softplus)  # [bd, 1]
    h = _decay(dt, a_log2) * h + (dt * u) * b[None, :]  # [bd, N]
    y = jnp.sum(h * c[None, :], axis=1, keepdims=True) + d_skip * u
    y_ref[_scan_index(i, cfg)] = y.astype(y_ref.dtype)  # [bd, 1]
    return h

  h = jnp.zeros(a_log2.shape, f32)
  run = functools.partial(
      _run_steps, step_fn=step, load_fn=load, backwards=False, prefetch=cfg.prefetch, cfg=cfg
  )
  if not hs_refs:
    run(0, cfg.seq_len, carry=h)
    return

  (hs_ref,) = hs_refs
  rem, num_full = _chunk_layout(cfg.seq_len, cfg.chunk_size)
  offset = 1 if rem else 0
  if rem:
    hs_ref[0] = h
    h = run(0, rem, carry=h)

  def chunk_body(c, h):
    hs_ref[c + offset] = h
    return run(rem + c * cfg.chunk_size, cfg.chunk_size, carry=h)

  lax.fori_loop(0, num_full, chunk_body, h)


# ----------------------------------------------------------------------------
# Backward kernel.


def _backward_kernel(
    u_ref,
    delta_ref,
    a_ref,
    b_ref,
    c_ref,
    d_ref,
    bias_ref,
    hs_ref,
    gy_ref,
    gu_ref,
    gdelta_ref,
    ga_ref,
    gb_ref,
    gc_ref,
    gd_ref,
    gbias_ref,
    scratch_ref,
    *,
    cfg: _Config,
):
  """One (batch row, channel tile) program of the backward scan.

  Refs (leading batch / tile dims squeezed by the BlockSpecs):
    inputs as in `_forward_kernel`; hs_ref: [num_chunks, block_d, N];
    gy_ref: [L, block_d, 1].
    outputs: gu_ref, gdelta_ref: [L, block_d, 1]; ga_ref: [block_d, N];
    gb_ref, gc_ref: [L, N] (this tile's partial sums); gd_ref, gbias_ref:
    [block_d, 1]; scratch_ref: [chunk_size, block_d, N] (h_{t-1} of the
    chunk being processed).
  """
  f32 = jnp.float32
  a = a_ref[...].astype(f32)  # [bd, N]
  a_log2 = a * _LOG2_E  # [bd, N]
  d_skip = d_ref[...].astype(f32)  # [bd, 1]
  bias = bias_ref[...].astype(f32)  # [bd, 1]

  def load_fwd(i):
    t = _scan_index(i, cfg)
    return (u_ref[t], delta_ref[t], b_ref[t, :])

  def make_load_bwd(first):
    def load_bwd(i):
      t = _scan_index(i, cfg)
      return (
          u_ref[t],
          delta_ref[t],
          b_ref[t, :],
          c_ref[t, :],
          gy_ref[t],
          scratch_ref[i - first],
      )  # h_{i-1}

    return load_bwd

  def recompute_step(k, i, loaded, h):
    del i
    u, delta, b = (x.astype(f32) for x in loaded)
    scratch_ref[k] = h  # h_{i-1}
    dt, _ = _step_size(delta, bias, cfg.delta_softplus)
    return _decay(dt, a_log2) * h + (dt * u) * b[None, :]

  def reverse_step(k, i, loaded, carry):
    del k
    g_next, ga_acc, gd_acc, gbias_acc = carry
    u, delta, b, c, gy, h_prev = (x.astype(f32) for x in loaded)
    b, c = b[None, :], c[None, :]  # [1, N]
    dt, ddt_ddelta = _step_size(delta, bias, cfg.delta_softplus)
    d_a = _decay(dt, a_log2)  # [bd, N]
    dtu = dt * u  # [bd, 1]
    h = d_a * h_prev + dtu * b  # [bd, N]
    g_h = c * gy + g_next  # [bd, N]
    g_hb = jnp.sum(g_h * b, axis=1, keepdims=True)  # [bd, 1]
    g_c = jnp.sum(gy * h, axis=0)  # [N]
    g_b = jnp.sum(g_h * dtu, axis=0)  # [N]
    g_u = gy * d_skip + dt * g_hb  # [bd, 1]
    g_da_da = g_h * h_prev * d_a  # [bd, N]
    g_dt = jnp.sum(g_da_da * a, axis=1, keepdims=True) + u * g_hb
    g_delta = g_dt * ddt_ddelta  # [bd, 1]
    t = _scan_index(i, cfg)
    gu_ref[t] = g_u.astype(gu_ref.dtype)
    gdelta_ref[t] = g_delta.astype(gdelta_ref.dtype)
    gb_ref[t, :] = g_b
    gc_ref[t, :] = g_c
    return (d_a * g_h, ga_acc + g_da_da * dt, gd_acc + gy * u, gbias_acc + g_delta)

  def process_chunk(first, count, hs_index, carry):
    run = functools.partial(_run_steps, first, count, prefetch=cfg.prefetch_bwd, cfg=cfg)
    run(recompute_step, load_fwd, hs_ref[hs_index], backwards=False)
    _barrier(cfg)
    carry = run(reverse_step, make_load_bwd(first), carry, backwards=True)
    _barrier(cfg)
    return carry

  rem, num_full = _chunk_layout(cfg.seq_len, cfg.chunk_size)
  offset = 1 if rem else 0
  carry = (
      jnp.zeros(a.shape, f32),
      jnp.zeros(a.shape, f32),
      jnp.zeros(d_skip.shape, f32),
      jnp.zeros(d_skip.shape, f32),
  )

  def chunk_body(j, carry):
    c = num_full - 1 - j
    return process_chunk(rem + c * cfg.chunk_size, cfg.chunk_size, c + offset, carry)

  carry = lax.fori_loop(0, num_full, chunk_body, carry)
  if rem:
    carry = process_chunk(0, rem, 0, carry)
  _, ga_acc, gd_acc, gbias_acc = carry
  ga_ref[...] = ga_acc
  gd_ref[...] = gd_acc
  gbias_ref[...] = gbias_acc


# ----------------------------------------------------------------------------
# pallas_call wrappers. Inputs are already padded (d_inner % block_d == 0, N a
# power of two) and per-channel arrays carry a trailing unit axis:
# u, delta, y, gy: [batch, L, d_inner, 1]; D, bias: [d_inner, 1].


def _compiler_params(cfg: _Config):
  if cfg.interpret:
    return None
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _specs(cfg: _Config, num_n: int):
  """BlockSpecs shared by both kernels, grid (batch, d_tiles)."""
  seq_len, bd = cfg.seq_len, cfg.block_d
  seq = pl.BlockSpec((None, seq_len, bd, 1), lambda b, j: (b, 0, j, 0))
  mat = pl.BlockSpec((bd, num_n), lambda b, j: (j, 0))
  proj = pl.BlockSpec((None, seq_len, num_n), lambda b, j: (b, 0, 0))
  col = pl.BlockSpec((bd, 1), lambda b, j: (j, 0))
  return seq, mat, proj, col


def _forward_call(u, delta, a, b, c, d_skip, bias, cfg: _Config, save: bool):
  """Runs the forward kernel; returns y [b, L, d, 1] and (if save) hs."""
  batch, seq_len, d_inner, _ = u.shape
  num_n = a.shape[1]
  seq, mat, proj, col = _specs(cfg, num_n)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
  out_specs = [seq]
  if save:
    rem, num_full = _chunk_layout(seq_len, cfg.chunk_size)
    num_chunks = num_full + (1 if rem else 0)
    out_shape.append(jax.ShapeDtypeStruct((batch, num_chunks, d_inner, num_n), jnp.float32))
    out_specs.append(
        pl.BlockSpec((None, num_chunks, cfg.block_d, num_n), lambda b_, j: (b_, 0, j, 0))
    )
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      out_shape=out_shape,
      grid=(batch, d_inner // cfg.block_d),
      in_specs=[seq, seq, mat, proj, proj, col, col],
      out_specs=out_specs,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg),
      name="selective_scan_fwd",
  )(u, delta, a, b, c, d_skip, bias)
  return outs[0], (outs[1] if save else None)


def _backward_call(u, delta, a, b, c, d_skip, bias, hs, gy, cfg: _Config):
  """Runs the backward kernel; returns the gradients of all seven inputs."""
  batch, seq_len, d_inner, _ = u.shape
  num_n = a.shape[1]
  bd = cfg.block_d
  d_tiles = d_inner // bd
  seq, mat, proj, col = _specs(cfg, num_n)
  hs_spec = pl.BlockSpec((None, hs.shape[1], bd, num_n), lambda b_, j: (b_, 0, j, 0))
  f32 = jnp.float32
  out_shape = [
      jax.ShapeDtypeStruct(u.shape, u.dtype),  # gu
      jax.ShapeDtypeStruct(delta.shape, delta.dtype),  # gdelta
      jax.ShapeDtypeStruct((batch, d_inner, num_n), f32),  # gA
      jax.ShapeDtypeStruct((batch, d_tiles, seq_len, num_n), f32),  # gB
      jax.ShapeDtypeStruct((batch, d_tiles, seq_len, num_n), f32),  # gC
      jax.ShapeDtypeStruct((batch, d_inner, 1), f32),  # gD
      jax.ShapeDtypeStruct((batch, d_inner, 1), f32),  # gbias
      jax.ShapeDtypeStruct((batch, d_tiles, cfg.chunk_size, bd, num_n), f32),  # scratch
  ]
  partial_proj = pl.BlockSpec((None, None, seq_len, num_n), lambda b_, j: (b_, j, 0, 0))
  per_row_col = pl.BlockSpec((None, bd, 1), lambda b_, j: (b_, j, 0))
  out_specs = [
      seq,
      seq,
      pl.BlockSpec((None, bd, num_n), lambda b_, j: (b_, j, 0)),
      partial_proj,
      partial_proj,
      per_row_col,
      per_row_col,
      pl.BlockSpec((None, None, cfg.chunk_size, bd, num_n), lambda b_, j: (b_, j, 0, 0, 0)),
  ]
  gu, gdelta, ga, gb, gc, gd, gbias, _ = pl.pallas_call(
      functools.partial(_backward_kernel, cfg=cfg),
      out_shape=out_shape,
      grid=(batch, d_tiles),
      in_specs=[seq, seq, mat, proj, proj, col, col, hs_spec, seq],
      out_specs=out_specs,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg),
      name="selective_scan_bwd",
  )(u, delta, a, b, c, d_skip, bias, hs, gy)
  return (
      gu,
      gdelta,
      jnp.sum(ga, axis=0).astype(a.dtype),
      jnp.sum(gb, axis=1).astype(b.dtype),
      jnp.sum(gc, axis=1).astype(c.dtype),
      jnp.sum(gd, axis=0).astype(d_skip.dtype),
      jnp.sum(gbias, axis=0).astype(bias.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan_padded(u, delta, a, b, c, d_skip, bias, cfg):
  y, _ = _forward_call(u, delta, a, b, c, d_skip, bias, cfg, save=False)
  return y


def _scan_padded_fwd(u, delta, a, b, c, d_skip, bias, cfg):
  y, hs = _forward_call(u, delta, a, b, c, d_skip, bias, cfg, save=True)
  return y, (u, delta, a, b, c, d_skip, bias, hs)


def _scan_padded_bwd(cfg, residuals, gy):
  u, delta, a, b, c, d_skip, bias, hs = residuals
  return _backward_call(u, delta, a, b, c, d_skip, bias, hs, gy, cfg)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


# ----------------------------------------------------------------------------
# Public API.


def _validate(
    u, delta, A, B, C, D, delta_bias, block_d, chunk_size, num_warps, prefetch, prefetch_bwd
) -> None:
  """Raises ValueError naming the first bad argument."""
  common.validate_scan_inputs(u, delta, A, B, C, D, delta_bias)
  d_inner = u.shape[2]
  if block_d is not None and (
      not isinstance(block_d, int) or not _is_power_of_two(block_d) or block_d > _MAX_BLOCK_D
  ):
    raise ValueError(
        f"block_d={block_d!r} is invalid; expected a power of two in "
        f"[1, {_MAX_BLOCK_D}] (d_inner={d_inner} is padded up to a multiple "
        "of block_d), e.g. 16, 32 or 64"
    )
  common.check_chunk_size(chunk_size)
  if num_warps is not None and (
      not isinstance(num_warps, int) or not _is_power_of_two(num_warps) or num_warps > 32
  ):
    raise ValueError(f"num_warps={num_warps!r} is invalid; expected a power of two in " "[1, 32]")
  for name, value in (("prefetch", prefetch), ("prefetch_bwd", prefetch_bwd)):
    if (value is None and name == "prefetch") or (
        value is not None and (not isinstance(value, int) or not 0 <= value <= 16)
    ):
      raise ValueError(f"{name}={value!r} is invalid; expected an int in [0, 16]")


def default_block_d(d_inner: int) -> int:
  """The channel tile used when `block_d` is None."""
  return min(DEFAULT_BLOCK_D, _next_power_of_two(d_inner))


def default_prefetch_bwd(prefetch: int) -> int:
  """Backward block of prefetched steps: it holds ~3x more values per step."""
  return min(prefetch, DEFAULT_PREFETCH_BWD)


def default_num_warps(block_d: int, num_n: int) -> int:
  """Warps per program: 1 up to 512 state elements, then ~256 per warp (<= 4).

  On an H200 one warp was fastest for block_d <= 32 (N = 16) and four for
  block_d = 64 (experiments/gpu_check.py sweep).
  """
  elements = block_d * _next_power_of_two(num_n)
  return 1 if elements <= 512 else int(min(4, elements // 256))


def selective_scan_pallas(
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
    block_d=None,
    interpret=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    num_warps=None,
    prefetch=DEFAULT_PREFETCH,
    prefetch_bwd=None,
):
  """Selective scan (Mamba-1) as a Pallas kernel with a kernel backward.

  Computes, with zero initial state and float32 accumulation,
  `dt = softplus(delta + delta_bias)`, `h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`,
  `y_t = <C_t, h_t> + D u_t` (see the module docstring).

  Args:
    u: [batch, L, d_inner] float32 or bfloat16 input.
    delta: [batch, L, d_inner] raw step sizes (same dtype family as u).
    A: [d_inner, N] float32 state matrix (negative in practice).
    B: [batch, L, N] input projection.
    C: [batch, L, N] output projection.
    D: [d_inner] skip connection, or None.
    delta_bias: [d_inner] added to delta before the softplus, or None.
    delta_softplus: apply softplus to delta (+ bias).
    reverse: run the recurrence from t = L-1 down to 0.
    block_d: channels per kernel program, a power of two; d_inner is padded
      up to a multiple of it. None: `default_block_d(d_inner)`.
    interpret: run through Pallas' interpreter. None: interpret unless the
      default backend is a GPU.
    chunk_size: steps between the states saved for the backward (>= 1).
    num_warps: Triton warps per program (power of two). None:
      `default_num_warps(block_d, N)`.
    prefetch: forward kernel: steps per block of loads issued one block ahead
      of their use (0: no prefetch; 0..16).
    prefetch_bwd: the same for the backward kernel. None:
      `default_prefetch_bwd(prefetch)`.

  Returns:
    y: [batch, L, d_inner] in u.dtype.

  Raises:
    ValueError: a shape, dtype or tile argument is invalid (raised before any
      work).
    ImportError: the installed JAX lacks the Pallas features the kernel needs.
  """
  _validate(
      u, delta, A, B, C, D, delta_bias, block_d, chunk_size, num_warps, prefetch, prefetch_bwd
  )
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  interpret = bool(interpret)
  _require_pallas(interpret)

  batch, seq_len, d_inner = u.shape
  num_n = A.shape[1]
  bd = default_block_d(d_inner) if block_d is None else block_d
  n_pad = _next_power_of_two(num_n)
  d_pad = -(-d_inner // bd) * bd
  cfg = _Config(
      seq_len=seq_len,
      chunk_size=min(chunk_size, seq_len),
      block_d=bd,
      reverse=bool(reverse),
      delta_softplus=bool(delta_softplus),
      interpret=interpret,
      num_warps=default_num_warps(bd, n_pad) if num_warps is None else num_warps,
      prefetch=prefetch,
      prefetch_bwd=(default_prefetch_bwd(prefetch) if prefetch_bwd is None else prefetch_bwd),
  )

  f32 = jnp.float32
  d_skip = jnp.zeros((d_inner,), f32) if D is None else D
  bias = jnp.zeros((d_inner,), f32) if delta_bias is None else delta_bias
  pad_d, pad_n = d_pad - d_inner, n_pad - num_n
  if pad_d or pad_n:
    # Padded channels/states: A = 0, B = C = 0, u = 0 -> their state stays 0.
    u_p = jnp.pad(u, ((0, 0), (0, 0), (0, pad_d)))
    delta_p = jnp.pad(delta, ((0, 0), (0, 0), (0, pad_d)))
    a_p = jnp.pad(A, ((0, pad_d), (0, pad_n)))
    b_p = jnp.pad(B, ((0, 0), (0, 0), (0, pad_n)))
    c_p = jnp.pad(C, ((0, 0), (0, 0), (0, pad_n)))
    d_p = jnp.pad(d_skip, (0, pad_d))
    bias_p = jnp.pad(bias, (0, pad_d))
  else:
    u_p, delta_p, a_p, b_p, c_p, d_p, bias_p = (u, delta, A, B, C, d_skip, bias)
  col = lambda x: x[..., None]  # trailing unit axis: [.., d] -> [.., d, 1]
  y = _scan_padded(col(u_p), col(delta_p), a_p, b_p, c_p, col(d_p), col(bias_p), cfg)[..., 0]
  return y[:, :, :d_inner] if pad_d else y
