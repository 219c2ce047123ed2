"""Mamba image classifiers and the size ladder (teacher down to ~1% of its FLOPs).

An image is cut into non-overlapping ``patch_size`` patches (``patch_size=1``
gives pixel-level sequences: 784 tokens for MNIST), embedded, given a learned
position embedding, passed through ``n_layers`` pre-norm Mamba blocks, a final
RMSNorm, pooled over tokens, and mapped to class logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_pkd import ensemble, layers

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
    connect_dim: width of the previous student's penultimate features that this
      model reads through a learned projection (0 = no connection).
    scan_method: selective-scan method (see ``mamba_pkd.ssm.SCAN_METHODS``).
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
  from mamba_pkd.ssm.scan import SCAN_METHODS  # pylint: disable=g-import-not-at-top

  if config.scan_method not in SCAN_METHODS:
    raise ValueError(f"scan_method must be one of {SCAN_METHODS}, got {config.scan_method!r}")


class MambaClassifier(nn.Module):
  """Images -> patches -> Mamba blocks -> norm -> pool -> linear head.

  Call with ``images`` [batch, H, W, C] float; returns logits [batch, num_classes]
  (float32), or ``(logits, features)`` with ``return_features=True`` where
  ``features`` [batch, d_model] is the pooled penultimate representation. A model
  with ``connect_dim > 0`` also takes ``prev_features`` [batch, connect_dim]
  (the frozen previous student's features), projected and added before the head.
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
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, cfg.num_tokens, cfg.d_model))
    hidden = tokens + pos  # [B, L, d_model]
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
    if cfg.connect_dim:
      if prev_features is None or prev_features.shape[-1] != cfg.connect_dim:
        raise ValueError(
            f"this model has connect_dim={cfg.connect_dim}: pass prev_features of shape "
            f"[batch, {cfg.connect_dim}], got "
            f"{None if prev_features is None else tuple(prev_features.shape)}"
        )
      features = features + nn.Dense(cfg.d_model, name="connect")(
          jax.lax.stop_gradient(prev_features)
      )
    logits = nn.Dense(cfg.num_classes, name="head")(features).astype(jnp.float32)
    return (logits, features) if return_features else logits


def create_model(config: ModelConfig) -> MambaClassifier:
  """Returns the Flax module for ``config``."""
  return MambaClassifier(config)


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Initial parameters of ``MambaClassifier(config)`` (a nested dict of arrays)."""
  images = jnp.zeros((1, *config.image_shape), jnp.float32)
  prev = jnp.zeros((1, config.connect_dim), jnp.float32) if config.connect_dim else None
  return create_model(config).init(rng, images, prev)["params"]


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


# ----------------------------------------------------------------------------
# The size ladder.
# ----------------------------------------------------------------------------

# (d_model, n_layers, d_state) per named size, with the family's patch size, or
# (d_model, n_layers, d_state, patch_size) for a size with its own. Students
# climb from ~1% of the teacher's FLOPs by ~1.6-2x a rung (printed exactly by
# `python -m mamba_pkd.main --ladder`; see the README's table).
LADDERS: dict[str, dict] = {
    # 28x28 inputs (MNIST, Fashion-MNIST): the teacher reads 4x4 patches (49
    # tokens), the students 7x7 patches (16 tokens). On mnist5k a 7x7-patch
    # student is more accurate per FLOP (d_model 32: 96.7% at 2.4% of the
    # teacher's FLOPs; 4x4 patches, d_model 18: 96.6% at 3.2%) and about 2x
    # faster to train per FLOP on a CPU (fewer sequential scan steps).
    "mnist": {
        "patch_size": 4,
        "sizes": {
            "teacher": (64, 4, 16),
            "s1": (20, 1, 4, 7),
            "s2": (28, 1, 8, 7),
            "s3": (40, 1, 8, 7),
            "s4": (40, 2, 8, 7),
            "s5": (48, 2, 16, 7),
            "s6": (56, 3, 16, 7),
            "s7": (80, 3, 16, 7),
            "s8": (96, 4, 16, 7),
        },
    },
    # 32x32 inputs (CIFAR-10/100, SVHN), 4x4 patches -> 64 tokens.
    "cifar": {
        "patch_size": 4,
        "sizes": {
            "teacher": (96, 6, 16),
            "s1": (18, 1, 8),
            "s2": (24, 1, 8),
            "s3": (32, 1, 16),
            "s4": (32, 2, 16),
            "s5": (44, 2, 16),
            "s6": (60, 2, 16),
            "s7": (84, 2, 16),
            "s8": (96, 3, 16),
        },
    },
    # Small inputs for smoke runs and tests (any H, W divisible by 4).
    "tiny": {
        "patch_size": 4,
        "sizes": {
            "teacher": (16, 2, 4),
            "s1": (4, 1, 2),
            "s2": (6, 1, 2),
            "s3": (8, 1, 4),
            "s4": (12, 1, 4),
        },
    },
}


# ----------------------------------------------------------------------------
# The "auto" ladder: sizes derived from the image shape alone.
# ----------------------------------------------------------------------------

AUTO = "auto"
AUTO_TEACHER_TOKENS = (16, 64)  # the teacher's token count is kept in this range
AUTO_STUDENT_MIN_TOKENS = 16  # students read the coarsest patches with at least this many tokens
AUTO_FIRST_PCT = 1.0  # the first student's FLOPs, % of the teacher's
AUTO_GROWTH = 1.75  # FLOPs ratio between rungs
AUTO_RUNGS = 8  # s1..s8
AUTO_MIN_TOKENS = 4  # below this a patch is (nearly) the whole image
AUTO_MAX_TOKENS = 1024  # beyond this the images need resizing (sequential scan length)


def _divisors(h: int, w: int) -> list[int]:
  return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]


def auto_patch_sizes(image_shape: tuple[int, int, int]) -> tuple[int, int]:
  """``(teacher_patch, student_patch)`` for the "auto" ladder.

  Patch sizes always divide H and W (no padding). The teacher uses the patch
  whose token count is the largest in :data:`AUTO_TEACHER_TOKENS` (28x28: 4 -> 49
  tokens; 32x32: 4 -> 64; 8x8: 1 -> 64); when no common divisor lands in that
  range, the one closest to it (in log scale). The students use the largest
  patch that still leaves at least :data:`AUTO_STUDENT_MIN_TOKENS` tokens and no
  more than the teacher's (28x28: 7 -> 16 tokens; 32x32: 8 -> 16; 8x8: 2 -> 16).

  Raises:
    ValueError: the teacher would read fewer than :data:`AUTO_MIN_TOKENS` or more
      than :data:`AUTO_MAX_TOKENS` tokens (H and W have no suitable common
      divisor, e.g. 1009x1009, a prime): resize, crop or pad the images.
  """
  h, w, _ = (int(v) for v in image_shape)
  low, high = AUTO_TEACHER_TOKENS
  divisors = _divisors(h, w)
  tokens = {p: (h // p) * (w // p) for p in divisors}
  in_range = [p for p in divisors if low <= tokens[p] <= high]
  if in_range:
    teacher = min(in_range, key=lambda p: -tokens[p])
  else:
    distance = lambda p: max(math.log(low / tokens[p]), math.log(tokens[p] / high))
    teacher = min(divisors, key=lambda p: (distance(p), -p))
  if not AUTO_MIN_TOKENS <= tokens[teacher] <= AUTO_MAX_TOKENS:
    raise ValueError(
        f"ladder 'auto': images of shape {tuple(image_shape)} have no patch size dividing both "
        f"H and W that gives {AUTO_MIN_TOKENS}-{AUTO_MAX_TOKENS} tokens (patch sizes "
        f"{divisors} give {sorted(set(tokens.values()))}); resize, crop or pad them to a size "
        f"with more divisors (e.g. {h - h % 8 or h}x{w - w % 8 or w}), or pick a preset ladder"
    )
  coarse = [p for p in divisors if AUTO_STUDENT_MIN_TOKENS <= tokens[p] <= tokens[teacher]]
  student = max(coarse) if coarse else teacher
  return teacher, student


def auto_student_shape(d_model: int) -> tuple[int, int, int]:
  """``(d_model, n_layers, d_state)`` of the auto ladder's student family for a width.

  Depth and state grow with the width as in the hand-made mnist ladder: 1 layer
  below width 40, 2 below 56, 3 below 96, then 4; d_state 4 below width 24, 8
  below 48, then 16. FLOPs grow monotonically with ``d_model`` along the family.
  """
  n_layers = 1 if d_model < 40 else 2 if d_model < 56 else 3 if d_model < 96 else 4
  d_state = 4 if d_model < 24 else 8 if d_model < 48 else 16
  return d_model, n_layers, d_state


def auto_teacher_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
  """``(d_model, n_layers, d_state)`` of the auto teacher: the mnist teacher (64, 4, 16)
  for images of up to 1,024 values (H*W*C), the cifar teacher (96, 6, 16) above."""
  h, w, c = image_shape
  return (64, 4, 16) if h * w * c <= 1024 else (96, 6, 16)


def auto_ladder_spec(
    image_shape: tuple[int, int, int], num_classes: int, **overrides
) -> dict[str, dict]:
  """The "auto" ladder for an image shape, in the format of :data:`LADDERS` entries.

  The teacher: :func:`auto_teacher_shape` with :func:`auto_patch_sizes`' teacher
  patch. Student ``k`` (s1..s8): the width (even, >= 4) along
  :func:`auto_student_shape` whose FLOPs (``mamba_pkd.flops``, with
  ``overrides`` such as ``bidirectional`` applied) are closest in log scale to
  ``AUTO_FIRST_PCT% * AUTO_GROWTH**(k-1)`` of the teacher's, never above 1.5x
  that target for s1, and strictly growing.
  """
  from mamba_pkd import flops  # pylint: disable=g-import-not-at-top  # flops imports models

  image_shape = tuple(int(v) for v in image_shape)
  teacher_patch, student_patch = auto_patch_sizes(image_shape)
  teacher_size = auto_teacher_shape(image_shape)
  base = dict(image_shape=image_shape, num_classes=num_classes, **overrides)
  d, layers_, state = teacher_size
  teacher_flops = flops.count_flops(
      ModelConfig(patch_size=teacher_patch, d_model=d, n_layers=layers_, d_state=state, **base)
  )
  widths = list(range(4, 257, 2))
  cost = {}
  for width in widths:
    d, layers_, state = auto_student_shape(width)
    cost[width] = flops.count_flops(
        ModelConfig(patch_size=student_patch, d_model=d, n_layers=layers_, d_state=state, **base)
    )
  sizes = {"teacher": teacher_size}
  previous = 0
  for k in range(AUTO_RUNGS):
    target = teacher_flops * AUTO_FIRST_PCT / 100 * AUTO_GROWTH**k
    choices = [w for w in widths if cost[w] > previous and (k or cost[w] <= 1.5 * target)]
    if not choices:  # s1: even the narrowest student is dearer than 1.5x the target
      choices = [widths[0]] if k == 0 else []
    if not choices:
      break
    width = min(choices, key=lambda w: abs(math.log(cost[w] / target)))
    previous = cost[width]
    sizes[f"s{k + 1}"] = (*auto_student_shape(width), student_patch)
  return {"patch_size": teacher_patch, "sizes": sizes}


def ladder_families() -> tuple[str, ...]:
  """Valid ``model.ladder`` values: the named presets and ``"auto"``."""
  return (*sorted(LADDERS), AUTO)


def ladder_size_names(family: str) -> tuple[str, ...]:
  """The size names of a family (``"teacher"`` first); "auto" always has s1..s8."""
  if family == AUTO:
    return ("teacher", *(f"s{k + 1}" for k in range(AUTO_RUNGS)))
  if family not in LADDERS:
    raise ValueError(f"unknown ladder family {family!r}; valid: {list(ladder_families())}")
  return tuple(LADDERS[family]["sizes"])


def ladder_configs(
    family: str, *, image_shape: tuple[int, int, int], num_classes: int, **overrides
) -> dict[str, ModelConfig]:
  """The named sizes of a ladder family as ModelConfigs, teacher first.

  Args:
    family: a key of :data:`LADDERS`, or ``"auto"`` (:func:`auto_ladder_spec`:
      sizes derived from ``image_shape``).
    image_shape: (H, W, C) of the dataset.
    num_classes: number of classes.
    **overrides: other ModelConfig fields for every size (e.g. ``scan_method``,
      ``bidirectional``).

  Raises:
    ValueError: unknown family (valid ones listed) or a size that does not fit
      the images.
  """
  if family == AUTO:
    spec = auto_ladder_spec(tuple(image_shape), num_classes, **overrides)
  elif family in LADDERS:
    spec = LADDERS[family]
  else:
    raise ValueError(f"unknown ladder family {family!r}; valid: {list(ladder_families())}")
  configs = {}
  for name, size in spec["sizes"].items():
    d_model, n_layers, d_state, *own_patch = size
    patch_size = own_patch[0] if own_patch else spec["patch_size"]
    configs[name] = ModelConfig(
        image_shape=tuple(image_shape),
        num_classes=num_classes,
        patch_size=patch_size,
        d_model=d_model,
        n_layers=n_layers,
        d_state=d_state,
        **overrides,
    )
  return configs


def stage_steps(num_train: int, batch_size: int, epochs: int, min_steps: int = 0) -> int:
  """Training steps of a stage: ``max(epochs * ceil(num_train / batch_size), min_steps)``.

  ``min_steps`` keeps a small dataset from being trained for only a handful of
  steps (1,797 digits at batch 128 are 15 batches an epoch); ``0`` gives the
  plain epoch count. Raises ValueError naming a bad argument.
  """
  for name, value, least in (
      ("num_train", num_train, 1),
      ("batch_size", batch_size, 1),
      ("epochs", epochs, 0),
      ("min_steps", min_steps, 0),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
  return max(epochs * -(-num_train // batch_size), min_steps)
