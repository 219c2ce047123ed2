"""A run's anytime stage: the combination fitted on held-out data, then its report on test.

Two steps, in this order, at the end of ``pkd.train_and_evaluate``:

1. :func:`fit_anytime` reads the held-out split only (``ctx.val_index`` rows
   of each model's ``train_logits`` and ``ctx.val_labels``): the per-prefix
   weights and temperatures (:mod:`mamba_pkd.combine`), the teacher's
   temperature, and one early-exit rule per budget of
   ``config.report.cascade_budgets_pct`` (:mod:`mamba_pkd.cascade`). It never
   touches the test split (tests/test_anytime.py checks it with a recording
   dataset).
2. :func:`cascade_report` evaluates that fixed combination once on test: the
   ``cascade@<budget>`` rows (FLOPs = measured mean FLOPs per image), and for
   ``results.json``'s meta the exit histograms, the bootstrap spread of each
   threshold, the ECE (15 bins) and NLL of every prefix before (the run's
   ``softmax(c_k F_k)``) and after, on held-out and test; and, with
   ``report.latency``, the cascade's wall-clock per image at batch 256.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mamba_pkd import cascade, combine, flops, report

DEFAULT_BUDGETS_PCT = (1.5, 2.0, 3.0, 5.0, 10.0)
DEFAULT_BOOTSTRAP = 200
LATENCY_BATCH = 256


def settings(config) -> dict:
  """``config.report``'s cascade fields (defaults where absent), validated."""
  r = config.get("report", {}) or {}
  budgets = tuple(float(b) for b in r.get("cascade_budgets_pct", DEFAULT_BUDGETS_PCT))
  if any(not b > 0 for b in budgets):
    raise ValueError(f"report.cascade_budgets_pct={budgets} must be positive percentages")
  teacher = r.get("cascade_teacher", "auto")
  if teacher not in cascade.TEACHER_CHOICES:
    raise ValueError(
        f"report.cascade_teacher={teacher!r} is not valid; choose one of {cascade.TEACHER_CHOICES}"
    )
  draws = r.get("cascade_bootstrap", DEFAULT_BOOTSTRAP)
  if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
    raise ValueError(f"report.cascade_bootstrap must be an int >= 0, got {draws!r}")
  return {"budgets_pct": budgets, "teacher": teacher, "bootstrap": draws}


def _flops(model) -> int:
  return flops.count_flops(model.config)


def cascade_stages(combination, teacher_logits, member_logits, stage_flops):
  """(``cascade.Stages`` of the members' calibrated prefixes, the same with the teacher as
  last stage or None), on one split: the stages the rules are chosen on and evaluated on."""
  students, with_teacher = cascade.stage_logits(combination, member_logits, teacher_logits)
  n = len(member_logits)
  return (
      cascade.Stages.from_logits(students, stage_flops[:n]),
      None if with_teacher is None else cascade.Stages.from_logits(with_teacher, stage_flops),
  )


def fit_anytime(ctx, teacher, students: Sequence) -> combine.Combination:
  """The combination and the exit rules of a run, from held-out data only.

  Args:
    ctx: the run's context (``val_index``, ``val_labels``, ``config``).
    teacher, students: trained models (``stages.Trained``: ``train_logits``
      cover every row of ``x_train``; weights folded; ``prefix_scale``).
  """
  opts = settings(ctx.config)
  val, labels = ctx.val_index, ctx.val_labels
  held = [m.train_logits[val] for m in students]
  teacher_held = teacher.train_logits[val]
  fits = combine.fit_prefixes(held, labels, [m.prefix_scale for m in students])
  combination = combine.Combination(fits, combine.fit_temperature(teacher_held, labels))
  teacher_flops = _flops(teacher)
  stage_flops = [_flops(m) for m in students] + [teacher_flops]
  plain, with_teacher = cascade_stages(combination, teacher_held, held, stage_flops)
  for budget in opts["budgets_pct"]:
    rule = cascade.choose_rule(
        plain, labels, budget, teacher_flops, with_teacher=with_teacher, teacher=opts["teacher"]
    )
    combination.cascades[cascade.budget_label(budget)] = None if rule is None else rule.to_json()
  return combination


def _before(students: Sequence, logits: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The run's own calibrated prefixes: ``c_k * (f_1 + ... + f_k)``."""
  total, out = 0.0, []
  for m, f in zip(students, logits):
    total = total + np.asarray(f, np.float64)
    out.append(m.prefix_scale * total)
  return out


def calibration_table(ctx, combination, students) -> list[dict]:
  """Per prefix: weights, temperature, held-out/test NLL and ECE before and after."""
  splits = {
      "heldout": ([m.train_logits[ctx.val_index] for m in students], ctx.val_labels),
      "test": ([m.test_logits for m in students], ctx.dataset.y_test),
  }
  table = []
  for k, fit in enumerate(combination.prefixes, start=1):
    entry: dict[str, Any] = {
        "k": k,
        "weights": list(fit.weights),
        "temperature": fit.temperature,
        "source": fit.source,
    }
    for split, (logits, labels) in splits.items():
      before = _before(students, logits)[k - 1]
      after = fit.logits(logits)
      entry[split] = {
          "nll_before": combine.nll(before, labels),
          "nll_after": combine.nll(after, labels),
          "ece_before": combine.ece(before, labels),
          "ece_after": combine.ece(after, labels),
          "accuracy_before": float(np.mean(before.argmax(-1) == labels)),
          "accuracy_after": float(np.mean(after.argmax(-1) == labels)),
      }
    table.append(entry)
  return table


def cascade_latency_ms(ctx, combination, rule, teacher, students) -> float:
  """Median per-image ms of :func:`cascade.cascade_predict` on a batch of 256 test images."""
  import jax  # pylint: disable=g-import-not-at-top
  from mamba_pkd import runs  # pylint: disable=g-import-not-at-top
  from mamba_pkd.preprocessing import Preprocessing  # pylint: disable=g-import-not-at-top

  ds = ctx.dataset
  prep = Preprocessing(ds.image_shape, ds.num_classes, ds.mean, ds.std)
  members = runs.InProcessEnsemble(
      [m.as_member() for m in students], preprocessing=prep, teacher_flops=_flops(teacher)
  )
  teacher_model = runs.InProcessEnsemble(
      [teacher.as_member()], preprocessing=prep, teacher_flops=_flops(teacher)
  )
  reps = -(-LATENCY_BATCH // ds.num_test)
  x = prep.normalize(np.concatenate([ds.x_test] * reps)[:LATENCY_BATCH])

  def run(x):
    result = cascade.cascade_predict(
        members,
        x,
        combination,
        rule,
        teacher=lambda xs: teacher_model.logits(xs, normalized=True),
    )
    return jax.numpy.asarray(result.logits)

  repeats = max(3, int(ctx.config.report.get("repeats", 10)) // 5)
  return report.compute_latency_ms(run, x, repeats=repeats, warmup=1) / LATENCY_BATCH


def cascade_report(
    ctx,
    combination: combine.Combination,
    teacher,
    students: Sequence,
    *,
    latency: bool = False,
    predictions: dict | None = None,
) -> tuple[list[report.Row], dict]:
  """Evaluates the fixed rules once on test: ``cascade@<budget>`` rows and their meta.

  ``predictions``, when given, receives each cascade row's predicted class per test image
  (int [N], by row name), as ``evaluate.build_rows`` does for the other rows.
  """
  opts = settings(ctx.config)
  labels, teacher_flops = ctx.dataset.y_test, _flops(teacher)
  stage_flops = [_flops(m) for m in students] + [teacher_flops]
  test_logits = [m.test_logits for m in students]
  test_plain, test_teacher = cascade_stages(
      combination, teacher.test_logits, test_logits, stage_flops
  )
  val = ctx.val_index
  held = [m.train_logits[val] for m in students]
  held_plain, held_teacher = cascade_stages(
      combination, teacher.train_logits[val], held, stage_flops
  )
  teacher_pred = teacher.test_logits.argmax(-1)
  student_params = sum(flops.count_params(m.config) for m in students)
  sizes = "+".join(m.size for m in students)
  rows, meta = [], {}
  for label, rule in combination.cascades.items():
    if rule is None:
      meta[label] = {"feasible": False, "why": "exiting every held-out image at stage 1 costs more"}
      continue
    rule = cascade.CascadeRule.from_json(rule)
    stages = test_teacher if rule.teacher_exit else test_plain
    out = stages.outcome(rule.threshold, labels)
    mean_flops = int(round(out["mean_flops"]))
    ms = cascade_latency_ms(ctx, combination, rule, teacher, students) if latency else None
    if predictions is not None:
      predictions[f"cascade@{label}"] = out["prediction"]
    rows.append(
        report.Row(
            name=f"cascade@{label}",
            kind="cascade",
            size=sizes + ("+teacher" if rule.teacher_exit else ""),
            params=student_params
            + (flops.count_params(teacher.config) if rule.teacher_exit else 0),
            flops=mean_flops,
            pct_teacher_flops=100.0 * mean_flops / teacher_flops,
            accuracy=out["accuracy"],
            agreement=float(np.mean(out["prediction"] == teacher_pred)),
            latency_ms_b256=ms,
        )
    )
    meta[label] = {
        "feasible": True,
        **rule.to_json(),
        "test_accuracy": out["accuracy"],
        "test_pct_teacher_flops": 100.0 * out["mean_flops"] / teacher_flops,
        "test_exits": out["exits"],
        "stages": [m.name for m in students] + (["teacher"] if rule.teacher_exit else []),
    }
    if opts["bootstrap"]:
      meta[label]["bootstrap"] = cascade.bootstrap_rule(
          held_plain,
          ctx.val_labels,
          rule.budget_pct,
          teacher_flops,
          with_teacher=held_teacher,
          teacher=opts["teacher"],
          test=(test_plain, test_teacher, labels),
          draws=opts["bootstrap"],
          seed=int(ctx.config.seed),
      )
  return rows, {
      "budgets": meta,
      "teacher_temperature": combination.teacher_temperature,
      "teacher_exit": opts["teacher"],
      "prefixes": calibration_table(ctx, combination, students),
  }
