"""Early exit as a first-class result: the cascade rule, its thresholds per budget, its runtime.

The cascade runs the stages 1..S in order (the members' calibrated prefixes
``G_1..G_n`` of :mod:`mamba_pkd.combine`, optionally the teacher as stage
n+1). Image i leaves at the first stage s whose calibrated confidence
``max softmax(G_s(x_i))`` is at least one shared threshold ``t`` (the last
stage always answers); it is charged the cumulative FLOPs of stages 1..s
(:func:`mamba_pkd.ensemble.exit_flops`), and member j runs only on the images
still unsure after member j-1.

Choosing ``t`` for a budget (:func:`choose_rule`), on held-out data only:
every distinct held-out confidence is a candidate; the rule is the most
accurate candidate whose held-out mean FLOPs is within the budget (ties: the
larger threshold, i.e. more compute). With ``teacher="auto"`` the candidates
with and without the teacher as last exit compete on the same terms (ties:
without). :func:`bootstrap_rule` redraws the held-out set to show how stable
that choice is. :func:`cascade_predict` runs a rule on an
:class:`mamba_pkd.ensemble.Ensemble` (NumPy + the ensemble's runtime only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from mamba_pkd import combine
from mamba_pkd.ensemble import AnytimeResult, BudgetError, Ensemble, exit_flops, parse_flops

NEVER = 2.0  # a threshold above every probability: no early exit
TEACHER_CHOICES = ("auto", "on", "off")


def budget_label(pct: float) -> str:
  """``2.0 -> "2%"``, ``1.5 -> "1.5%"`` (the key of a rule in the manifest)."""
  return f"{float(pct):g}%"


@dataclasses.dataclass(frozen=True)
class Stages:
  """The stages of a cascade on one set of images (held-out or test).

  Attributes:
    confidence: float [S, N], ``max softmax(G_s)`` per stage and image.
    prediction: int [S, N], ``argmax G_s``.
    cumulative_flops: float [S], FLOPs of stages 1..s together.
  """

  confidence: np.ndarray
  prediction: np.ndarray
  cumulative_flops: np.ndarray

  @classmethod
  def from_logits(cls, stage_logits: Sequence[np.ndarray], stage_flops: Sequence[int]) -> "Stages":
    return cls(
        confidence=np.stack([combine.max_probability(g) for g in stage_logits]),
        prediction=np.stack([np.argmax(g, -1) for g in stage_logits]),
        cumulative_flops=np.cumsum(np.asarray(stage_flops, np.float64)),
    )

  def exits(self, threshold: float) -> np.ndarray:
    """0-based exit stage per image: the first s with confidence >= threshold (else the last)."""
    sure = self.confidence >= threshold
    sure[-1] = True
    return np.argmax(sure, axis=0)

  def outcome(self, threshold: float, labels: np.ndarray) -> dict:
    """Accuracy, mean FLOPs, and exit counts per stage of one threshold."""
    s = self.exits(threshold)
    n = len(s)
    pred = self.prediction[s, np.arange(n)]
    return {
        "accuracy": float(np.mean(pred == labels)),
        "mean_flops": float(self.cumulative_flops[s].mean()),
        "exits": np.bincount(s, minlength=len(self.cumulative_flops)).tolist(),
        "prediction": pred,
    }


def sweep(stages: Stages, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every candidate threshold with, per image, correctness and cost.

  Returns:
    ``(thresholds [T], correct bool [T, N], flops [T, N])`` with the
    candidates sorted ascending: the distinct confidences of stages 1..S-1
    and :data:`NEVER`. Mean FLOPs grow with the threshold.
  """
  thresholds = np.unique(np.append(stages.confidence[:-1].ravel(), NEVER))
  sure = stages.confidence[None] >= thresholds[:, None, None]  # [T, S, N]
  sure[:, -1] = True
  exit_stage = np.argmax(sure, axis=1)  # [T, N]
  n = stages.confidence.shape[1]
  correct = stages.prediction[exit_stage, np.arange(n)[None]] == np.asarray(labels)[None]
  return thresholds, correct, stages.cumulative_flops[exit_stage]


@dataclasses.dataclass(frozen=True)
class CascadeRule:
  """The exit rule of one budget (stored in the manifest as a dict)."""

  budget_pct: float
  threshold: float
  teacher_exit: bool
  heldout_accuracy: float
  heldout_pct_teacher_flops: float

  def to_json(self) -> dict:
    return {k: (bool(v) if k == "teacher_exit" else float(v)) for k, v in self.__dict__.items()}

  @classmethod
  def from_json(cls, d: dict) -> "CascadeRule":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def _candidates(variants, labels, weights=None):
  """(accuracy, mean FLOPs, threshold, teacher flag) arrays over every variant's sweep."""
  rows = []
  for teacher_exit, swept in variants:
    thresholds, correct, flops = swept
    if weights is None:
      acc, cost = correct.mean(1), flops.mean(1)
    else:  # bootstrap: per-image multiplicities [B, N]
      acc, cost = weights @ correct.T / len(labels), weights @ flops.T / len(labels)
    rows.append((acc, cost, np.broadcast_to(thresholds, np.shape(acc)), teacher_exit))
  return rows


def _pick(rows, budget_flops: float) -> tuple[int, float, float, float] | None:
  """(variant, threshold, accuracy, mean FLOPs) of the best accuracy within budget (1-D rows)."""
  best = None
  for v, (acc, cost, thresholds, teacher_exit) in enumerate(rows):
    ok = np.nonzero(cost <= budget_flops * (1 + 1e-9))[0]
    if len(ok) == 0:
      continue
    # Most accurate; ties: the larger threshold (more compute within the budget).
    i = ok[np.lexsort((thresholds[ok], acc[ok]))[-1]]
    key = (acc[i], -int(teacher_exit), thresholds[i])
    if best is None or key > best[0]:
      best = (key, v, float(thresholds[i]), float(acc[i]), float(cost[i]))
  return None if best is None else best[1:]


def _variants(students: Stages, with_teacher: Stages | None, labels, teacher: str):
  out = []
  if teacher in ("auto", "off") or with_teacher is None:
    out.append((False, sweep(students, labels)))
  if teacher in ("auto", "on") and with_teacher is not None:
    out.append((True, sweep(with_teacher, labels)))
  return out


def choose_rule(
    students: Stages,
    labels: np.ndarray,
    budget_pct: float,
    teacher_flops: int,
    *,
    with_teacher: Stages | None = None,
    teacher: str = "auto",
) -> CascadeRule | None:
  """The held-out rule for one budget (None: even exiting everything at stage 1 costs more).

  Args:
    students: the held-out stages without the teacher.
    labels: held-out labels.
    budget_pct: target mean FLOPs, percent of the teacher's.
    teacher_flops: the teacher's FLOPs per image.
    with_teacher: the same stages plus the teacher as the last exit.
    teacher: ``"auto"`` (both compete), ``"on"`` or ``"off"``.
  """
  variants = _variants(students, with_teacher, labels, teacher)
  picked = _pick(_candidates(variants, labels), budget_pct / 100.0 * teacher_flops)
  if picked is None:
    return None
  v, threshold, acc, cost = picked
  return CascadeRule(budget_pct, threshold, variants[v][0], acc, 100.0 * cost / teacher_flops)


def bootstrap_rule(
    students: Stages,
    labels: np.ndarray,
    budget_pct: float,
    teacher_flops: int,
    *,
    with_teacher: Stages | None = None,
    teacher: str = "auto",
    test: tuple[Stages, Stages | None, np.ndarray] | None = None,
    draws: int = 200,
    seed: int = 0,
) -> dict:
  """Spread of the chosen threshold over ``draws`` bootstrap redraws of the held-out set.

  With ``test = (students, with_teacher, labels)`` each redraw's rule is also
  evaluated on the test split (the spread of its test accuracy and FLOPs).
  Returns 5th/50th/95th percentiles and the fraction of redraws that used the teacher.
  """
  variants = _variants(students, with_teacher, labels, teacher)
  n = len(labels)
  rng = np.random.default_rng(seed)
  weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)])
  rows = _candidates(variants, labels, weights)
  picks = []
  for b in range(draws):
    one = [(acc[b], cost[b], thr[b], t) for acc, cost, thr, t in rows]
    picked = _pick(one, budget_pct / 100.0 * teacher_flops)
    if picked is not None:
      picks.append((variants[picked[0]][0], picked[1]))
  q = lambda x: [float(v) for v in np.percentile(x, [5, 50, 95])] if len(x) else None  # noqa
  out = {
      "draws": draws,
      "feasible": len(picks),
      "threshold_p5_p50_p95": q([p[1] for p in picks]),
      "teacher_exit_fraction": float(np.mean([p[0] for p in picks])) if picks else None,
  }
  if test is not None and picks:
    test_students, test_teacher, test_labels = test
    results = [(test_teacher if t else test_students).outcome(thr, test_labels) for t, thr in picks]
    out["test_accuracy_p5_p50_p95"] = q([r["accuracy"] for r in results])
    out["test_pct_teacher_flops_p5_p50_p95"] = q(
        [100.0 * r["mean_flops"] / teacher_flops for r in results]
    )
  return out


def rule_for_budget(
    combination: combine.Combination | None, budget_pct: float, *, asked: str = ""
) -> dict:
  """The stored rule of the largest stored budget <= ``budget_pct``.

  Raises:
    BudgetError: no combination, or every stored rule is over the budget (the
      stored ones are named).
  """
  if combination is None:
    raise BudgetError(
        "this model stores no early-exit cascade (a run's workdir or an export of all its "
        "students, written by this version, has one); use --max_flops instead"
    )
  rules = sorted(
      (r for r in combination.cascades.values() if r is not None), key=lambda r: r["budget_pct"]
  )
  fits = [r for r in rules if r["budget_pct"] <= budget_pct * (1 + 1e-9)]
  if not fits:
    stored = ", ".join(budget_label(r["budget_pct"]) for r in rules) or "none"
    raise BudgetError(
        f"no stored cascade fits {asked or budget_label(budget_pct)} ({budget_pct:.3g}% of the "
        f"teacher's FLOPs); stored: {stored}"
    )
  return fits[-1]


def rule_for_budget_text(
    combination: combine.Combination | None, budget: str, teacher_flops: int
) -> dict:
  """:func:`rule_for_budget` of ``"2%"`` (of the teacher's FLOPs) or FLOPs per image (``"60k"``)."""
  absolute, pct = parse_flops(budget)
  pct = pct if pct is not None else 100.0 * absolute / teacher_flops
  return rule_for_budget(combination, pct, asked=f"--budget={budget}")


def cascade_predict(
    ensemble: Ensemble,
    x: np.ndarray,
    combination: combine.Combination,
    rule: CascadeRule | dict,
    *,
    teacher: Callable[[np.ndarray], np.ndarray] | None = None,
) -> AnytimeResult:
  """Runs the cascade of ``rule`` on normalised inputs ``x`` [N, H, W, C].

  Member j runs only on the images still unsure after members 1..j-1 (its
  inputs gathered, its logits scattered back); the teacher (``teacher(x) ->
  logits``, needed when ``rule.teacher_exit``) only on those unsure after all
  members. ``members_used`` counts the teacher as stage n+1 and ``flops`` is
  each image's cumulative cost at its exit.
  """
  rule = rule if isinstance(rule, CascadeRule) else CascadeRule.from_json(rule)
  n_members = ensemble.num_members
  if len(combination.prefixes) != n_members:
    raise ValueError(
        f"the combination has {len(combination.prefixes)} prefixes but the ensemble "
        f"{n_members} members: the cascade needs every member of the run"
    )
  if rule.teacher_exit and (teacher is None or combination.teacher_temperature is None):
    raise ValueError(
        f"the cascade for {budget_label(rule.budget_pct)} ends at the teacher; load the "
        "teacher (a run's workdir) or choose a budget whose rule does not use it"
    )
  n, num_classes = len(x), ensemble.preprocessing.num_classes
  member_logits = np.zeros((n_members, n, num_classes), np.float32)
  logits = np.zeros((n, num_classes), np.float32)
  used = np.zeros(n, np.int32)
  active, prev_all = np.arange(n), None
  for j in range(n_members):
    if len(active) == 0:
      break
    connected = prev_all is not None and ensemble.members[j].connect_dim
    out, feats = ensemble.member_forward(j, x[active], prev_all[active] if connected else None)
    member_logits[j, active] = out
    prev_all = np.zeros((n, feats.shape[1]), np.float32)
    prev_all[active] = feats
    g = combination.prefix_logits(list(member_logits[: j + 1, active]), j + 1)
    logits[active] = g
    used[active] = j + 1
    if j < n_members - 1 or rule.teacher_exit:
      active = active[combine.max_probability(g) < rule.threshold]
  if rule.teacher_exit and len(active):
    logits[active] = np.asarray(teacher(x[active]), np.float64) / combination.teacher_temperature
    used[active] = n_members + 1
  stage_flops = [m.flops for m in ensemble.members] + [ensemble.teacher_flops]
  return AnytimeResult(
      logits=logits,
      classes=logits.argmax(-1).astype(np.int32),
      margins=combine.max_probability(logits).astype(np.float32),
      members_used=used,
      flops=exit_flops(used, stage_flops),
  )


def stage_logits(
    combination: combine.Combination,
    member_logits: Sequence[np.ndarray],
    teacher_logits: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
  """The calibrated stage logits without and with the teacher as last exit."""
  students = [combination.prefix_logits(member_logits, k) for k in range(1, len(member_logits) + 1)]
  if teacher_logits is None or combination.teacher_temperature is None:
    return students, None
  return students, students + [
      np.asarray(teacher_logits, np.float64) / combination.teacher_temperature
  ]


def describe(rule: CascadeRule | dict[str, Any]) -> str:
  rule = rule if isinstance(rule, CascadeRule) else CascadeRule.from_json(rule)
  return (
      f"cascade@{budget_label(rule.budget_pct)}: exit at calibrated max-probability >= "
      f"{rule.threshold:.4g}{', teacher last' if rule.teacher_exit else ''}; held-out "
      f"accuracy {100 * rule.heldout_accuracy:.2f}% at {rule.heldout_pct_teacher_flops:.2f}% "
      "of the teacher's FLOPs"
  )
