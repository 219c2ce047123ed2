"""Progressive knowledge distillation: the teacher, then students, then the report.

Notation (paper -> code):

=================  ==================  ======================================
symbol             name                meaning
=================  ==================  ======================================
``g(x)``           teacher logits      frozen teacher, trained first with CE
``f_k(x)``         student k logits    the k-th accepted student
``F_k(x)``         prefix k logits     ``sum_{j<=k} eta_j f_j(x)``
``eta_k``          weight              student k's ensemble weight (folded into its head)
``a``, ``T``       alpha, temperature  ``L = a*CE(y, F_k) + (1-a)*T^2*KL(g/T || F_k/T)``
``gamma_k``        edge                B-DISTIL weak-learner edge on held-out data
=================  ==================  ======================================

Modes:

* ``ensemble`` (default): student k is trained either on the teacher alone
  (``target="teacher"``, the default: every student distils the teacher, and
  its weight ``eta_k`` is a line search on held-out data, the step of gradient
  boosting) or on the residual ``stop_gradient(F_{k-1}) + f_k``
  (``target="residual"``, B-DISTIL's formulation, ``eta_k = 1``). It is
  *accepted as a weak learner* when the held-out fit of the ensemble to the
  teacher improves (``accept="fit"``: soft KL to the teacher drops by at
  least ``margin``; with ``target="teacher"`` both fits are taken at the best
  overall scale of the logits, since a sum of independent students is only
  meaningful up to scale) or its edge is at least ``gamma``
  (``accept="edge"``), without losing more than ``max_accuracy_drop`` of
  held-out accuracy. A rejected candidate is retrained
  once with another seed (``reseeds``), then the next larger size on the
  ladder is tried. Each accepted student moves one rung up the ladder. The loop
  stops at ``max_students``, at the FLOPs budget, when the ladder is exhausted,
  or when the ensemble's held-out accuracy is within ``epsilon`` of the
  teacher's. Any prefix of the ensemble is a classifier (anytime inference).
* ``chain`` (teacher assistants): teacher -> student 1 -> student 2 ..., each
  distilled from the previous frozen model, sizes in decreasing FLOPs order.

Where things live: the settings and their validation in :mod:`mamba_pkd.settings`,
the weak-learner test (pure functions of held-out logits) in
:mod:`mamba_pkd.weak_learner`, training or restoring one stage in
:mod:`mamba_pkd.stages`, the ensemble arithmetic in :mod:`mamba_pkd.ensemble`,
the rows in :mod:`mamba_pkd.evaluate`, the single models each student is measured
against (CE baselines, CNN and MLP students at its FLOPs) in
:mod:`mamba_pkd.comparisons`, the post-hoc per-prefix combination and early-exit
cascade in :mod:`mamba_pkd.anytime`. This module holds the
loops and :func:`train_and_evaluate`, which ends by writing the run manifest
(:mod:`mamba_pkd.manifest`) and the report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Sequence

from absl import logging
import ml_collections
import numpy as np

from mamba_pkd import anytime, combine, comparisons, ensemble, flops, losses, manifest, parallel
from mamba_pkd import report, sanity, train, weak_learner
from mamba_pkd.evaluate import LatencyPrograms, accuracy, build_rows, pixel_baseline_row
from mamba_pkd.models import ModelConfig, feature_width
from mamba_pkd.preprocessing import Preprocessing
from mamba_pkd.settings import PKDSettings
from mamba_pkd.stages import PoolTables, RunContext, Trained, create_context, run_stage, write_config
from mamba_pkd.weak_learner import weak_learner_decision


def stage_loss_for(settings: PKDSettings, *, first: bool) -> losses.StageLoss:
  """The loss of an ensemble/chain student stage, as a composition."""
  if settings.mode == "chain":
    return losses.kd(settings.alpha, settings.temperature, view="student", target="previous")
  base = None if first or settings.target == "teacher" else "prefix"
  view = losses.residual("student", base=base)
  if settings.loss == "bdistil":
    return losses.bdistil(view="student", target="teacher", base=base)
  return losses.kd(settings.alpha, settings.temperature, view=view, target="teacher")


def train_teacher(ctx: RunContext) -> Trained:
  return run_stage(
      ctx,
      "teacher",
      "teacher",
      ctx.sizes["teacher"],
      losses.hard("student"),
      ctx.teacher_optim,
      seed=ctx.config.seed,
      augment=ctx.config.teacher.augment,
      kind="teacher",
  )


def _student_config(ctx: RunContext, size: str, prev: Trained | None) -> ModelConfig:
  model_config = ctx.sizes[size]
  if ctx.settings.connect_tokens:  # every student hands its token states to the next
    model_config = model_config.replace(token_features=True)
  if ctx.settings.connect and prev is not None:
    model_config = model_config.replace(connect_dim=feature_width(prev.config))
  return model_config


def student_tables(
    pool: PoolTables,
    teacher: Trained,
    accepted: Sequence[Trained],
    *,
    with_prefix: bool,
    connected: bool,
    focus: float = 0.0,
    temperature: float = 1.0,
) -> dict[str, np.ndarray]:
  """What a student stage reads of the frozen models, per row of the pool.

  The teacher's logits; with ``with_prefix`` the prefix ``F_{k-1}`` of the
  accepted students (residual target or connections); with ``connected`` the
  last accepted student's features; with ``focus > 0`` the rows' loss weights
  from the prefix's confidence at ``temperature`` (:func:`weak_learner.focus_weights`).
  """
  tables = {"teacher_logits": pool.logits(teacher)}
  if accepted and (with_prefix or focus):
    previous = [None, *accepted[:-1]]
    prefix = ensemble.prefix_logits([pool.logits(m, p) for m, p in zip(accepted, previous)])
    if with_prefix:
      tables["prefix_logits"] = prefix
      if connected:
        tables["prev_features"] = pool.features(accepted[-1], previous[-1])
    if focus:
      w = weak_learner.focus_weights(prefix, temperature, focus)
      tables["example_weight"] = w
      logging.info(
          "cascade_focus=%g at T=%.3f: effective sample size %.1f%% of %d rows",
          focus,
          temperature,
          100 * w.sum() ** 2 / (len(w) * np.sum(np.square(w, dtype=np.float64))),
          len(w),
      )
  return tables


def distil_ensemble(
    ctx: RunContext, teacher: Trained, pool: PoolTables
) -> tuple[list[Trained], list[dict]]:
  """The ensemble (boosting) loop; returns accepted students and a decision log."""
  s, cfg = ctx.settings, ctx.config
  val = ctx.val_index
  teacher_flops = flops.count_flops(teacher.config)
  budget = s.flops_budget_pct / 100.0 * teacher_flops
  teacher_val_acc = accuracy(teacher.train_logits[val], ctx.val_labels)
  accepted: list[Trained] = []
  log: list[dict] = []
  used_flops = 0
  rung = 0
  while rung < len(s.ladder):
    size = s.ladder[rung]
    if len(accepted) >= s.max_students:
      log.append({"stop": f"max_students={s.max_students} reached"})
      break
    k = len(accepted) + 1
    prev = accepted[-1] if accepted else None
    model_config = _student_config(ctx, size, prev)
    size_flops = flops.count_flops(model_config)
    if used_flops + size_flops > budget:
      pct = 100 * (used_flops + size_flops) / teacher_flops
      log.append(
          {
              "stop": f"size {size} would exceed the FLOPs budget "
              f"({pct:.1f}% > {s.flops_budget_pct}%)"
          }
      )
      break
    prefix_val = (
        ensemble.prefix_logits([m.train_logits[val] for m in accepted]) if accepted else None
    )
    # What the stage reads of the frozen models: the teacher's logits, the
    # prefix's (residual target) and the previous student's features (connect).
    with_prefix = bool(accepted) and (s.target == "residual" or bool(model_config.connect_dim))
    # Cascade-aware training: the examples weighted by how unsure the prefix is, at its
    # temperature fitted on held-out labels.
    focus = s.cascade_focus if accepted else 0.0
    temperature = combine.fit_temperature(prefix_val, ctx.val_labels) if focus else 1.0
    tables = functools.partial(
        student_tables,
        pool,
        teacher,
        tuple(accepted),
        with_prefix=with_prefix,
        connected=bool(model_config.connect_dim),
        focus=focus,
        temperature=temperature,
    )
    frozen_students = accepted if with_prefix else []
    spec = train.FrozenSpec(
        teacher=teacher.config, students=tuple(m.config for m in frozen_students)
    )
    frozen = train.Frozen(teacher=teacher.params, students=tuple(m.params for m in frozen_students))
    frozen_hashes = {
        "teacher": teacher.fingerprint,
        **{m.name: m.fingerprint for m in (accepted if focus else frozen_students)},
    }
    decision = None
    for attempt in range(1 + s.reseeds):
      seed = cfg.seed + 1000 * k + 100 * rung + attempt
      name = f"student_{k}_{size}_try{attempt + 1}"
      candidate = run_stage(
          ctx,
          name,
          size,
          model_config,
          stage_loss_for(s, first=not accepted),
          ctx.student_optim,
          seed=seed,
          augment=cfg.student.augment,
          tables=tables,
          spec=spec,
          frozen=frozen,
          prev=prev,
          views=ctx.views,
          kind="student",
          frozen_hashes=frozen_hashes,
          weighting={"cascade_focus": focus} if focus else None,
      )
      decision = weak_learner_decision(
          teacher=teacher.train_logits[val],
          candidate=candidate.train_logits[val],
          prefix=prefix_val,
          labels=ctx.val_labels,
          settings=s,
      )
      entry = {"candidate": name, "size": size, **dataclasses.asdict(decision)}
      log.append(entry)
      verdict = "ACCEPTED" if decision.accepted else "rejected"
      logging.info("%s %s: %s", name, verdict, decision.reason)
      if decision.accepted:
        # F_k = F_{k-1} + eta_k f_k, a plain sum once eta_k is folded into f_k.
        member = candidate.weighted(decision.weight)
        accepted.append(
            dataclasses.replace(
                member,
                name=f"student_{k}",
                prefix_scale=decision.scale,
                info=dict(member.info, **entry),
            )
        )
        used_flops += size_flops
        break
    within = 0 <= s.epsilon and decision.accuracy_after >= teacher_val_acc - s.epsilon
    if decision.accepted and within:
      log.append(
          {
              "stop": f"held-out accuracy {decision.accuracy_after:.4f} within "
              f"epsilon={s.epsilon} of the teacher's {teacher_val_acc:.4f}"
          }
      )
      break
    # pkd.repeat_size (B-DISTIL's loop): a size that has just given a weak learner is
    # tried again for the next student; a rejection moves on to the next size.
    if not (s.repeat_size and decision.accepted):
      rung += 1
  else:
    log.append({"stop": "ladder exhausted"})
  return accepted, log


def chain_sizes(ctx: RunContext) -> list[str]:
  """The chain's sizes, largest first, ending at the smallest rung of ``pkd.ladder``.

  The ``max_students`` smallest sizes: teacher -> assistants -> the deployed
  (smallest) student, which must fit ``pkd.flops_budget_pct`` of the teacher.

  Raises:
    ValueError: the smallest size does not fit the budget (checked before any training).
  """
  s = ctx.settings
  ascending = sorted(s.ladder, key=lambda n: flops.count_flops(ctx.sizes[n]))
  teacher_flops = flops.count_flops(ctx.sizes["teacher"])
  pct = 100.0 * flops.count_flops(ctx.sizes[ascending[0]]) / teacher_flops
  if pct > s.flops_budget_pct:
    raise ValueError(
        f"pkd.mode='chain' deploys the smallest size {ascending[0]!r}, which needs "
        f"{pct:.2f}% of the teacher's FLOPs > pkd.flops_budget_pct={s.flops_budget_pct}; "
        "raise the budget or add a smaller size to pkd.ladder"
    )
  return ascending[: s.max_students][::-1]


def distil_from(
    ctx: RunContext, pool: PoolTables, source: Trained, role: str, name: str, size: str, seed: int
) -> Trained:
  """Stage ``name``: ``size`` distilled from the frozen model ``source`` alone (chain mode),
  whose fingerprint it records under ``role`` (``"previous"`` or ``"teacher"``)."""
  return run_stage(
      ctx,
      name,
      size,
      ctx.sizes[size],
      stage_loss_for(ctx.settings, first=True),
      ctx.student_optim,
      seed=seed,
      augment=ctx.config.student.augment,
      tables=functools.partial(
          student_tables, pool, source, (), with_prefix=False, connected=False
      ),
      spec=train.FrozenSpec(teacher=source.config),
      frozen=train.Frozen(teacher=source.params),
      views=ctx.views,
      kind="student",
      frozen_hashes={role: source.fingerprint},
  )


def distil_chain(
    ctx: RunContext, teacher: Trained, pool: PoolTables
) -> tuple[list[Trained], list[dict]]:
  """Teacher assistants: each size (largest first, ending at the smallest) distils the
  previous model; the last, smallest one is the deployed student."""
  previous, students = teacher, []
  for k, size in enumerate(chain_sizes(ctx), start=1):
    seed = ctx.config.seed + 1000 * k
    member = distil_from(ctx, pool, previous, "previous", f"chain_{k}_{size}", size, seed)
    previous = dataclasses.replace(member, name=f"student_{k}")
    students.append(previous)
  return students, [{"chain": [m.size for m in students]}]


def distil_direct(
    ctx: RunContext, teacher: Trained, pool: PoolTables, size: str, seed: int
) -> Trained:
  """``size`` distilled straight from the teacher with the chain's loss, steps and seed: what
  the chain of assistants must beat (``direct_<size>`` row)."""
  member = distil_from(ctx, pool, teacher, "teacher", f"direct_{size}", size, seed)
  return dataclasses.replace(member, name=f"direct_{size}")


def write_run_manifest(
    ctx: RunContext,
    teacher: Trained,
    students: Sequence[Trained],
    baselines: Sequence[Trained],
    rows: Sequence[report.Row],
    stop: str,
    combination=None,
) -> pathlib.Path:
  """The run's contract with export, predict and notebooks (see :mod:`mamba_pkd.manifest`)."""
  by_name = {r.name: r.accuracy for r in rows}
  acc = {teacher.name: by_name.get("teacher")}
  for k, m in enumerate(students, start=1):
    acc[m.name] = by_name.get(f"prefix_1..{k}" if ctx.settings.mode == "ensemble" else m.name)
  acc.update({m.name: by_name.get(m.name) for m in baselines})
  ds = ctx.dataset
  return manifest.write_manifest(
      ctx.workdir,
      mode=ctx.settings.mode,
      dataset={
          "name": ds.name,
          "seed": int(ctx.config.seed),
          "num_train": int(len(ctx.train_index)),
          "num_heldout": int(len(ctx.val_index)),
          "num_test": int(ds.num_test),
      },
      preprocessing=Preprocessing(ds.image_shape, ds.num_classes, ds.mean, ds.std),
      teacher=teacher.as_member(),
      students=[m.as_member() for m in students],
      baselines=[m.as_member() for m in baselines],
      stop=stop,
      test_accuracy=acc,
      combination=combination,
  )


def latency_programs_ahead(
    ctx: RunContext, teacher: Trained, students: Sequence[Trained]
) -> LatencyPrograms | None:
  """Starts compiling the report's latency programs (teacher, each standalone student, each
  prefix) on a background thread, so they compile while the baselines train; ``None``
  when the report measures no latency."""
  if not ctx.config.report.latency:
    return None
  programs = LatencyPrograms(ctx.dataset.image_shape)
  groups = [[teacher]] + [[m] for m in students if not m.config.connect_dim]
  if ctx.settings.mode == "ensemble":
    groups += [students[:k] for k in range(1, len(students) + 1)]
  programs.start(groups)
  return programs


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, retrain_changed: bool = False
) -> list[report.Row]:
  """The whole job: teacher, PKD students, baselines, manifest, report. Returns the rows.

  Re-running with the same workdir resumes: completed stages are restored, an
  interrupted stage continues from its latest checkpoint. A stage whose fingerprint
  (data, model, learned config, steps, seed, frozen models) differs from the one it was
  trained with stops the run with one line naming the fields, or, with
  ``retrain_changed``, is trained again (and so is every stage that read it).
  """
  t0 = time.time()
  ctx = create_context(config, workdir, retrain_changed=retrain_changed)
  if ctx.settings.mode == "chain":
    chain_sizes(ctx)  # a budget the deployed student cannot meet fails before any training
  teacher = train_teacher(ctx)
  logging.info(
      "teacher: held-out accuracy %.4f, test accuracy %.4f",
      accuracy(teacher.train_logits[ctx.val_index], ctx.val_labels),
      accuracy(teacher.test_logits, ctx.dataset.y_test),
  )
  pool = PoolTables(ctx)  # the frozen models' outputs on the view pool, computed once each
  if ctx.settings.mode == "ensemble":
    students, decisions = distil_ensemble(ctx, teacher, pool)
    direct = []
  else:
    students, decisions = distil_chain(ctx, teacher, pool)
    k = len(students)  # the deployed student, distilled directly with its own seed
    direct = [distil_direct(ctx, teacher, pool, students[-1].size, config.seed + 1000 * k)]
  programs = latency_programs_ahead(ctx, teacher, students)
  try:
    baselines = comparisons.train_baselines(ctx, students) if config.baselines else []
    family = comparisons.train_family_rows(
        ctx,
        pool,
        teacher,
        students,
        ctx.settings.family_rows,
        stage_loss_for(ctx.settings, first=True),
    )
    predictions = {}  # row name -> predicted class per test image (for paired tests)
    rows = build_rows(
        teacher=teacher,
        students=students,
        baselines=baselines,
        direct=direct,
        family=family,
        predictions=predictions,
        labels=ctx.dataset.y_test,
        image_shape=ctx.dataset.image_shape,
        prefixes=ctx.settings.mode == "ensemble",
        latency=config.report.latency,
        repeats=config.report.repeats,
        programs=programs,
    )
  finally:
    if programs is not None:
      programs.close()
  ds = ctx.dataset
  rows.append(
      pixel_baseline_row(
          ds.x_train[ctx.train_index],
          ds.y_train[ctx.train_index],
          ds.x_test,
          ds.y_test,
          num_classes=ds.num_classes,
          teacher_flops=flops.count_flops(teacher.config),
          teacher_test_logits=teacher.test_logits,
      )
  )
  by_name = {r.name: r.accuracy for r in rows}
  warnings = sanity.sanity_warnings(
      teacher_acc=by_name["teacher"],
      baseline_acc=by_name["pixel_baseline"],
      student_accs={r.name: r.accuracy for r in rows if r.kind in ("student", "prefix")},
      num_classes=ds.num_classes,
  )
  for line in warnings:
    logging.warning("sanity: %s", line)
  meta = {
      "dataset": ds.name,
      "mode": ctx.settings.mode,
      "seed": config.seed,
      "ladder_family": config.model.ladder,
      "num_train": int(len(ctx.train_index)),
      "num_heldout": int(len(ctx.val_index)),
      "num_test": int(ds.num_test),
      "decisions": _jsonable(decisions),
  }
  if warnings:
    meta["warnings"] = warnings
  # Each student's held-out accuracy alone: experiments/seeds.py picks a prefix's best member
  # by it (not by test accuracy).
  meta["heldout_accuracy"] = {
      m.name: accuracy(m.train_logits[ctx.val_index], ctx.val_labels) for m in students
  }
  combination = None
  if ctx.settings.mode == "ensemble" and students:
    # Post-hoc: held-out data only, then evaluated once on test (mamba_pkd.anytime).
    combination = anytime.fit_anytime(ctx, teacher, students)
    cascade_rows, meta["cascade"] = anytime.cascade_report(
        ctx,
        combination,
        teacher,
        students,
        latency=config.report.latency and ctx.is_writer,
        predictions=predictions,
    )
    rows = rows + cascade_rows
  write_config(ctx)
  if ctx.is_writer:
    stop = next((e["stop"] for e in reversed(decisions) if "stop" in e), "")
    write_run_manifest(ctx, teacher, students, baselines, rows, stop, combination)
    paths = report.write_report(ctx.workdir, rows, meta=meta)
    paths["predictions"] = report.write_predictions(ctx.workdir, ds.y_test, predictions)
    logging.info("report written: %s", ", ".join(str(p) for p in paths.values()))
  ctx.metrics.close()
  parallel.sync("report")
  print(report.format_table(rows), flush=True)
  print(f"total wall time {time.time() - t0:.0f}s", flush=True)
  return rows


def _jsonable(value):
  return json.loads(json.dumps(value, default=float))
