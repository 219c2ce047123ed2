"""Flax linen layers around the pure selective scan.

Parameter names, shapes and initialisation follow the reference Mamba
(``mamba_simple.py`` of state-spaces/mamba), so PyTorch weights map 1:1:

=================  =========================  ====================================
ours (Flax)        PyTorch reference          mapping
=================  =========================  ====================================
in_proj/kernel     in_proj.weight             [d_model, 2*d_inner] = weight.T
conv1d/kernel      conv1d.weight              [d_conv, 1, d_inner] = weight.transpose(2, 1, 0)
conv1d/bias        conv1d.bias                [d_inner]
x_proj/kernel      x_proj.weight              [d_inner, dt_rank + 2*N] = weight.T
dt_proj/kernel     dt_proj.weight             [dt_rank, d_inner] = weight.T
dt_proj/bias       dt_proj.bias               [d_inner]
A_log              A_log                      [d_inner, N]
D                  D                          [d_inner]
out_proj/kernel    out_proj.weight            [d_inner, d_model] = weight.T
norm/weight        norm.weight (RMSNorm)      [d_model]
=================  =========================  ====================================

Notation (paper -> code): input u -> ``x`` after conv+SiLU; step size Delta ->
``dt``; state matrix A -> ``-exp(A_log)``; input matrix B_t, output matrix C_t
-> ``B``, ``C`` (input dependent, from ``x_proj``); skip D -> ``D``; gate z.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_pkd.ssm import native
from mamba_pkd.ssm.common import ScanMethod
from mamba_pkd.ssm.scan import resolve_method
from mamba_pkd.ssm.scan import selective_scan_streams

Array = jax.Array


def resolve_dt_rank(d_model: int, dt_rank: int | str = "auto") -> int:
  """Returns the low-rank size of the step projection (``ceil(d_model/16)`` for "auto")."""
  if dt_rank == "auto":
    return math.ceil(d_model / 16)
  if not isinstance(dt_rank, int) or dt_rank < 1:
    raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
  return dt_rank


def a_log_init(key: Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> Array:
  """S4D-real initialisation: ``A_log[d, n] = log(n + 1)``, so ``A = -(n + 1)``.

  A constant, evaluated op by op even inside ``jit`` (``ensure_compile_time_eval``):
  XLA's fused ``log`` of the broadcast ``arange`` rounds some entries 1 ulp away from
  the eager one, and :func:`mamba_pkd.models.init_params` (jitted) must give the
  parameters eager Flax init gives.
  """
  del key
  d_inner, d_state = shape
  with jax.ensure_compile_time_eval():
    return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=dtype), (d_inner, d_state)))


def normal_init(stddev: float):
  """``N(0, stddev^2)`` as ``flax.linen.initializers.normal(stddev)`` draws it, also under ``jit``.

  Flax's ``normal(key) * stddev``, with an optimisation barrier between the draw and
  the scaling: under ``jit`` XLA otherwise fuses the scaling into the draw, and some
  products then differ by 1 ulp from the eager ones that
  :func:`mamba_pkd.models.init_params` (jitted) must reproduce.
  """

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    draw = jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype))
    return draw * jnp.asarray(stddev, dtype)

  return init


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
  """Bias of ``dt_proj`` such that ``softplus(bias)`` is log-uniform in [dt_min, dt_max]."""

  def init(key: Array, shape: tuple[int], dtype: Any = jnp.float32) -> Array:
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus

  return init


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis: ``x / rms(x) * weight``."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., features] -> same shape and dtype."""
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * weight).astype(x.dtype)


class CausalDepthwiseConv1d(nn.Module):
  """Causal depthwise convolution over time: ``y_t = bias + sum_k kernel[k] * x_{t-K+1+k}``.

  Parameters as ``nn.Conv(d, (K,), padding=[(K-1, 0)], feature_group_count=d)``
  (``kernel`` [K, 1, d], lecun-normal; ``bias`` [d], zeros), computed as K
  shifted multiply-adds: XLA's CPU backend runs the grouped convolution and
  its gradient 15-35x slower (train-step gradient of one [64, 49, 128] conv:
  21.4 ms as a convolution, 0.6 ms as shifted sums). With ``native=True`` (float32
  inputs) the forward is the same and the backward is one C++ pass
  (:func:`mamba_pkd.ssm.native.causal_conv_backward`): XLA's gradient saved every
  shifted copy and ran each elementwise op as a pass over memory of its own.

  Attributes:
    kernel_size: K, the number of taps (``d_conv``).
    silu: apply SiLU to the output (what the mixer does next).
    native: take the gradient with the native kernel (the mixer passes True when
      its scan method resolves to ``"native"``); other dtypes than float32 stay in XLA.
  """

  kernel_size: int
  silu: bool = False
  native: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [batch, L, d] -> [batch, L, d], same dtype (zero history before t=0)."""
    taps, length, channels = self.kernel_size, x.shape[1], x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (taps, 1, channels))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    if self.native and x.dtype == kernel.dtype == bias.dtype == jnp.float32:
      return _causal_conv_native_grad(x, kernel, bias, self.silu)
    return _causal_conv(x, kernel, bias, self.silu)


def _causal_conv(x: Array, kernel: Array, bias: Array, silu: bool) -> Array:
  """``act(bias + sum_k kernel[k, 0] * x_{t-K+1+k})`` as K shifted multiply-adds."""
  taps, length = kernel.shape[0], x.shape[1]
  padded = jnp.pad(x, ((0, 0), (taps - 1, 0), (0, 0)))
  y = bias.astype(x.dtype)
  for k in range(taps):  # tap k reads x_{t - (taps - 1 - k)}
    y = y + padded[:, k : k + length] * kernel[k, 0].astype(x.dtype)
  return nn.silu(y) if silu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_conv_native_grad(x, kernel, bias, silu):
  """:func:`_causal_conv` with the gradient of the native kernel (float32)."""
  return _causal_conv(x, kernel, bias, silu)


def _causal_conv_native_grad_fwd(x, kernel, bias, silu):
  return _causal_conv(x, kernel, bias, silu), (x, kernel, bias)


def _causal_conv_native_grad_bwd(silu, res, gy):
  return native.causal_conv_backward(*res, gy, silu=silu)


_causal_conv_native_grad.defvjp(_causal_conv_native_grad_fwd, _causal_conv_native_grad_bwd)


class MambaMixer(nn.Module):
  """The Mamba-1 mixer (``Mamba`` in the reference implementation).

  in_proj -> causal depthwise conv1d -> SiLU -> x_proj -> dt_proj + softplus
  -> selective scan -> gate with SiLU(z) -> out_proj.

  With ``bidirectional=True`` (Vision-Mamba style) a second branch with its own
  ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log`` and ``D_b`` scans the
  sequence in reverse (anti-causal conv, reversed recurrence); the two branch
  outputs are summed before the gate.

  Attributes:
    d_model: width of the residual stream.
    d_state: N, the state size per channel.
    d_conv: kernel size of the causal depthwise convolution.
    expand: d_inner = expand * d_model.
    dt_rank: rank of the step-size projection ("auto" -> ceil(d_model / 16)).
    dt_min, dt_max, dt_init_floor, dt_scale: step-size initialisation.
    bidirectional: add the reversed branch.
    scan_method: passed to :func:`mamba_pkd.ssm.selective_scan_streams` (with
      ``bidirectional``, "fused" and "native" run both branches' scans as one call).
    scan_unroll: ``unroll`` of the "sequential" method (True: no while loop).
  """

  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_scale: float = 1.0
  bidirectional: bool = False
  scan_method: str = "auto"
  scan_unroll: int | bool = 1

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """hidden: [batch, L, d_model] -> [batch, L, d_model], same dtype."""
    d_inner = self.d_inner
    xz = nn.Dense(2 * d_inner, use_bias=False, name="in_proj")(hidden)
    x, z = jnp.split(xz, 2, axis=-1)  # each [B, L, d_inner]
    # The convolution's gradient comes from the native kernel where the scan does.
    on_native = resolve_method(self.scan_method) is ScanMethod.NATIVE
    streams = [self._branch_inputs(x, suffix="", on_native=on_native)]
    if self.bidirectional:
      # The reversed branch works on flip(x) (its own conv, projections, A and D)
      # and its output is flipped back; both scans go through one call, which
      # the "fused" and "native" methods run as one scan of both branches.
      flipped = jnp.flip(x, axis=1)
      streams.append(self._branch_inputs(flipped, suffix="_b", on_native=on_native))
    ys = selective_scan_streams(
        streams,
        reverse=[False] * len(streams),
        delta_softplus=True,
        method=self.scan_method,
        unroll=self.scan_unroll,
    )
    y = ys[0]
    if self.bidirectional:
      y = y + jnp.flip(ys[1], axis=1)
    y = y * nn.silu(z)
    return nn.Dense(self.d_model, use_bias=False, name="out_proj")(y)

  def _branch_inputs(self, x: Array, *, suffix: str, on_native: bool) -> tuple:
    """x: [batch, L, d_inner] (after in_proj, flipped for the reversed branch) -> the
    scan's (u, delta, A, B, C, D, delta_bias) of this branch (delta_bias None)."""
    d_inner = self.d_inner
    dt_rank = resolve_dt_rank(self.d_model, self.dt_rank)
    x = CausalDepthwiseConv1d(self.d_conv, silu=True, native=on_native, name="conv1d" + suffix)(
        x
    )  # [B, L, d_inner]
    x_dbl = nn.Dense(dt_rank + 2 * self.d_state, use_bias=False, name="x_proj" + suffix)(x)
    dt, b_mat, c_mat = jnp.split(x_dbl, [dt_rank, dt_rank + self.d_state], axis=-1)
    # softplus(dt_proj(dt)) is the step size. The reference adds dt_proj's bias
    # inside the scan kernel; adding it here is the same arithmetic.
    delta = nn.Dense(
        d_inner,
        use_bias=True,
        name="dt_proj" + suffix,
        kernel_init=_uniform_symmetric(dt_rank**-0.5 * self.dt_scale),
        bias_init=dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
    )(dt)
    a_name = "A_b_log" if suffix else "A_log"
    a_log = self.param(a_name, a_log_init, (d_inner, self.d_state))
    d_skip = self.param("D" + suffix, nn.initializers.ones, (d_inner,))
    return (x, delta, -jnp.exp(a_log.astype(jnp.float32)), b_mat, c_mat, d_skip, None)


class ResidualBlock(nn.Module):
  """Pre-norm residual block: ``hidden + MambaMixer(RMSNorm(hidden))``.

  The attributes are those of :class:`MambaMixer` plus ``norm_eps``.
  """

  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  bidirectional: bool = False
  scan_method: str = "auto"
  scan_unroll: int | bool = 1
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """hidden: [batch, L, d_model] -> same shape."""
    normed = RMSNorm(self.norm_eps, name="norm")(hidden)
    mixer = MambaMixer(
        d_model=self.d_model,
        d_state=self.d_state,
        d_conv=self.d_conv,
        expand=self.expand,
        dt_rank=self.dt_rank,
        bidirectional=self.bidirectional,
        scan_method=self.scan_method,
        scan_unroll=self.scan_unroll,
        name="mixer",
    )
    return hidden + mixer(normed)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens: a conv with kernel = stride = patch_size.

  A patch size of 1 gives pixel-level sequences (784 tokens for MNIST).
  """

  patch_size: int
  d_model: int

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images: [batch, H, W, C] -> tokens [batch, (H/p)*(W/p), d_model]."""
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(
          f"patch_size={p} must divide the image height and width, got image "
          f"shape {tuple(images.shape[1:])}"
      )
    tokens = nn.Conv(self.d_model, (p, p), strides=(p, p), padding="VALID", name="proj")(images)
    return tokens.reshape(tokens.shape[0], -1, self.d_model)


def _uniform_symmetric(limit: float):
  """Initialiser drawing from U(-limit, limit)."""

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init
