"""Analytic inference FLOPs and parameter counts of a :class:`ModelConfig`.

Conventions (per image, inference, batch-independent):

* a multiply-add is 2 FLOPs (matmuls, convolutions, the scan's ``C . h``);
* every other elementwise arithmetic op is 1 FLOP per element (bias adds,
  residual adds, products, the softplus/SiLU arithmetic);
* a transcendental (exp, log, logistic, rsqrt) is 1 FLOP per element.

These match what XLA's ``cost_analysis()`` reports as ``flops +
transcendentals`` for the matmul-dominated parts exactly; elementwise chains
are counted the way XLA lowers them (e.g. SiLU = logistic + multiply), so the
analytic total lands within a few percent of XLA's. :func:`xla_forward_flops`
reads XLA's number for comparison (tests state the tolerance).

Symbols: L tokens, d = d_model, E = d_inner = expand*d, N = d_state,
R = dt_rank, K = d_conv, P = patch_size**2 * channels, Q = num_classes.

The CNN and MLP students of :mod:`mamba_pkd.cnn_mlp` are counted by the same rules
(:func:`cnn_flops`, :func:`mlp_flops`): a convolution is 2 FLOPs per multiply-add of a
kernel tap with a real input (the zeros of the SAME padding are not counted, as in
XLA's count), plus its bias; ReLU 1 per element; a 2x2 max pool 3 comparisons per
output. :func:`count_flops` and :func:`count_params` take any of the three configs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mamba_pkd.cnn_mlp import POOL, CNNConfig, MLPConfig
from mamba_pkd.models import ModelConfig, create_model, param_shapes

# Elementwise op counts, per element.
_SILU = 5  # XLA: logistic as exp (1 transcendental) + 4 arithmetic ops
_SOFTPLUS = 8  # XLA: max(x, 0) + log1p(exp(-|x|)) with NaN guard: 6 ops + 2 transcendentals
_RMSNORM = 4  # square, (mean: add), rsqrt, multiply, scale (+1 per row, ignored)


def mixer_flops(config: ModelConfig) -> dict[str, int]:
  """FLOPs of one MambaMixer (per image), broken down by part."""
  tokens, d, e = config.num_tokens, config.d_model, config.d_inner
  n, r, k = config.d_state, config.resolved_dt_rank, config.d_conv
  branches = 2 if config.bidirectional else 1
  per_branch = {
      "conv1d": tokens * e * (2 * k + 1),  # depthwise MACs + bias
      "silu_x": tokens * e * _SILU,
      "x_proj": 2 * tokens * e * (r + 2 * n),
      "dt_proj": tokens * e * (2 * r + 1),  # matmul + bias
      "softplus": tokens * e * _SOFTPLUS,
      # per step and (channel, state): dt*A, exp, *B, dA*h + dBu (2), C.h (2) -> 7;
      # per step and channel: dt*u, D*u + y (2) -> 3.
      "scan": tokens * e * (7 * n + 3),
  }
  out = {name: branches * value for name, value in per_branch.items()}
  out["in_proj"] = 2 * tokens * d * 2 * e
  out["branch_sum"] = (branches - 1) * tokens * e
  out["gate"] = tokens * e * (_SILU + 1)
  out["out_proj"] = 2 * tokens * e * d
  return out


def model_flops(config: ModelConfig) -> dict[str, int]:
  """Analytic inference FLOPs per image of ``MambaClassifier(config)``.

  Returns a dict with the parts (``patch_embed``, ``blocks``, ``head``, ...) and
  ``total``.
  """
  tokens, d = config.num_tokens, config.d_model
  h, w, c = config.image_shape
  del h, w
  patch = config.patch_size**2 * c
  block = sum(mixer_flops(config).values()) + tokens * d * _RMSNORM + tokens * d  # + residual
  parts = {
      "patch_embed": tokens * d * (2 * patch + 1) + tokens * d,  # conv + bias + position
      "blocks": config.n_layers * block,
      "final_norm": tokens * d * _RMSNORM,
      "pool": tokens * d if config.pool == "mean" else 0,
      "connect": _mamba_connect_flops(config),
      "head": config.num_classes * (2 * d + 1),
  }
  parts["total"] = sum(parts.values())
  return parts


def _mamba_connect_flops(config: ModelConfig) -> int:
  """The connection: a projection to ``d_model``, its bias and the add, once per image
  on the pooled features, or once per token on the previous member's token states."""
  if not config.connect_dim:
    return 0
  applications = config.num_tokens if config.token_features else 1
  return applications * (2 * _connect_width_in(config) + 2) * config.d_model


def _head_flops(config, features: int) -> dict[str, int]:
  """The connection (projection, bias, add) and the head of any family."""
  cd = config.connect_dim
  return {
      "connect": (2 * cd + 2) * features if cd else 0,
      "head": config.num_classes * (2 * features + 1),
  }


def same_taps(n: int, k: int) -> int:
  """Kernel taps that land on real inputs, summed over the ``n`` outputs of a 1-D SAME
  convolution of width ``k`` (padding ``(k - 1) // 2`` before, the rest after)."""
  low = (k - 1) // 2
  return sum(1 for i in range(n) for t in range(k) if 0 <= i - low + t < n)


def cnn_flops(config: CNNConfig) -> dict[str, int]:
  """Analytic inference FLOPs per image of the CNN student, by part, and ``total``."""
  h, w, c = config.image_shape
  k = config.kernel
  parts, cin = {}, c
  for i, width in enumerate(config.channels):
    outputs = h * w * width
    macs = same_taps(h, k) * same_taps(w, k) * cin * width
    parts[f"conv_{i}"] = 2 * macs + outputs  # + bias
    parts[f"relu_{i}"] = outputs
    h, w, cin = h // POOL, w // POOL, width
    parts[f"pool_{i}"] = h * w * width * (POOL * POOL - 1)  # comparisons
  parts["dense"] = config.hidden * (2 * h * w * cin + 1) + config.hidden  # + ReLU
  parts.update(_head_flops(config, config.hidden))
  parts["total"] = sum(parts.values())
  return parts


def mlp_flops(config: MLPConfig) -> dict[str, int]:
  """Analytic inference FLOPs per image of the MLP student, by part, and ``total``."""
  width_in = math.prod(config.image_shape)
  parts = {}
  for i, width in enumerate(config.hidden):
    parts[f"dense_{i}"] = width * (2 * width_in + 1) + width  # matmul, bias, ReLU
    width_in = width
  parts.update(_head_flops(config, width_in))
  parts["total"] = sum(parts.values())
  return parts


def count_flops(config) -> int:
  """Total analytic inference FLOPs per image (Mamba, CNN or MLP config)."""
  if isinstance(config, CNNConfig):
    return cnn_flops(config)["total"]
  if isinstance(config, MLPConfig):
    return mlp_flops(config)["total"]
  return model_flops(config)["total"]


def _dense_params(width_in: int, width_out: int) -> int:
  return width_in * width_out + width_out


def _head_params(config, features: int) -> int:
  cd = config.connect_dim
  return (_dense_params(cd, features) if cd else 0) + _dense_params(features, config.num_classes)


def count_params(config) -> int:
  """Analytic parameter count of ``create_model(config)`` (Mamba, CNN or MLP config)."""
  if isinstance(config, CNNConfig):
    (h, w, cin), k2 = config.image_shape, config.kernel**2
    convs = 0
    for width in config.channels:
      convs += _dense_params(k2 * cin, width)
      h, w, cin = h // POOL, w // POOL, width
    return convs + _dense_params(h * w * cin, config.hidden) + _head_params(config, config.hidden)
  if isinstance(config, MLPConfig):
    widths = (math.prod(config.image_shape), *config.hidden)
    layers = sum(_dense_params(a, b) for a, b in zip(widths, widths[1:]))
    return layers + _head_params(config, widths[-1])
  return _mamba_params(config)


def _connect_width_in(config: ModelConfig) -> int:
  """The connection's input width: the previous member's pooled features, or one
  token's state when it reads token states."""
  if config.token_features:
    return config.connect_dim // config.num_tokens
  return config.connect_dim


def _mamba_params(config: ModelConfig) -> int:
  """Analytic parameter count of ``MambaClassifier(config)``."""
  d, e, n = config.d_model, config.d_inner, config.d_state
  r, k = config.resolved_dt_rank, config.d_conv
  branch = (k * e + e) + e * (r + 2 * n) + (r * e + e) + e * n + e  # conv, x_proj, dt_proj, A, D
  mixer = d * 2 * e + (2 if config.bidirectional else 1) * branch + e * d
  block = mixer + d  # + RMSNorm weight
  patch = config.patch_size**2 * config.image_shape[2]
  return (
      patch * d
      + d  # patch embedding conv + bias
      + config.num_tokens * d  # position embedding
      + config.n_layers * block
      + d  # final norm
      + (_connect_width_in(config) * d + d if config.connect_dim else 0)
      + d * config.num_classes
      + config.num_classes
  )


def xla_forward_flops(config: ModelConfig, batch_size: int = 1) -> dict[str, float]:
  """XLA's own count for the compiled forward, per image.

  Uses the ``sequential`` scan unrolled over time (XLA's cost analysis counts a
  while-loop body once, not once per iteration), so every step is counted.

  Returns: {"flops", "transcendentals", "total"} per image.
  """
  cfg = config.replace(scan_method="sequential", scan_unroll=True)
  params = param_shapes(cfg)  # XLA counts the compiled program, whatever the values
  images = jax.ShapeDtypeStruct((batch_size, *cfg.image_shape), jnp.float32)
  prev = (
      jax.ShapeDtypeStruct((batch_size, cfg.connect_dim), jnp.float32) if cfg.connect_dim else None
  )
  model = create_model(cfg)
  compiled = (
      jax.jit(lambda p, x, f: model.apply({"params": p}, x, f))
      .lower(params, images, prev)
      .compile()
  )
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0]
  flops = float(cost.get("flops", 0.0)) / batch_size
  trans = float(cost.get("transcendentals", 0.0)) / batch_size
  return {"flops": flops, "transcendentals": trans, "total": flops + trans}
