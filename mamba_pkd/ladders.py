"""The size ladders: named ModelConfigs from the teacher down to ~1% of its FLOPs.

``ladder_configs(family, image_shape=..., num_classes=...)`` gives the sizes of a
family as :class:`mamba_pkd.models.ModelConfig` s, teacher first: the presets in
:data:`LADDERS` (``mnist``, ``cifar``, ``tiny``) or ``"auto"``, the preset made for the
images' shape (:data:`AUTO_PRESETS`) or sizes derived from the shape
(:func:`auto_ladder_spec`: patches that divide the image, students from ~1% of the
teacher's FLOPs upward, counted by :mod:`mamba_pkd.flops`).
"""

from __future__ import annotations

import math

from mamba_pkd import flops
from mamba_pkd.cnn_mlp import CNNConfig, MLPConfig
from mamba_pkd.models import ModelConfig

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
# "auto" uses the named preset made for a shape (measured on that data) and derives the
# ladder from the shape otherwise.
AUTO_PRESETS = {(28, 28, 1): "mnist", (32, 32, 3): "cifar"}
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
    family: a key of :data:`LADDERS`, or ``"auto"``: the preset of :data:`AUTO_PRESETS`
      for its shape (28x28x1: ``mnist``, 32x32x3: ``cifar``), else
      :func:`auto_ladder_spec` (sizes derived from ``image_shape``).
    image_shape: (H, W, C) of the dataset.
    num_classes: number of classes.
    **overrides: other ModelConfig fields for every size (e.g. ``scan_method``,
      ``bidirectional``).

  Raises:
    ValueError: unknown family (valid ones listed) or a size that does not fit
      the images.
  """
  if family == AUTO and tuple(image_shape) in AUTO_PRESETS:
    spec = LADDERS[AUTO_PRESETS[tuple(image_shape)]]
  elif family == AUTO:
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


# ----------------------------------------------------------------------------
# CNN and MLP students at the Mamba rungs' FLOPs (mamba_pkd.cnn_mlp).
# ----------------------------------------------------------------------------

OTHER_FAMILIES = ("cnn", "mlp")
FAMILY_MATCH_TOLERANCE = 0.02  # a rung's candidates within 2% of the Mamba rung's FLOPs
CNN_KERNEL = 3
CNN_WIDTHS = range(1, 257)  # c1; c2 = 2 * c1
CNN_HIDDEN = (8, 4096)  # the dense layer's width is solved for, within this range
MLP_WIDTHS = range(4, 4097)  # h1; h2 = h1 // 2


def family_size_name(family: str, size: str) -> str:
  """``"cnn_s3"``: the ``family`` student at the FLOPs of Mamba size ``size``
  (``"s3"`` for ``"mamba"``)."""
  return size if family == "mamba" else f"{family}_{size}"


def split_size_name(name: str) -> tuple[str, str]:
  """``"cnn_s3" -> ("cnn", "s3")``, ``"s3" -> ("mamba", "s3")``."""
  family, _, rung = name.partition("_")
  return (family, rung) if rung and family in OTHER_FAMILIES else ("mamba", name)


def _log_error(value: float, target: float) -> float:
  return abs(math.log(value / target))


def match_cnn(target: int, image_shape, num_classes: int) -> CNNConfig:
  """The CNN (LeNet proportions: channels (c, 2c), 3x3 kernels) whose FLOPs match ``target``.

  For each width c of :data:`CNN_WIDTHS` the dense width h is solved for (FLOPs are
  affine in h), rounded and kept within :data:`CNN_HIDDEN`. Of the (c, h) within
  :data:`FAMILY_MATCH_TOLERANCE` of the target, the one with h closest to 4 x 2c (in log
  scale) wins; when none is that close, the closest in FLOPs.
  """
  base = CNNConfig(image_shape=tuple(image_shape), num_classes=num_classes, kernel=CNN_KERNEL)
  candidates = []
  for c in CNN_WIDTHS:
    one, two = (flops.count_flops(base.replace(channels=(c, 2 * c), hidden=h)) for h in (1, 2))
    if one - (two - one) >= target:
      break  # the convolutions alone cost more; wider c only more
    h = round((target - (one - (two - one))) / (two - one))
    h = min(max(h, CNN_HIDDEN[0]), CNN_HIDDEN[1])
    config = base.replace(channels=(c, 2 * c), hidden=h)
    candidates.append((config, flops.count_flops(config)))
  if not candidates:
    config = base.replace(channels=(1, 2), hidden=CNN_HIDDEN[0])
    return config
  close = [(c, f) for c, f in candidates if _log_error(f, target) <= FAMILY_MATCH_TOLERANCE]
  if close:
    return min(close, key=lambda cf: abs(math.log(cf[0].hidden / (8 * cf[0].channels[0]))))[0]
  return min(candidates, key=lambda cf: _log_error(cf[1], target))[0]


def match_mlp(target: int, image_shape, num_classes: int) -> MLPConfig:
  """The two-layer MLP (widths (h, h // 2), h in :data:`MLP_WIDTHS`) closest to
  ``target`` FLOPs (in log scale)."""
  base = MLPConfig(image_shape=tuple(image_shape), num_classes=num_classes)

  def config(h: int) -> MLPConfig:
    return base.replace(hidden=(h, max(1, h // 2)))

  # FLOPs grow strictly with h (the first layer alone adds pixels x 2 per unit of h), so
  # the error in log scale falls, then rises: the closest width is one of the two around
  # the first whose FLOPs reach the target (found by bisection instead of counting all).
  lo, hi = 0, len(MLP_WIDTHS) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if flops.count_flops(config(MLP_WIDTHS[mid])) >= target:
      hi = mid
    else:
      lo = mid + 1
  near = [config(h) for h in MLP_WIDTHS[max(lo - 1, 0) : lo + 1]]
  return min(near, key=lambda c: _log_error(flops.count_flops(c), target))


def family_sizes(sizes: dict[str, ModelConfig]) -> dict[str, CNNConfig | MLPConfig]:
  """``cnn_<s>`` and ``mlp_<s>`` for every student size ``<s>`` of a Mamba ladder: the
  CNN and the MLP whose analytic FLOPs match that size's (:func:`match_cnn`,
  :func:`match_mlp`), same image shape and classes."""
  out = {}
  for name, config in sizes.items():
    if name == "teacher":
      continue
    target = flops.count_flops(config)
    shape, classes = config.image_shape, config.num_classes
    out[family_size_name("cnn", name)] = match_cnn(target, shape, classes)
    out[family_size_name("mlp", name)] = match_mlp(target, shape, classes)
  return out
