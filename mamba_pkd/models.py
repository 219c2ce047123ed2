"""Mamba image classifiers and the size ladder (teacher down to ~1% of its FLOPs).

An image is cut into non-overlapping ``patch_size`` patches (``patch_size=1``
gives pixel-level sequences: 784 tokens for MNIST), embedded, given a learned
position embedding, passed through ``n_layers`` pre-norm Mamba blocks, a final
RMSNorm, pooled over tokens, and mapped to class logits.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_pkd import cnn_mlp, ensemble, layers
from mamba_pkd.batched_threefry import batched_threefry
from mamba_pkd.ssm.common import as_scan_method

Array = jax.Array

POOLINGS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a :class:`MambaClassifier` (hashable; no ConfigDict).

  Attributes:
    image_shape: (H, W, C) of the input images.
    num_classes: number of output logits.
    patch_size: side of the square patches; must divide H and W.
    d_model: width of the residual stream.
    n_layers: number of residual Mamba blocks.
    d_state: N, SSM state size per channel.
    expand: d_inner = expand * d_model.
    d_conv: causal depthwise conv kernel size.
    dt_rank: step-size projection rank, "auto" = ceil(d_model / 16).
    bidirectional: add a reversed scan branch in every mixer.
    pool: "mean" over tokens or the "last" token.
    connect_dim: width of the previous student's features that this model reads
      through a learned projection (0 = no connection): its pooled features,
      added to this model's pooled features before the head, or, with
      ``token_features``, its token-level hidden states flattened to
      ``[batch, num_tokens * d_prev]``, added token by token to this model's
      embedded patches before the first block (the previous student's work is
      reused: prefix k is one deeper network with k exits).
    token_features: the features this model returns (and, when connected,
      reads) are the token-level hidden states after the final norm, flattened,
      instead of the pooled ones; a stage property, not a change of the
      classifier: the logits are the same either way for an unconnected model.
    scan_method: selective-scan method, a ``mamba_pkd.ssm.ScanMethod`` or its name
      (``mamba_pkd.ssm.SCAN_METHODS``).
    scan_unroll: ``unroll`` of the "sequential" scan (True: fully unrolled,
      used to let XLA's cost analysis count every step).
  """

  image_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  patch_size: int = 4
  d_model: int = 64
  n_layers: int = 4
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int | str = "auto"
  bidirectional: bool = False
  pool: str = "mean"
  connect_dim: int = 0
  token_features: bool = False
  scan_method: str = "auto"
  scan_unroll: int | bool = 1

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    validate_model_config(self)

  @property
  def num_tokens(self) -> int:
    h, w, _ = self.image_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def resolved_dt_rank(self) -> int:
    return layers.resolve_dt_rank(self.d_model, self.dt_rank)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def validate_model_config(config: ModelConfig) -> None:
  """Raises ValueError naming the first invalid field of ``config``."""
  if len(config.image_shape) != 3 or min(config.image_shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C) of positive ints, got {config.image_shape}")
  for field in ("num_classes", "patch_size", "d_model", "n_layers", "d_state", "expand", "d_conv"):
    value = getattr(config, field)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{field} must be a positive int, got {value!r}")
  if config.num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {config.num_classes}")
  h, w, _ = config.image_shape
  if h % config.patch_size or w % config.patch_size:
    raise ValueError(
        f"patch_size={config.patch_size} must divide the image height and width "
        f"(image_shape={config.image_shape}); valid patch sizes: "
        f"{[p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]}"
    )
  layers.resolve_dt_rank(config.d_model, config.dt_rank)
  if config.pool not in POOLINGS:
    raise ValueError(f"pool must be one of {POOLINGS}, got {config.pool!r}")
  if not isinstance(config.connect_dim, int) or config.connect_dim < 0:
    raise ValueError(f"connect_dim must be an int >= 0, got {config.connect_dim!r}")
  if config.token_features and config.connect_dim % config.num_tokens:
    raise ValueError(
        f"connect_dim={config.connect_dim} with token_features must be num_tokens "
        f"({config.num_tokens}) x the previous model's d_model: both models need the same "
        "number of tokens (the same patch size)"
    )
  as_scan_method(config.scan_method, "scan_method")


class MambaClassifier(nn.Module):
  """Images -> patches -> Mamba blocks -> norm -> pool -> linear head.

  Call with ``images`` [batch, H, W, C] float; returns logits [batch, num_classes]
  (float32), or ``(logits, features)`` with ``return_features=True`` where
  ``features`` [batch, d_model] is the pooled penultimate representation (with
  ``token_features``: the normed token states, [batch, num_tokens * d_model]). A
  model with ``connect_dim > 0`` also takes ``prev_features`` [batch, connect_dim]
  (the frozen previous student's features), projected and added before the head
  (with ``token_features``: to every token's embedding, before the first block).
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self, images: Array, prev_features: Array | None = None, return_features: bool = False
  ):
    cfg = self.config
    if images.shape[1:] != cfg.image_shape:
      raise ValueError(
          f"images must have shape [batch, {', '.join(map(str, cfg.image_shape))}], "
          f"got {tuple(images.shape)}"
      )
    tokens = layers.PatchEmbed(cfg.patch_size, cfg.d_model, name="patch_embed")(images)
    pos = self.param("pos_embed", layers.normal_init(0.02), (1, cfg.num_tokens, cfg.d_model))
    hidden = tokens + pos  # [B, L, d_model]
    if cfg.connect_dim:
      if prev_features is None or prev_features.shape[-1] != cfg.connect_dim:
        raise ValueError(
            f"this model has connect_dim={cfg.connect_dim}: pass prev_features of shape "
            f"[batch, {cfg.connect_dim}], got "
            f"{None if prev_features is None else tuple(prev_features.shape)}"
        )
      prev_features = jax.lax.stop_gradient(prev_features)
    if cfg.connect_dim and cfg.token_features:
      prev_tokens = prev_features.reshape(-1, cfg.num_tokens, cfg.connect_dim // cfg.num_tokens)
      hidden = hidden + nn.Dense(cfg.d_model, name="connect")(prev_tokens)
    for i in range(cfg.n_layers):
      hidden = layers.ResidualBlock(
          d_model=cfg.d_model,
          d_state=cfg.d_state,
          d_conv=cfg.d_conv,
          expand=cfg.expand,
          dt_rank=cfg.dt_rank,
          bidirectional=cfg.bidirectional,
          scan_method=cfg.scan_method,
          scan_unroll=cfg.scan_unroll,
          name=f"layers_{i}",
      )(hidden)
    hidden = layers.RMSNorm(name="norm_f")(hidden)
    features = hidden.mean(axis=1) if cfg.pool == "mean" else hidden[:, -1]  # [B, d_model]
    if cfg.connect_dim and not cfg.token_features:
      features = features + nn.Dense(cfg.d_model, name="connect")(prev_features)
    logits = nn.Dense(cfg.num_classes, name="head")(features).astype(jnp.float32)
    if not return_features:
      return logits
    return logits, (hidden.reshape(-1, feature_width(cfg)) if cfg.token_features else features)


def feature_width(config) -> int:
  """Width of the features a model returns (what a connected successor reads)."""
  if getattr(config, "token_features", False):
    return config.num_tokens * config.d_model
  return config.d_model


def model_family(config) -> str:
  """``"mamba"`` for a :class:`ModelConfig`, ``"cnn"`` / ``"mlp"`` for the
  :mod:`mamba_pkd.cnn_mlp` configs."""
  return getattr(config, "family", "mamba")


def create_model(config) -> nn.Module:
  """Returns the Flax module for ``config``: a :class:`MambaClassifier` for a
  :class:`ModelConfig`, the CNN or MLP of :mod:`mamba_pkd.cnn_mlp` for theirs."""
  if isinstance(config, ModelConfig):
    return MambaClassifier(config)
  if type(config) in cnn_mlp.MODULE_TYPES:
    return cnn_mlp.MODULE_TYPES[type(config)](config)
  raise TypeError(f"no model for a config of type {type(config).__name__}")


def config_from_dict(fields: Mapping) -> "ModelConfig | cnn_mlp.CNNConfig | cnn_mlp.MLPConfig":
  """The config recorded as a dict (a run manifest's ``config``): its ``family`` field
  (``"cnn"``, ``"mlp"``; absent for Mamba) picks the type.

  Raises:
    ValueError: an unknown family (the valid ones named) or fields that type lacks.
  """
  fields = dict(fields)
  family = fields.get("family", "mamba")
  if family not in cnn_mlp.FAMILIES:
    raise ValueError(f"config family {family!r} is unknown; valid: {cnn_mlp.FAMILIES}")
  config_type = cnn_mlp.CONFIG_TYPES.get(family, ModelConfig)
  try:
    return config_type(**fields)
  except TypeError as e:
    raise ValueError(f"a {family} config with fields {sorted(fields)}: {e}") from None


def init_params(config, rng: Array) -> dict:
  """Initial parameters of ``create_model(config)`` (a nested dict of arrays).

  One compiled program per config (``jax.jit``, config static): eager Flax init
  dispatched each of its ~300 small ops as a program of its own (6.9 of a smoke
  job's 34 s under cProfile). Its Threefry hashes (one per key derived and one per
  parameter drawn) are computed a few at a time
  (:func:`mamba_pkd.batched_threefry.batched_threefry`): compiling the MNIST teacher's
  init took 2.0 s instead of 6.0 s. The values are bit for bit those of
  :func:`eager_init_params` at XLA's default optimisation level
  (tests/test_models.py; ``layers.a_log_init`` and ``layers.normal_init`` say what
  that took).
  """
  return _init_params_jit(config, rng)


def param_shapes(config) -> dict:
  """``init_params``'s tree as ``jax.ShapeDtypeStruct`` leaves: nothing computed or compiled
  (initialising compiles the model's random draws, seconds a config on a CPU)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def eager_init_params(config, rng: Array) -> dict:
  """``init_params`` without ``jit``: Flax's op-by-op init (the reference it must equal)."""
  images = jnp.zeros((1, *config.image_shape), jnp.float32)
  prev = jnp.zeros((1, config.connect_dim), jnp.float32) if config.connect_dim else None
  return create_model(config).init(rng, images, prev)["params"]


_init_params_jit = jax.jit(
    batched_threefry(eager_init_params, static_argnums=(0,)), static_argnums=0
)


def apply_members(
    configs: Sequence[ModelConfig], params: Sequence[Mapping], images: Array
) -> tuple[list[Array], list[Array]]:
  """Runs members in order (member j reads member j-1's features if connected).

  The chaining is :func:`mamba_pkd.ensemble.chain`'s; this supplies the Flax
  forward of each member.

  Returns:
    (logits, features): lists with one [B, K] / [B, d_model_j] array per member.
  """
  members = [create_model(c) for c in configs]

  def forward(j, x, prev):
    prev = prev if configs[j].connect_dim else None
    return members[j].apply({"params": params[j]}, x, prev, return_features=True)

  return ensemble.chain(forward, len(configs), images)


def count_tree_params(params: Mapping) -> int:
  """Total number of scalars in a parameter pytree (``flops.count_params`` counts a config)."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
