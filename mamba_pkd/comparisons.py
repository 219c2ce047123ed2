"""The single models each PKD student is measured against, trained on the same budget.

* :func:`train_baselines`: ``baseline_k``, student k's size trained alone with
  cross-entropy on the same views and steps.
* :func:`train_family_rows`: ``cnn_k`` / ``mlp_k`` (``report.family_rows``), the CNN and
  the MLP of :mod:`mamba_pkd.cnn_mlp` at the FLOPs of student k's Mamba rung
  (``cnn_<s>``, ``mlp_<s>`` of :func:`mamba_pkd.ladders.family_sizes`), distilled from
  the same cached teacher outputs on the same views, with the same loss (the teacher
  alone: ``pkd.target='teacher'``), optimiser, steps and seed as student k, so that the
  three families see the same batches in the same order. ``mamba_k`` where a student
  of another family (a mixed ladder) wants its Mamba counterpart.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mamba_pkd import losses, train
from mamba_pkd.ladders import family_size_name, split_size_name
from mamba_pkd.stages import PoolTables, RunContext, Trained, run_stage


def train_baselines(ctx: RunContext, students: Sequence[Trained]) -> list[Trained]:
  """Each student's size trained alone with cross-entropy on the same budget."""
  out = []
  for k, student in enumerate(students, start=1):
    model_config = ctx.sizes[student.size]  # the size alone: not connected, pooled features
    seed = ctx.config.seed + 7 + 1000 * k
    member = run_stage(
        ctx,
        f"baseline_{k}_{student.size}",
        student.size,
        model_config,
        losses.hard("student"),
        ctx.student_optim,
        seed=seed,
        augment=ctx.config.student.augment,
        views=ctx.views,
        kind="baseline",
    )
    out.append(dataclasses.replace(member, name=f"baseline_{k}"))
  return out


def family_row_plan(
    students: Sequence[Trained], families: Sequence[str]
) -> list[tuple[str, int, str]]:
  """``(family, k, size)`` of every family row: for student k (rung ``s<r>`` of its size)
  and each family of ``families`` other than the student's own, that family's size at
  the rung (``cnn_s<r>``, ``mlp_s<r>``, ``s<r>``). Ordered by family, then k."""
  plan = []
  for family in families:
    for k, student in enumerate(students, start=1):
      own, rung = split_size_name(student.size)
      if family != own:
        plan.append((family, k, family_size_name(family, rung)))
  return plan


def train_family_rows(
    ctx: RunContext,
    pool: PoolTables,
    teacher: Trained,
    students: Sequence[Trained],
    families: Sequence[str],
    stage_loss: losses.StageLoss,
) -> list[Trained]:
  """The ``<family>_k`` models of :func:`family_row_plan`, distilled from the teacher.

  ``stage_loss`` is the first student's (the teacher alone); each row reuses its
  student's seed (``info["seed"]``), hence its batches and views epoch by epoch.
  """
  out = []
  for family, k, size in family_row_plan(students, families):
    seed = int(students[k - 1].info["seed"])
    model_config = ctx.sizes[size]
    member = run_stage(
        ctx,
        f"{family}_{k}_{split_size_name(size)[1]}",
        size,
        model_config,
        stage_loss,
        ctx.student_optim,
        seed=seed,
        augment=ctx.config.student.augment,
        tables=lambda: {"teacher_logits": pool.logits(teacher)},
        spec=train.FrozenSpec(teacher=teacher.config),
        frozen=train.Frozen(teacher=teacher.params),
        views=ctx.views,
        kind="student",
        frozen_hashes={"teacher": teacher.fingerprint},
    )
    out.append(dataclasses.replace(member, name=f"{family}_{k}"))
  return out
