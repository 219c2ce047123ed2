"""Post-hoc combination of a run's members: per-prefix weights and temperatures (held-out fit).

Training leaves member ``j`` with logits ``f_j`` (its ensemble weight ``eta_j``
folded in, :mod:`mamba_pkd.ensemble`), and prefix ``k`` is the plain sum
``F_k = f_1 + ... + f_k``. This module refits, for every prefix ``k`` on its
own, ``k`` member weights and a temperature::

    G_k(x) = (w_k1 f_1(x) + ... + w_kk f_k(x)) / T_k,    p_k = softmax(G_k)

by minimising the negative log-likelihood (NLL) of the held-out labels with a
continuous optimiser (L-BFGS-B on ``log(w_kj / T_k)``, started at the run's
weights and calibration scale; no grid). The weights are stored normalised
(``sum_j w_kj = k``, so all ones is the run's plain sum) and ``T_k`` carries
the overall scale. On held-out data prefix ``k`` is never less accurate than
prefix ``k - 1`` (its weights padded with a 0 for the new member) nor than any of
its members alone, and among the combinations that keep that accuracy it has the
lowest NLL found: the fit itself, the previous prefix, a member alone (with its own
temperature) or a point between the fit and one of those (``PrefixFit.source``
says which).

What lives here (NumPy; SciPy is imported inside :func:`fit_scales` only, so
loading an export needs neither): :func:`nll`, :func:`ece`,
:func:`fit_scales`, :func:`fit_prefixes`, :class:`PrefixFit` and
:class:`Combination` (what the run manifest and an export sidecar store, with
the cascade rules of :mod:`mamba_pkd.cascade`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

ECE_BINS = 15
_LOG_SCALE_BOUNDS = (np.log(1e-6), np.log(1e4))  # of w / T


def log_softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-likelihood of ``labels`` under ``softmax(logits)`` ([N, K], [N])."""
  lp = log_softmax(logits)
  return float(-np.mean(lp[np.arange(len(labels)), np.asarray(labels)]))


def max_probability(logits: np.ndarray) -> np.ndarray:
  """The top-1 softmax probability per row: [N, K] -> [N] (the exit rule's confidence)."""
  return np.exp(log_softmax(logits).max(axis=-1))


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
  """Expected calibration error: ``sum_b n_b / N * |accuracy_b - confidence_b|``.

  ``bins`` equal-width bins of the top-1 probability on [0, 1] (the first bin
  closed at 0, each bin ``(lo, hi]``).
  """
  conf = max_probability(logits)
  correct = np.argmax(logits, -1) == np.asarray(labels)
  which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
  total = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
  return float(total / max(len(conf), 1))


def combined(member_logits: Sequence[np.ndarray], scales: Sequence[float]) -> np.ndarray:
  """``sum_j scales[j] * member_logits[j]`` ([N, K] each; float64)."""
  out = np.zeros(np.shape(member_logits[0]), np.float64)
  for s, f in zip(scales, member_logits):
    if s:
      out += float(s) * np.asarray(f, np.float64)
  return out


def fit_scales(
    member_logits: Sequence[np.ndarray],
    labels: np.ndarray,
    init: Sequence[float],
    *,
    max_iterations: int = 500,
) -> tuple[np.ndarray, float]:
  """``argmin_v NLL(softmax(sum_j v_j f_j))`` over ``v > 0`` (L-BFGS-B on ``log v``).

  Args:
    member_logits: k arrays [N, K].
    labels: int [N].
    init: the k starting values (> 0).
    max_iterations: L-BFGS-B iteration cap.

  Returns:
    ``(v, nll)``; ``v`` is never worse than ``init`` (the start is kept if the
    optimiser ends higher).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top  (fitting only)

  f = np.stack([np.asarray(m, np.float64) for m in member_logits])  # [k, N, K]
  labels = np.asarray(labels)
  n = len(labels)
  onehot = np.eye(f.shape[-1])[labels]

  def loss_and_grad(u):
    v = np.exp(u)
    z = np.einsum("j,jnc->nc", v, f)
    lp = log_softmax(z)
    loss = -np.mean(lp[np.arange(n), labels])
    g = np.exp(lp) - onehot  # dL/dz * N
    grad_v = np.einsum("jnc,nc->j", f, g) / n
    return loss, grad_v * v

  u0 = np.log(np.clip(np.asarray(init, np.float64), 1e-6, 1e4))
  result = optimize.minimize(
      loss_and_grad,
      u0,
      jac=True,
      method="L-BFGS-B",
      bounds=[_LOG_SCALE_BOUNDS] * len(u0),
      # Tight tolerances: the optimum, not where the optimiser happened to stop, so that
      # runs whose logits differ by float rounding (1 vs 2 devices) store the same fit.
      options={"maxiter": max_iterations, "ftol": 1e-14, "gtol": 1e-10},
  )
  start = loss_and_grad(u0)[0]
  if not np.isfinite(result.fun) or result.fun > start:
    return np.exp(u0), float(start)
  return np.exp(result.x), float(result.fun)


@dataclasses.dataclass(frozen=True)
class PrefixFit:
  """The combination of prefix k.

  Attributes:
    weights: ``w_k1..w_kk`` relative to the folded members (sum k; 0: unused).
    temperature: ``T_k``; the calibrated logits are ``sum_j w_kj f_j / T_k``.
    source: ``"fit"``, ``"previous"`` (prefix k-1 padded with 0),
      ``"member_<j>"`` (member j alone) or ``"fit-><one of those>@<t>"`` (a fraction
      t of the way from the fit to it): the lowest held-out NLL among those that
      keep the held-out accuracy floor (:func:`fit_prefixes`).
    heldout_nll: held-out NLL at these weights.
  """

  weights: tuple[float, ...]
  temperature: float
  source: str = "fit"
  heldout_nll: float | None = None

  @property
  def scales(self) -> np.ndarray:
    """``w_kj / T_k``, the factors of each member's logits."""
    return np.asarray(self.weights, np.float64) / self.temperature

  @classmethod
  def from_scales(cls, v: Sequence[float], source: str, heldout_nll: float) -> "PrefixFit":
    v = np.asarray(v, np.float64)
    temperature = len(v) / float(v.sum())
    return cls(tuple(float(x) for x in v * temperature), float(temperature), source, heldout_nll)

  def logits(self, member_logits: Sequence[np.ndarray]) -> np.ndarray:
    """The calibrated logits ``G_k`` of the first k of ``member_logits``."""
    return combined(member_logits[: len(self.weights)], self.scales)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows whose argmax equals the label (the project's one accuracy)."""
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


SEGMENT_POINTS = 20  # points tried on each segment from the NLL fit toward a safe candidate


def fit_prefixes(
    member_logits: Sequence[np.ndarray],
    labels: np.ndarray,
    init_scales: Sequence[float] | None = None,
) -> list[PrefixFit]:
  """Per-prefix weights and temperatures on held-out logits, each prefix never worse.

  Prefix k's candidates: the NLL fit (:func:`fit_scales`), the previous prefix
  (padded with a 0), and each member j <= k alone at its best temperature. Its
  held-out accuracy must be at least the previous prefix's and every such member's
  (the accuracy floor); when the fit falls below, points on the segment from the fit
  toward each candidate that keeps the floor are tried too (``SEGMENT_POINTS`` each).
  Of those that keep the floor, the one with the lowest held-out NLL wins.

  Args:
    member_logits: the n members' held-out logits [N, K] (weights folded).
    labels: the held-out labels [N].
    init_scales: per prefix, the run's calibration scale ``c_k`` (the fit
      starts at ``v = c_k * ones(k)``, the run's ``softmax(c_k F_k)``); default 1.

  Returns:
    n :class:`PrefixFit` s: on held-out data prefix k's accuracy is at least prefix
    k-1's and each of its members', and its NLL at most that of every candidate that
    keeps that accuracy (so at most prefix k-1's whenever k-1 keeps it).
  """
  n = len(member_logits)
  init_scales = list(init_scales) if init_scales is not None else [1.0] * n
  singles = [fit_scales([m], labels, [init_scales[0]]) for m in member_logits]  # (v, nll)
  single_acc = [accuracy(m, labels) for m in member_logits]
  fits: list[PrefixFit] = []
  prev_acc = 0.0
  for k in range(1, n + 1):
    members = member_logits[:k]
    v, loss = fit_scales(members, labels, [init_scales[k - 1]] * k)
    candidates = [(loss, "fit", v)]
    if fits:
      prev = np.concatenate([fits[-1].scales, [0.0]])
      candidates.append((float(fits[-1].heldout_nll), "previous", prev))
    for j in range(k):
      single = np.zeros(k)
      single[j] = singles[j][0][0]
      candidates.append((singles[j][1], f"member_{j + 1}", single))
    floor = max([prev_acc, *single_acc[:k]])
    accs = [accuracy(combined(members, c[2]), labels) for c in candidates]
    safe = [c for c, a in zip(candidates, accs) if a >= floor]  # never empty: the floor's own
    if accs[0] < floor:  # the fit loses accuracy: also the way from it to each safe one
      safe += _toward(members, labels, v, safe, floor)
    best = min(safe, key=lambda c: c[0])  # first of equals: the fit
    fits.append(PrefixFit.from_scales(best[2], best[1], best[0]))
    prev_acc = accuracy(combined(members, best[2]), labels)
  return fits


def _toward(members, labels, v, targets, floor: float) -> list[tuple[float, str, np.ndarray]]:
  """(NLL, source, scales) of the points a fraction t of the way from scales ``v`` to each
  target's that keep held-out accuracy >= ``floor`` (``SEGMENT_POINTS - 1`` per target)."""
  out = []
  for _, source, u in targets:
    for t in np.arange(1, SEGMENT_POINTS) / SEGMENT_POINTS:
      w = (1 - t) * v + t * u
      g = combined(members, w)
      if accuracy(g, labels) >= floor:
        out.append((nll(g, labels), f"fit->{source}@{t:.2f}", w))
  return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray, init: float = 1.0) -> float:
  """The NLL-optimal temperature ``T`` of ``softmax(logits / T)`` on held-out data."""
  v, _ = fit_scales([logits], labels, [1.0 / init])
  return float(1.0 / v[0])


@dataclasses.dataclass
class Combination:
  """Per-prefix combinations and the early-exit rules chosen on held-out data.

  Attributes:
    prefixes: one :class:`PrefixFit` per prefix 1..n.
    teacher_temperature: the teacher's held-out temperature (its exit), or None.
    cascades: by budget label (e.g. ``"2%"``), a :class:`mamba_pkd.cascade.CascadeRule`
      as a dict (``budget_pct``, ``threshold``, ``teacher_exit``,
      ``heldout_accuracy``, ``heldout_pct_teacher_flops``); ``None`` for a
      budget no rule meets on held-out data.
  """

  prefixes: list[PrefixFit]
  teacher_temperature: float | None = None
  cascades: dict[str, Any] = dataclasses.field(default_factory=dict)

  def prefix_logits(self, member_logits: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Calibrated ``G_k`` from member logits (at least k of them)."""
    return self.prefixes[k - 1].logits(member_logits)

  def to_json(self) -> dict:
    return {
        "prefixes": [
            {
                "k": k,
                "weights": [float(w) for w in p.weights],
                "temperature": float(p.temperature),
                "source": p.source,
                "heldout_nll": None if p.heldout_nll is None else float(p.heldout_nll),
            }
            for k, p in enumerate(self.prefixes, start=1)
        ],
        "teacher_temperature": (
            None if self.teacher_temperature is None else float(self.teacher_temperature)
        ),
        "cascades": {k: (None if v is None else dict(v)) for k, v in self.cascades.items()},
        "logits": "G_k = sum_j weights[j] * f_j / temperature (f_j: member j, eta folded)",
    }

  @classmethod
  def from_json(cls, content: Mapping[str, Any]) -> "Combination":
    prefixes = []
    for k, p in enumerate(content["prefixes"], start=1):
      weights = tuple(float(w) for w in p["weights"])
      if len(weights) != k or not float(p["temperature"]) > 0:
        raise ValueError(f"combination prefix {k}: needs {k} weights and a temperature > 0")
      prefixes.append(
          PrefixFit(weights, float(p["temperature"]), p.get("source", "fit"), p.get("heldout_nll"))
      )
    t = content.get("teacher_temperature")
    return cls(
        prefixes=prefixes,
        teacher_temperature=None if t is None else float(t),
        cascades={k: (None if v is None else dict(v)) for k, v in content["cascades"].items()},
    )
