"""The settings of a PKD run: ``config.pkd`` and the stage optimisers, validated before any work.

:func:`validate_config` checks everything that can be checked without data
(choices, ranges, ladder sizes, batch divisibility) and raises ``ValueError``
with one line naming the bad field and the valid values; ``pkd`` calls it
before loading the dataset or compiling anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections

from mamba_pkd import anytime, parallel, train
from mamba_pkd import data as data_lib
from mamba_pkd.cnn_mlp import FAMILIES
from mamba_pkd.ladders import OTHER_FAMILIES, family_size_name, ladder_families, ladder_size_names
from mamba_pkd.ladders import split_size_name

MODES = ("ensemble", "chain")
TARGETS = ("teacher", "residual")
STAGE_LOSSES = ("kd", "bdistil")
ACCEPT_RULES = ("fit", "edge")


# ----------------------------------------------------------------------------
# Settings, validated before any expensive work.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PKDSettings:
  """The distillation settings of a run (see the module docstring)."""

  mode: str = "ensemble"
  target: str = "teacher"
  ladder: tuple[str, ...] = ("s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8")
  max_students: int = 7
  flops_budget_pct: float = 100.0
  epsilon: float = -1.0
  alpha: float = 0.5
  temperature: float = 4.0
  loss: str = "kd"
  accept: str = "fit"
  margin: float = 0.0
  margin_se: float = 0.0
  gamma: float = 0.0
  max_accuracy_drop: float = 0.005
  reseeds: int = 1
  repeat_size: bool = False
  connect: bool = False
  connect_tokens: bool = False
  cascade_focus: float = 0.0
  family_rows: tuple[str, ...] = ()  # report.family_rows: cnn_k / mlp_k rows beside student_k


def _choice(value: Any, valid: Sequence[str], field: str) -> None:
  if value not in valid:
    raise ValueError(f"{field}={value!r} is not valid; choose one of {tuple(valid)}")


def settings_from_config(config: ml_collections.ConfigDict) -> PKDSettings:
  """Reads and validates ``config.pkd``; raises ValueError naming the bad field."""
  p = config.pkd
  family = config.model.get("student_family", "mamba")
  _choice(family, FAMILIES, "model.student_family")
  family_rows = config.report.get("family_rows", ())
  family_rows = (family_rows,) if isinstance(family_rows, str) else tuple(family_rows)
  for name in family_rows:
    _choice(name, FAMILIES, "report.family_rows")
  s = PKDSettings(
      mode=p.mode,
      target=p.get("target", "teacher"),
      # Bare rung names ("s2") are the student family's size; "cnn_s2" picks one per rung.
      ladder=tuple(
          family_size_name(family, n) if split_size_name(n)[0] == "mamba" else n for n in p.ladder
      ),
      max_students=p.max_students,
      flops_budget_pct=p.flops_budget_pct,
      epsilon=p.epsilon,
      alpha=p.alpha,
      temperature=p.temperature,
      loss=p.loss,
      accept=p.accept,
      margin=p.margin,
      margin_se=p.get("margin_se", 0.0),
      gamma=p.gamma,
      max_accuracy_drop=p.max_accuracy_drop,
      reseeds=p.reseeds,
      repeat_size=p.get("repeat_size", False),
      connect=p.connect,
      connect_tokens=p.get("connect_tokens", False),
      cascade_focus=p.get("cascade_focus", 0.0),
      family_rows=family_rows,
  )
  _choice(s.mode, MODES, "pkd.mode")
  if s.family_rows and (s.mode, s.target) != ("ensemble", "teacher"):
    raise ValueError(
        f"report.family_rows={s.family_rows} distils each family from the teacher alone, "
        "like the students of pkd.mode='ensemble' with pkd.target='teacher'; got "
        f"pkd.mode={s.mode!r}, pkd.target={s.target!r} (set report.family_rows=())"
    )
  _choice(s.target, TARGETS, "pkd.target")
  if s.loss == "bdistil" and s.target != "residual":
    raise ValueError(
        "pkd.loss='bdistil' fits the residual of the ensemble: it needs "
        f"pkd.target='residual', got pkd.target={s.target!r}"
    )
  _choice(s.loss, STAGE_LOSSES, "pkd.loss")
  _choice(s.accept, ACCEPT_RULES, "pkd.accept")
  if not s.ladder:
    raise ValueError("pkd.ladder is empty; give at least one size name, e.g. ('s1', 's2')")
  if not isinstance(s.max_students, int) or s.max_students < 1:
    raise ValueError(f"pkd.max_students must be an int >= 1, got {s.max_students!r}")
  if not 0.0 <= s.alpha <= 1.0:
    raise ValueError(f"pkd.alpha must be in [0, 1], got {s.alpha}")
  if not s.temperature > 0:
    raise ValueError(f"pkd.temperature must be > 0, got {s.temperature}")
  if not s.flops_budget_pct > 0:
    raise ValueError(f"pkd.flops_budget_pct must be > 0, got {s.flops_budget_pct}")
  if not s.margin_se >= 0:
    raise ValueError(
        f"pkd.margin_se must be >= 0 (standard errors of the fit's drop), got {s.margin_se}"
    )
  focus = s.cascade_focus
  if isinstance(focus, bool) or not isinstance(focus, (int, float)) or not 0 <= focus <= 1:
    raise ValueError(
        f"pkd.cascade_focus must be a number in [0, 1] (0: off), got {s.cascade_focus!r}"
    )
  if s.cascade_focus and s.mode != "ensemble":
    raise ValueError(
        f"pkd.cascade_focus={s.cascade_focus} weights a student's examples by its ensemble "
        f"prefix's confidence; it needs pkd.mode='ensemble', got {s.mode!r}"
    )
  if s.connect_tokens and not s.connect:
    raise ValueError(
        "pkd.connect_tokens=True says what a connected student reads; it needs "
        "pkd.connect=True, got pkd.connect=False"
    )
  other = [n for n in s.ladder if split_size_name(n)[0] != "mamba"]
  if s.connect_tokens and other:
    raise ValueError(
        f"pkd.connect_tokens=True passes token-level hidden states, which only Mamba "
        f"students have; the ladder has {other} (use Mamba sizes or pkd.connect_tokens=False)"
    )
  if s.reseeds < 0:
    raise ValueError(f"pkd.reseeds must be >= 0, got {s.reseeds}")
  if not 0 <= s.max_accuracy_drop <= 1:
    raise ValueError(f"pkd.max_accuracy_drop must be in [0, 1], got {s.max_accuracy_drop}")
  return s


def optim_from_config(stage: ml_collections.ConfigDict, name: str) -> train.OptimConfig:
  """``config.teacher`` / ``config.student`` -> OptimConfig (errors name the field)."""
  try:
    return train.OptimConfig(
        learning_rate=stage.learning_rate,
        weight_decay=stage.weight_decay,
        warmup_fraction=stage.warmup_fraction,
        epochs=stage.epochs,
        batch_size=stage.batch_size,
        grad_clip=stage.grad_clip,
        min_steps=stage.get("min_steps", 0),
    )
  except ValueError as e:
    raise ValueError(f"{name}.{e}") from None


def validate_config(config: ml_collections.ConfigDict) -> dict:
  """Checks everything that can be checked without data; returns parsed pieces."""
  settings = settings_from_config(config)
  teacher_optim = optim_from_config(config.teacher, "teacher")
  student_optim = optim_from_config(config.student, "student")
  _choice(config.teacher.augment, data_lib.AUGMENTATIONS, "teacher.augment")
  _choice(config.student.augment, data_lib.AUGMENTATIONS, "student.augment")
  views = config.student.get("cached_views", 0)
  if isinstance(views, bool) or not isinstance(views, int) or views < 0:
    raise ValueError(f"student.cached_views must be an int >= 0 (0: augment live), got {views!r}")
  if views > 1 and config.student.augment == "none":
    raise ValueError(
        f"student.cached_views={views} needs an augmentation to draw the views "
        "from: set student.augment to 'shift', 'crop_flip' or 'affine', or "
        "cached_views to 0"
    )
  if settings.cascade_focus and not views and config.student.augment != "none":
    raise ValueError(
        f"pkd.cascade_focus={settings.cascade_focus} weights examples by the prefix's "
        "outputs cached per training row: set student.cached_views >= 1 (or "
        f"student.augment='none'), got cached_views=0 with augment={config.student.augment!r}"
    )
  if config.model.ladder not in ladder_families():
    raise ValueError(
        f"model.ladder={config.model.ladder!r} is not valid; choose one of {ladder_families()}"
    )
  rungs = [s for s in ladder_size_names(config.model.ladder) if s != "teacher"]
  valid = rungs + [family_size_name(f, r) for f in OTHER_FAMILIES for r in rungs]
  unknown = [s for s in settings.ladder if s not in valid]
  if unknown:
    raise ValueError(
        f"pkd.ladder has unknown size(s) {unknown}; valid sizes of ladder "
        f"{config.model.ladder!r}: {rungs}, or a rung of another family, e.g. "
        f"{family_size_name('cnn', rungs[0])!r} ({' | '.join(OTHER_FAMILIES)})"
    )
  if config.validation_size < 1:
    raise ValueError(f"validation_size must be >= 1, got {config.validation_size}")
  for field in ("teacher", "student"):
    parallel.check_batch_divisible(config[field].batch_size, f"{field}.batch_size")
  parallel.check_batch_divisible(config.eval_batch_size, "eval_batch_size")
  anytime.settings(config)  # report.cascade_* fields
  return dict(settings=settings, teacher_optim=teacher_optim, student_optim=student_optim)
