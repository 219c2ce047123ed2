"""Losses on logits for progressive knowledge distillation (pure ``jnp``).

Two layers live here:

1. **Scalar losses** on ``[B, K]`` logits: :func:`cross_entropy`,
   :func:`soft_kl` (Hinton's ``T**2``-scaled distillation term), :func:`kd_loss`
   and the B-DISTIL pieces :func:`adversary_weights`, :func:`bdistil_loss`,
   :func:`weak_learner_edge`.
2. **Stage-loss combinators** (:func:`hard`, :func:`soft`, :func:`kd`,
   :func:`bdistil`, :func:`mix`, :func:`weighted_sum`, with the view
   :func:`residual`) so that a PKD stage's loss reads as a composition::

       ensemble_stage = kd(alpha=0.5, temperature=4.0,
                           view=residual("student", base="prefix"))
       chain_stage = kd(0.5, 4.0, view="student", target="previous")
       teacher_stage = hard("student")

   Every combinator returns a frozen dataclass (hashable, readable ``repr``)
   that is called as ``loss_fn(logits, labels, weights) -> (loss, metrics)``
   where ``logits`` maps names to ``[B, K]`` arrays, ``labels`` is ``int [B]``
   and ``weights`` is ``[B]`` or ``None``. The callables close over Python
   floats and strings only, so they are safe inside ``jax.jit``/``pmap``.

Notation (paper symbol -> name in ``logits``):

=============  ===============  ==============================================
symbol         key              meaning
=============  ===============  ==============================================
``g(x)``       ``"teacher"``    frozen teacher logits
``f_k(x)``     ``"student"``    logits of the model being trained
``F_{k-1}``    ``"prefix"``     sum of the frozen earlier students (absent k=1)
``F_k``        residual view    ``stop_gradient(F_{k-1}) + f_k``
(chain)        ``"previous"``   previous frozen model in chain mode
``K+, K-``     ``k_plus/minus`` B-DISTIL adversary weights, ``[B, K]``
``gamma_k``    ``edge``         weak-learner edge of ``f_k``
=============  ===============  ==============================================

All losses accumulate in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
Logits = Mapping[str, Array]
# A view picks or builds the [B, K] logits a term is applied to: a key of the
# logits mapping, or a callable ``logits -> [B, K]`` such as ``residual(...)``.
View = Union[str, Callable[[Logits], Array]]


# ----------------------------------------------------------------------------
# Argument checks (eager: Python values and static shapes only).
# ----------------------------------------------------------------------------


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_alpha(alpha, name: str = "alpha") -> None:
  """Raises ValueError unless ``alpha`` is a Python number in [0, 1]."""
  if not _is_python_number(alpha) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{name} must be a float in [0, 1], got {alpha!r}.")


def _check_temperature(temperature) -> None:
  """Raises ValueError unless ``temperature`` is positive and finite.

  Traced (array) temperatures cannot be checked eagerly and are passed through.
  """
  if isinstance(temperature, bool):
    raise ValueError(f"temperature must be a float > 0, got {temperature!r}.")
  if _is_python_number(temperature) and not (temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}.")


def _check_logits(name: str, logits: Array) -> None:
  if jnp.ndim(logits) != 2:
    raise ValueError(f"{name} must have shape [B, K], got shape {jnp.shape(logits)}.")


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape [B, K], got "
        f"{jnp.shape(a)} and {jnp.shape(b)}."
    )


def _check_weights(weights: Array | None, batch: int) -> None:
  if weights is not None and jnp.shape(weights) != (batch,):
    raise ValueError(
        f"weights must have shape [B]=({batch},) or be None, got shape " f"{jnp.shape(weights)}."
    )


def _weighted_mean(values: Array, weights: Array | None) -> Array:
  """Mean of ``values`` [B] weighted by ``weights`` [B] (None: uniform).

  Normalises by ``sum(weights)``; returns 0 when all weights are 0 (a batch made
  only of padding), never NaN.
  """
  values = values.astype(jnp.float32)
  if weights is None:
    return jnp.mean(values)
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  safe_total = jnp.where(total > 0, total, 1.0)
  # jnp.where also stops NaN/inf in padded rows from leaking in via 0 * inf.
  weighted = jnp.where(weights > 0, weights * values, 0.0)
  return jnp.where(total > 0, jnp.sum(weighted) / safe_total, 0.0)


# ----------------------------------------------------------------------------
# Scalar losses.
# ----------------------------------------------------------------------------


def cross_entropy(logits: Array, labels: Array, weights: Array | None = None) -> Array:
  """Weighted mean softmax cross-entropy, ``-log softmax(logits)[label]``.

  Args:
    logits: [B, K] float logits.
    labels: [B] int class indices in ``[0, K)``.
    weights: [B] non-negative example weights, or None for uniform. Examples
      with weight 0 (padding) count nothing; the mean is normalised by
      ``sum(weights)`` (0 when that sum is 0).

  Returns:
    Scalar float32 loss.
  """
  _check_logits("logits", logits)
  if jnp.shape(labels) != jnp.shape(logits)[:1]:
    raise ValueError(
        f"labels must have shape [B]={jnp.shape(logits)[:1]}, got " f"{jnp.shape(labels)}."
    )
  _check_weights(weights, jnp.shape(logits)[0])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, K]
  nll = -jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]  # [B]
  return _weighted_mean(nll, weights)


def soft_kl(
    student_logits: Array, teacher_logits: Array, temperature: float, weights: Array | None = None
) -> Array:
  """Distillation term ``T**2 * mean_b KL(softmax(g/T) || softmax(f/T))``.

  The ``T**2`` factor keeps the gradient scale comparable to the hard loss
  (Hinton et al. 2015). Computed with ``log_softmax``; the teacher is wrapped in
  ``stop_gradient``, so gradients flow only into the student.

  Args:
    student_logits: [B, K] student logits ``f``.
    teacher_logits: [B, K] teacher logits ``g``.
    temperature: softening temperature ``T > 0``.
    weights: [B] example weights or None (see :func:`cross_entropy`).

  Returns:
    Scalar float32 loss (>= 0).
  """
  _check_temperature(temperature)
  _check_logits("student_logits", student_logits)
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _check_weights(weights, jnp.shape(student_logits)[0])
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  student = student_logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)  # [B, K] teacher
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)  # [B, K] student
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B]
  return temperature**2 * _weighted_mean(kl, weights)


def kd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float,
    temperature: float,
    weights: Array | None = None,
) -> Array:
  """Knowledge-distillation loss ``alpha * L_hard + (1 - alpha) * L_soft``.

  ``L_hard`` is :func:`cross_entropy` on the labels, ``L_soft`` is
  :func:`soft_kl` at ``temperature`` (including its ``T**2`` factor).

  Args:
    student_logits: [B, K] student logits.
    teacher_logits: [B, K] teacher logits (no gradient).
    labels: [B] int labels.
    alpha: weight of the hard loss, a Python float in [0, 1].
    temperature: softening temperature, a Python float > 0.
    weights: [B] example weights or None.

  Returns:
    Scalar float32 loss.
  """
  _check_alpha(alpha)
  _check_temperature(temperature)
  hard_loss = cross_entropy(student_logits, labels, weights)
  soft_loss = soft_kl(student_logits, teacher_logits, temperature, weights)
  return alpha * hard_loss + (1.0 - alpha) * soft_loss


# ----------------------------------------------------------------------------
# B-DISTIL (Dennis et al., NeurIPS 2023).
# ----------------------------------------------------------------------------


def adversary_weights(
    teacher_logits: Array,
    ensemble_logits: Array,
    *,
    scale: float = 1.0,
    weights: Array | None = None,
) -> tuple[Array, Array]:
  """B-DISTIL adversary weights ``K+ ~ exp(s(g - F))``, ``K- ~ exp(s(F - g))``.

  Per example ``i`` and class ``j``, ``K+[i, j]`` is large where the ensemble
  ``F`` is still below the teacher ``g`` (the next student should push that
  logit up) and ``K-[i, j]`` where it is above. Both are normalised **jointly**:
  ``sum(K+) + sum(K-) == 1`` over all examples and classes (padded examples,
  weight 0, get 0). Computed stably (the largest exponent is subtracted before
  ``exp``) and wrapped in ``stop_gradient``.

  Args:
    teacher_logits: [B, K] teacher logits ``g``.
    ensemble_logits: [B, K] logits ``F_{k-1}`` of the frozen ensemble so far
      (zeros for the first student).
    scale: multiplies ``g - F`` inside the exponent (a Python float > 0;
      larger values concentrate the weights on the worst mismatches).
    weights: optional [B] example weights; multiply the unnormalised weights
      (use 0 for padded examples).

  Returns:
    ``(k_plus, k_minus)``, each [B, K] float32, non-negative.
  """
  _check_logits("teacher_logits", teacher_logits)
  _check_same_shape("teacher_logits", teacher_logits, "ensemble_logits", ensemble_logits)
  _check_weights(weights, jnp.shape(teacher_logits)[0])
  if _is_python_number(scale) and not (scale > 0 and math.isfinite(scale)):
    raise ValueError(f"scale must be a finite float > 0, got {scale!r}.")
  diff = scale * (
      teacher_logits.astype(jnp.float32) - ensemble_logits.astype(jnp.float32)
  )  # [B, K]
  diff = jax.lax.stop_gradient(diff)
  shift = jnp.max(jnp.abs(diff))  # exp(+-diff - shift) <= 1
  k_plus = jnp.exp(diff - shift)  # [B, K]
  k_minus = jnp.exp(-diff - shift)  # [B, K]
  if weights is not None:
    w = weights.astype(jnp.float32)[:, None]  # [B, 1]
    k_plus, k_minus = k_plus * w, k_minus * w
  total = jnp.sum(k_plus) + jnp.sum(k_minus)
  safe_total = jnp.where(total > 0, total, 1.0)
  return k_plus / safe_total, k_minus / safe_total


def bdistil_loss(head_logits: Array, k_plus: Array, k_minus: Array) -> Array:
  """B-DISTIL log-barrier loss ``-sum[K+ log(1 + f) + K- log(1 - f)]``.

  ``f = tanh(head_logits)`` lies in (-1, 1). Instead of clipping ``f``, the
  identities ``log(1 + tanh x) = log 2 - softplus(-2x)`` and
  ``log(1 - tanh x) = log 2 - softplus(2x)`` are used, which are exact and
  finite for every ``x`` (gradients do not vanish at saturation either). With
  jointly normalised ``K±`` (see :func:`adversary_weights`) the loss is a
  weighted average, minimised by ``f -> sign(K+ - K-)``.

  Args:
    head_logits: [B, K] raw outputs of the student head.
    k_plus: [B, K] non-negative weights of ``+`` errors (no gradient).
    k_minus: [B, K] non-negative weights of ``-`` errors (no gradient).

  Returns:
    Scalar float32 loss.
  """
  _check_logits("head_logits", head_logits)
  _check_same_shape("head_logits", head_logits, "k_plus", k_plus)
  _check_same_shape("head_logits", head_logits, "k_minus", k_minus)
  x = head_logits.astype(jnp.float32)
  k_plus = jax.lax.stop_gradient(k_plus).astype(jnp.float32)
  k_minus = jax.lax.stop_gradient(k_minus).astype(jnp.float32)
  log2 = jnp.log(2.0)
  log_one_plus_f = log2 - jax.nn.softplus(-2.0 * x)  # log(1 + tanh x), [B, K]
  log_one_minus_f = log2 - jax.nn.softplus(2.0 * x)  # log(1 - tanh x), [B, K]
  return -jnp.sum(k_plus * log_one_plus_f + k_minus * log_one_minus_f)


def weak_learner_edge(student_logits: Array, k_plus: Array, k_minus: Array) -> Array:
  """Weak-learner edge ``gamma = sum (K+ - K-) * tanh(f)``.

  ``tanh`` maps the student's logits into [-1, 1]; with ``K±`` jointly
  normalised to total mass 1 (:func:`adversary_weights`), ``gamma`` lies in
  [-1, 1]: positive when the student moves the ensemble towards the teacher
  (its sign agrees with ``g - F`` where the weights are large), negative when
  it moves away. B-DISTIL accepts the student as a weak learner when
  ``gamma >= gamma_min``.

  Args:
    student_logits: [B, K] logits of the candidate student ``f_k``.
    k_plus: [B, K] adversary weights ``K+``.
    k_minus: [B, K] adversary weights ``K-``.

  Returns:
    Scalar float32 edge in [-1, 1].
  """
  _check_logits("student_logits", student_logits)
  _check_same_shape("student_logits", student_logits, "k_plus", k_plus)
  _check_same_shape("student_logits", student_logits, "k_minus", k_minus)
  f = jnp.tanh(student_logits.astype(jnp.float32))  # [B, K] in [-1, 1]
  return jnp.sum((k_plus.astype(jnp.float32) - k_minus.astype(jnp.float32)) * f)


# ----------------------------------------------------------------------------
# Stage-loss combinators.
# ----------------------------------------------------------------------------


def _view_name(view: View) -> str:
  return view if isinstance(view, str) else repr(view)


def _select(logits: Logits, view: View) -> Array:
  """Returns the [B, K] array a view names or computes."""
  if isinstance(view, str):
    if view not in logits:
      raise ValueError(
          f"stage loss needs logits[{view!r}], but only " f"{sorted(logits)} were given."
      )
    return logits[view]
  return view(logits)


def _merge_metrics(*parts: Metrics) -> Metrics:
  """Merges metric dicts; a name used twice is an error (pass ``name=``)."""
  merged: Metrics = {}
  for part in parts:
    for key, value in part.items():
      if key in merged:
        raise ValueError(
            f"metric {key!r} is produced by two terms of the stage loss; give "
            "one of them another name with name=..."
        )
      merged[key] = value
  return merged


@dataclasses.dataclass(frozen=True)
class Residual:
  """View ``stop_gradient(logits[base]) + logits[on]`` (the ensemble ``F_k``).

  When ``base`` is None or missing from the logits (the first student), the
  view is just ``logits[on]``.
  """

  on: str = "student"
  base: str | None = "prefix"

  def __call__(self, logits: Logits) -> Array:
    out = _select(logits, self.on)
    if self.base is None or self.base not in logits:
      return out
    base = logits[self.base]
    _check_same_shape(f"logits[{self.on!r}]", out, f"logits[{self.base!r}]", base)
    return jax.lax.stop_gradient(base) + out


def residual(on: str = "student", base: str | None = "prefix") -> Residual:
  """The ensemble view ``F_k = stop_gradient(F_{k-1}) + f_k``; see Residual."""
  return Residual(on=on, base=base)


@dataclasses.dataclass(frozen=True)
class Hard:
  """Cross-entropy of ``view`` against the labels; metric ``loss/hard``."""

  view: View = "student"
  name: str = "loss/hard"

  def __call__(
      self, logits: Logits, labels: Array, weights: Array | None = None
  ) -> tuple[Array, Metrics]:
    loss = cross_entropy(_select(logits, self.view), labels, weights)
    return loss, {self.name: loss}


def hard(view: View = "student", *, name: str = "loss/hard") -> Hard:
  """Stage term ``CE(labels, view)``."""
  return Hard(view=view, name=name)


@dataclasses.dataclass(frozen=True)
class Soft:
  """``T**2 * KL(softmax(target/T) || softmax(view/T))``; metric ``loss/soft``."""

  view: View = "student"
  target: View = "teacher"
  temperature: float = 1.0
  name: str = "loss/soft"

  def __post_init__(self):
    _check_temperature(self.temperature)

  def __call__(
      self, logits: Logits, labels: Array, weights: Array | None = None
  ) -> tuple[Array, Metrics]:
    del labels  # The soft term only looks at the target's distribution.
    loss = soft_kl(
        _select(logits, self.view), _select(logits, self.target), self.temperature, weights
    )
    return loss, {self.name: loss}


def soft(
    view: View = "student",
    target: View = "teacher",
    temperature: float = 1.0,
    *,
    name: str = "loss/soft",
) -> Soft:
  """Stage term :func:`soft_kl` of ``view`` towards ``target``."""
  return Soft(view=view, target=target, temperature=temperature, name=name)


StageLoss = Callable[[Logits, Array, Union[Array, None]], tuple[Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class WeightedSum:
  """``sum_i w_i * term_i``; metrics of all terms, merged."""

  terms: tuple[tuple[float, StageLoss], ...]

  def __post_init__(self):
    if not self.terms:
      raise ValueError("weighted_sum needs at least one (weight, term) pair.")
    for i, pair in enumerate(self.terms):
      if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[1])):
        raise ValueError(f"weighted_sum term {i} must be a (weight, term) pair, got " f"{pair!r}.")
      weight = pair[0]
      if not _is_python_number(weight) or not math.isfinite(weight):
        raise ValueError(
            f"weighted_sum weight {i} must be a finite Python float, got " f"{weight!r}."
        )

  def __call__(
      self, logits: Logits, labels: Array, weights: Array | None = None
  ) -> tuple[Array, Metrics]:
    total = jnp.zeros((), jnp.float32)
    all_metrics = []
    for weight, term in self.terms:
      loss, metrics = term(logits, labels, weights)
      total = total + weight * loss
      all_metrics.append(metrics)
    return total, _merge_metrics(*all_metrics)


def weighted_sum(*terms: tuple[float, StageLoss]) -> WeightedSum:
  """Stage loss ``sum_i w_i * term_i`` from ``(weight, term)`` pairs."""
  return WeightedSum(terms=tuple(terms))


def mix(alpha: float, a_term: StageLoss, b_term: StageLoss) -> WeightedSum:
  """Stage loss ``alpha * a + (1 - alpha) * b`` with ``alpha`` in [0, 1]."""
  _check_alpha(alpha)
  return WeightedSum(terms=((float(alpha), a_term), (1.0 - alpha, b_term)))


def kd(
    alpha: float, temperature: float, view: View = "student", target: View = "teacher"
) -> WeightedSum:
  """Stage loss of :func:`kd_loss`: ``alpha * hard + (1 - alpha) * soft``.

  Args:
    alpha: weight of the hard (label) term, a Python float in [0, 1].
    temperature: softening temperature of the soft term, > 0.
    view: the logits trained (a key or a view such as ``residual(...)``).
    target: the logits distilled from (``"teacher"``, or ``"previous"`` in
      chain mode).

  Returns:
    A stage loss with metrics ``loss/hard`` and ``loss/soft``.
  """
  _check_alpha(alpha)
  _check_temperature(temperature)
  return mix(alpha, hard(view), soft(view, target, temperature))


@dataclasses.dataclass(frozen=True)
class BDistil:
  """B-DISTIL log-barrier term on ``view`` (the new student's head ``f_k``).

  ``K±`` come from :func:`adversary_weights` of ``target`` (``g``) against
  ``base`` (``F_{k-1}``; zeros when None or absent). Metrics: ``loss/bdistil``
  and ``bdistil/edge`` (:func:`weak_learner_edge` of the view).
  """

  view: View = "student"
  target: View = "teacher"
  base: str | None = "prefix"
  scale: float = 1.0
  name: str = "loss/bdistil"

  def __post_init__(self):
    if not _is_python_number(self.scale) or not (self.scale > 0 and math.isfinite(self.scale)):
      raise ValueError(f"scale must be a finite float > 0, got {self.scale!r}.")

  def __call__(
      self, logits: Logits, labels: Array, weights: Array | None = None
  ) -> tuple[Array, Metrics]:
    del labels  # B-DISTIL fits the teacher, not the labels.
    head = _select(logits, self.view)
    teacher = _select(logits, self.target)
    if self.base is None or self.base not in logits:
      ensemble = jnp.zeros_like(teacher)
    else:
      ensemble = logits[self.base]
    k_plus, k_minus = adversary_weights(teacher, ensemble, scale=self.scale, weights=weights)
    loss = bdistil_loss(head, k_plus, k_minus)
    edge = weak_learner_edge(jax.lax.stop_gradient(head), k_plus, k_minus)
    return loss, {self.name: loss, "bdistil/edge": edge}


def bdistil(
    view: View = "student",
    target: View = "teacher",
    base: str | None = "prefix",
    scale: float = 1.0,
    *,
    name: str = "loss/bdistil",
) -> BDistil:
  """Stage term :func:`bdistil_loss` with weights from ``target - base``."""
  return BDistil(view=view, target=target, base=base, scale=scale, name=name)
