"""Students that are not Mamba: a LeNet-like CNN and an MLP (issue 16: is Mamba the right student?).

They slot in wherever a :class:`mamba_pkd.models.ModelConfig` does: the same call
signature ``model.apply({"params": p}, images, prev_features=None,
return_features=False)``, an output layer named ``head`` (so ensemble weights fold in
the same way), a ``d_model`` property (the width of the pooled features a connected
student reads) and ``connect_dim``. :func:`mamba_pkd.models.create_model` picks the
module from the config's type; :mod:`mamba_pkd.flops` counts their FLOPs and
parameters; :func:`mamba_pkd.ladders.family_sizes` sizes them to the Mamba rungs.

* **CNN** (``CNNConfig``): conv k x k (``channels[0]``, SAME) -> ReLU -> 2x2 max pool
  -> conv k x k (``channels[1]``, SAME) -> ReLU -> 2x2 max pool -> flatten -> dense
  (``hidden``) -> ReLU -> [features] -> dense head.
* **MLP** (``MLPConfig``): flatten -> (dense -> ReLU) per width of ``hidden`` ->
  [features] -> dense head.

Both have no scan: ``replace(scan_method=..., scan_unroll=...)`` (what export and the
XLA FLOPs check do to every member) returns the config unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

FAMILIES = ("mamba", "cnn", "mlp")  # "mamba": models.ModelConfig
POOL = 2  # max-pool window and stride of the CNN
_NO_SCAN = ("scan_method", "scan_unroll")


def _positive_ints(value, field: str) -> tuple[int, ...]:
  value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
    raise ValueError(f"{field} must be positive ints, got {value!r}")
  return value


def _check_common(config) -> None:
  shape = tuple(config.image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C) of positive ints, got {shape}")
  if not isinstance(config.num_classes, int) or config.num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {config.num_classes!r}")
  if not isinstance(config.connect_dim, int) or config.connect_dim < 0:
    raise ValueError(f"connect_dim must be an int >= 0, got {config.connect_dim!r}")


class _NoScanReplace:
  """``replace`` that ignores the Mamba-only scan fields."""

  def replace(self, **changes):
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if k not in _NO_SCAN})


@dataclasses.dataclass(frozen=True)
class CNNConfig(_NoScanReplace):
  """Static description of a :class:`CNNClassifier` (hashable).

  Attributes:
    image_shape: (H, W, C); H and W must be at least 4 (two 2x2 pools).
    num_classes: number of output logits.
    channels: (c1, c2), output channels of the two convolutions.
    kernel: side of the square convolution kernels (SAME padding, stride 1).
    hidden: width of the dense layer before the head (the features).
    connect_dim: width of the previous student's features it reads (0: none).
    family: always ``"cnn"`` (recorded so a manifest's config dict says which model).
  """

  image_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  channels: tuple[int, int] = (4, 8)
  kernel: int = 3
  hidden: int = 32
  connect_dim: int = 0
  family: str = "cnn"

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "channels", _positive_ints(self.channels, "channels"))
    _check_common(self)
    if self.family != "cnn":
      raise ValueError(f"CNNConfig.family must be 'cnn', got {self.family!r}")
    if len(self.channels) != 2:
      raise ValueError(f"channels must be (c1, c2), got {self.channels!r}")
    _positive_ints(self.kernel, "kernel")
    _positive_ints(self.hidden, "hidden")
    h, w, _ = self.image_shape
    if min(h, w) < POOL * POOL:
      raise ValueError(f"a CNN student needs H and W >= {POOL * POOL}, got {self.image_shape}")

  @property
  def d_model(self) -> int:
    """Width of the features (the dense layer before the head)."""
    return self.hidden

  @property
  def pooled_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """(H, W) after the first and the second pool (floor division)."""
    h, w, _ = self.image_shape
    return (h // POOL, w // POOL), (h // POOL // POOL, w // POOL // POOL)


@dataclasses.dataclass(frozen=True)
class MLPConfig(_NoScanReplace):
  """Static description of an :class:`MLPClassifier` (hashable).

  Attributes:
    image_shape: (H, W, C).
    num_classes: number of output logits.
    hidden: widths of the hidden dense layers, in order (the last one is the features).
    connect_dim: width of the previous student's features it reads (0: none).
    family: always ``"mlp"``.
  """

  image_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  hidden: tuple[int, ...] = (64, 32)
  connect_dim: int = 0
  family: str = "mlp"

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "hidden", _positive_ints(self.hidden, "hidden"))
    _check_common(self)
    if self.family != "mlp":
      raise ValueError(f"MLPConfig.family must be 'mlp', got {self.family!r}")

  @property
  def d_model(self) -> int:
    """Width of the features (the last hidden layer)."""
    return self.hidden[-1]


def _check_images(images: Array, image_shape: tuple[int, ...]) -> None:
  if images.shape[1:] != image_shape:
    raise ValueError(
        f"images must have shape [batch, {', '.join(map(str, image_shape))}], "
        f"got {tuple(images.shape)}"
    )


def _head(features: Array, prev_features: Array | None, connect_dim: int, num_classes: int):
  """features (+ the projected previous student's features) -> logits float32."""
  if connect_dim:
    if prev_features is None or prev_features.shape[-1] != connect_dim:
      raise ValueError(
          f"this model has connect_dim={connect_dim}: pass prev_features of shape "
          f"[batch, {connect_dim}], got "
          f"{None if prev_features is None else tuple(prev_features.shape)}"
      )
    features = features + nn.Dense(features.shape[-1], name="connect")(
        jax.lax.stop_gradient(prev_features)
    )
  return nn.Dense(num_classes, name="head")(features).astype(jnp.float32), features


class CNNClassifier(nn.Module):
  """Images [B, H, W, C] -> logits [B, K] (and features [B, hidden])."""

  config: CNNConfig

  @nn.compact
  def __call__(
      self, images: Array, prev_features: Array | None = None, return_features: bool = False
  ):
    cfg = self.config
    _check_images(images, cfg.image_shape)
    x = images
    for i, width in enumerate(cfg.channels):
      x = nn.Conv(width, (cfg.kernel, cfg.kernel), padding="SAME", name=f"conv_{i}")(x)
      x = nn.max_pool(nn.relu(x), (POOL, POOL), strides=(POOL, POOL), padding="VALID")
    x = x.reshape(x.shape[0], -1)  # [B, H/4 * W/4 * c2]
    features = nn.relu(nn.Dense(cfg.hidden, name="dense")(x))
    logits, features = _head(features, prev_features, cfg.connect_dim, cfg.num_classes)
    return (logits, features) if return_features else logits


class MLPClassifier(nn.Module):
  """Images [B, H, W, C] -> logits [B, K] (and features [B, hidden[-1]])."""

  config: MLPConfig

  @nn.compact
  def __call__(
      self, images: Array, prev_features: Array | None = None, return_features: bool = False
  ):
    cfg = self.config
    _check_images(images, cfg.image_shape)
    x = images.reshape(images.shape[0], -1)  # [B, H*W*C]
    for i, width in enumerate(cfg.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
    logits, features = _head(x, prev_features, cfg.connect_dim, cfg.num_classes)
    return (logits, features) if return_features else logits


CONFIG_TYPES = {"cnn": CNNConfig, "mlp": MLPConfig}
MODULE_TYPES = {CNNConfig: CNNClassifier, MLPConfig: MLPClassifier}
