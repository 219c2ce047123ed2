"""The weak-learner test of PKD: pure functions of held-out logits.

A trained candidate ``f_k`` joins the ensemble ``F_{k-1}`` when it improves
the held-out fit to the teacher (``accept="fit"``: by at least ``pkd.margin``
plus ``pkd.margin_se`` standard errors of the paired per-row drop,
:func:`fit_drop_se`; a searched weight of 0 is a rejection) or has a large enough
B-DISTIL edge (``accept="edge"``) without costing held-out accuracy. With
``pkd.target="teacher"`` its weight ``eta_k`` comes from a line search
(:func:`line_search`) on fits taken at the best overall logit scale
(:func:`calibrated_fit`). Everything here takes NumPy arrays ([N, K] logits)
and returns numbers: no state, no files. :func:`focus_weights` gives the
per-example loss weights of cascade-aware training (``pkd.cascade_focus``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mamba_pkd import combine, losses
from mamba_pkd.combine import accuracy  # one owner: combine
from mamba_pkd.settings import PKDSettings


def teacher_fit(
    teacher_logits: np.ndarray, ensemble_logits: np.ndarray, temperature: float
) -> float:
  """Held-out ``T^2 * KL(softmax(g/T) || softmax(F/T))`` (lower = closer to the teacher)."""
  return float(
      losses.soft_kl(jnp.asarray(ensemble_logits), jnp.asarray(teacher_logits), temperature)
  )


# Grids of the line search (numpy, on held-out logits). Both contain 1 exactly.
FIT_SCALES = np.geomspace(0.01, 10.0, 61)  # overall scale c of F
WEIGHTS = np.concatenate([[0.0], np.geomspace(1 / 16, 16, 41)])  # eta_k of the new student


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def calibrated_fit(
    teacher_logits: np.ndarray,
    ensemble_logits: np.ndarray,
    temperature: float,
    scales: np.ndarray = FIT_SCALES,
) -> tuple[float, float]:
  """``min_c T^2 KL(softmax(g/T) || softmax(c F/T))`` over ``scales``, and the best ``c``.

  The fit of an ensemble up to the overall scale of its logits (argmax, hence
  accuracy, does not depend on that scale). ``teacher_logits`` and
  ``ensemble_logits`` are [N, K].
  """
  t = float(temperature)
  log_p = _log_softmax(np.asarray(teacher_logits, np.float64) / t)  # [N, K]
  f = np.asarray(ensemble_logits, np.float64)
  kl = np.array([np.mean(_row_kl(log_p, f, t, c)) for c in scales]) * t * t  # [S]
  best = int(np.argmin(kl))
  return float(kl[best]), float(scales[best])


def _row_kl(log_p: np.ndarray, f: np.ndarray, t: float, c: float) -> np.ndarray:
  """Each row's ``KL(p || softmax(c f/T))`` [N] (no ``T^2``), ``log_p`` the teacher's log-probs."""
  return np.sum(np.exp(log_p) * (log_p - _log_softmax(c * f / t)), -1)


def per_example_fit(
    teacher_logits: np.ndarray, logits: np.ndarray, temperature: float, scale: float = 1.0
) -> np.ndarray:
  """Each row's ``T^2 KL(softmax(g/T) || softmax(c F/T))`` [N], float64.

  Their mean is :func:`teacher_fit` (``scale = 1``) or, at the best ``c``, the value
  :func:`calibrated_fit` returns.
  """
  t = float(temperature)
  log_p = _log_softmax(np.asarray(teacher_logits, np.float64) / t)
  return _row_kl(log_p, np.asarray(logits, np.float64), t, float(scale)) * t * t


def fit_drop_se(per_row_before: np.ndarray, per_row_after: np.ndarray) -> float:
  """Standard error of the held-out fit's drop: ``std(before_i - after_i) / sqrt(N)``.

  The fit is a mean over held-out rows, and the rows are the same before and
  after, so the drop's noise is that of a paired mean: the unit in which
  ``pkd.margin_se`` states the drop a weak learner must achieve.
  """
  d = np.asarray(per_row_before, np.float64) - np.asarray(per_row_after, np.float64)
  if d.size < 2:
    return 0.0
  return float(np.std(d, ddof=1) / np.sqrt(d.size))


def line_search(
    teacher_logits: np.ndarray,
    prefix_logits: np.ndarray,
    candidate_logits: np.ndarray,
    temperature: float,
    weights: np.ndarray = WEIGHTS,
) -> tuple[float, float, float]:
  """The weight ``eta`` of a new student: ``argmin_eta calibrated_fit(g, F + eta f)``.

  Returns:
    ``(eta, c, fit)``: the best weight in ``weights`` (0 when no weight
    improves the fit), the overall scale and the fit it reaches.
  """
  best = None
  for eta in weights:
    fit, c = calibrated_fit(teacher_logits, prefix_logits + eta * candidate_logits, temperature)
    if best is None or fit < best[2]:
      best = (float(eta), c, fit)
  return best


@dataclasses.dataclass(frozen=True)
class Decision:
  """The weak-learner test of one candidate, on held-out data.

  ``weight`` is the candidate's ensemble weight ``eta_k`` (1 for
  ``target="residual"`` and for the first student) and ``scale`` the overall
  scale ``c`` of the logits at which ``fit_after`` is measured (1 when the fit
  is not calibrated).
  """

  accepted: bool
  reason: str
  fit_before: float
  fit_after: float
  edge: float
  accuracy_before: float
  accuracy_after: float
  weight: float = 1.0
  scale: float = 1.0
  fit_drop_se: float = 0.0


def weak_learner_decision(
    *,
    teacher: np.ndarray,
    prefix: np.ndarray | None,
    candidate: np.ndarray,
    labels: np.ndarray,
    settings: PKDSettings,
) -> Decision:
  """Accepts or rejects a candidate f_k given held-out logits ([N, K] each).

  ``prefix`` is F_{k-1} (None for the first student, i.e. all-zero logits).
  With ``settings.target == "teacher"`` the candidate enters the ensemble as
  ``F_{k-1} + eta f_k`` with ``eta`` from :func:`line_search` (the first
  student with ``eta = 1``) and fits are calibrated (:func:`calibrated_fit`);
  with ``"residual"`` as ``F_{k-1} + f_k`` with plain fits (:func:`teacher_fit`).
  """
  before = np.zeros_like(candidate) if prefix is None else prefix
  weight, scale, scale_before = 1.0, 1.0, 1.0
  if settings.target == "teacher":
    fit_before, scale_before = calibrated_fit(teacher, before, settings.temperature)
    if prefix is None:
      fit_after, scale = calibrated_fit(teacher, candidate, settings.temperature)
    else:
      weight, scale, fit_after = line_search(teacher, before, candidate, settings.temperature)
  else:
    fit_before = teacher_fit(teacher, before, settings.temperature)
    fit_after = teacher_fit(teacher, before + candidate, settings.temperature)
  after = before + weight * candidate
  drop_se = fit_drop_se(
      per_example_fit(teacher, before, settings.temperature, scale_before),
      per_example_fit(teacher, after, settings.temperature, scale),
  )
  k_plus, k_minus = losses.adversary_weights(jnp.asarray(teacher), jnp.asarray(before))
  edge = float(losses.weak_learner_edge(jnp.asarray(weight * candidate), k_plus, k_minus))
  acc_before = accuracy(before, labels) if prefix is not None else 0.0
  acc_after = accuracy(after, labels)
  searched = settings.target == "teacher" and prefix is not None  # eta came from line_search
  at_weight = f" at weight {weight:.3g}" if searched else ""
  if settings.accept == "fit":
    needed = settings.margin + settings.margin_se * drop_se
    improves = fit_after <= fit_before - needed
    why = (
        f"held-out fit to teacher{' (calibrated)' if searched else ''} {fit_before:.4f} -> "
        f"{fit_after:.4f}{at_weight}, a drop of {_in_se(fit_before - fit_after, drop_se)} "
        f"(needs at least {settings.margin:g} + {settings.margin_se:g} standard errors "
        f"= {needed:.4f})"
    )
  else:
    improves = edge >= settings.gamma
    why = f"edge {edge:.4f} (needs >= {settings.gamma}){at_weight}"
  improves = improves and weight > 0  # a searched weight of 0 leaves the ensemble as it was
  keeps_accuracy = acc_after >= acc_before - settings.max_accuracy_drop
  if not keeps_accuracy:
    why += (
        f"; held-out accuracy {acc_before:.4f} -> {acc_after:.4f} falls more than "
        f"{settings.max_accuracy_drop}"
    )
  return Decision(
      accepted=bool(improves and keeps_accuracy),
      reason=why,
      fit_before=fit_before,
      fit_after=fit_after,
      edge=edge,
      accuracy_before=acc_before,
      accuracy_after=acc_after,
      weight=weight,
      scale=scale,
      fit_drop_se=drop_se,
  )


def focus_weights(prefix: np.ndarray, temperature: float, focus: float) -> np.ndarray:
  """Per-example loss weights of the next student: ``(1 - focus) + focus * u / mean(u)``.

  ``u = 1 - c``, ``c`` the prefix's top-1 probability at ``temperature`` (fitted on
  held-out labels): roughly the chance that an early-exit cascade passes the example
  on to the next member. ``focus`` is the share of the loss's mass moved from the
  uniform distribution to the examples in proportion to ``u``: 0 is uniform, 1 weights
  by ``u`` alone. The weights have mean 1 (the losses normalise by their sum anyway).

  Args:
    prefix: [R, K] logits of ``F_{k-1}`` on the rows the student trains on.
    temperature: > 0.
    focus: in [0, 1].

  Returns:
    float32 [R], mean 1.
  """
  if not 0.0 <= focus <= 1.0:
    raise ValueError(f"focus must be in [0, 1], got {focus}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  unsure = 1.0 - combine.max_probability(np.asarray(prefix, np.float64) / temperature)
  if not unsure.mean() > 0:  # every row certain: nothing to emphasise
    return np.ones(len(unsure), np.float32)
  return ((1.0 - focus) + focus * unsure / unsure.mean()).astype(np.float32)


def _in_se(drop: float, se: float) -> str:
  """``"0.1234 (5.6 standard errors)"``."""
  return f"{drop:.4f} ({drop / se:.1f} standard errors)" if se > 0 else f"{drop:.4f}"
