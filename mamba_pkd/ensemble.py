"""The ensemble: how members combine, what a prefix costs, and anytime (early-exit) prediction.

This module is the one owner of the ensemble arithmetic; every other module
(``pkd``, ``evaluate``, ``train``, ``runs``, ``export``, ``predict``) calls it
instead of summing members itself.

Notation (see ``pkd``): member ``j`` has logits ``f_j(x)`` with its ensemble
weight ``eta_j`` already folded into its output layer (:func:`fold_weight`), so
the prefix ``F_k(x) = sum_{j<=k} eta_j f_j(x)`` is the plain running sum
``f_1 + ... + f_k`` (:func:`cumulative`). A *connected* member
(``connect_dim > 0``) also reads the features of the member before it (pooled,
or its token states flattened: ``models.ModelConfig.token_features``);
:func:`chain` runs members in order and hands each one its predecessor's
features.

What lives here:

* combining: :func:`fold_weight`, :func:`chain`, :func:`cumulative`,
  :func:`prefix_logits`;
* the :class:`Member` record (one type for a member of a run, of an export or
  of an in-process ensemble);
* budgets: :class:`PrefixCost`, :func:`prefix_costs`, :func:`parse_flops`,
  :func:`largest_prefix_within`, :class:`BudgetError`;
* runtimes: :class:`Ensemble`, the base of every way to run members (Flax in
  process, ``jax.export`` bundles, ONNX), with padded power-of-two batches;
* anytime prediction: :func:`softmax_margin`, :func:`anytime_predict` and its
  FLOPs accounting (:class:`AnytimeResult`).

It imports NumPy only: the functions work on NumPy and JAX arrays alike, so
that loading an export needs neither Flax nor this package's training code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PyTree = Any
# forward(j, x, prev_features) -> (logits [b, K], features [b, d_j]); prev_features is
# member j-1's features (None for j = 0) and is ignored by members that are not connected.
MemberForward = Callable[[int, Any, Any], tuple[Any, Any]]


class BudgetError(ValueError):
  """No ensemble prefix fits the requested FLOPs or latency budget."""


# ----------------------------------------------------------------------------
# Combining members.
# ----------------------------------------------------------------------------


def fold_weight(params: Mapping, weight: float) -> dict:
  """``params`` with the output layer multiplied by ``weight``: logits become ``weight * logits``.

  This is how a member's ensemble weight ``eta_j`` is folded into the member,
  so that prefixes stay plain sums (features are unchanged). Returns a new
  pytree; ``params`` is not modified.
  """
  if "head" not in params:
    raise ValueError(f"params have no 'head' layer to scale (top-level keys: {sorted(params)})")
  out = dict(params)
  out["head"] = {name: value * weight for name, value in params["head"].items()}
  return out


def chain(forward: MemberForward, num_members: int, x: Any) -> tuple[list[Any], list[Any]]:
  """Runs members ``0..num_members-1`` in order, each reading its predecessor's features.

  Args:
    forward: ``forward(j, x, prev_features) -> (logits, features)``.
    num_members: how many members to run (k).
    x: the members' input (normalised images), NumPy or JAX.

  Returns:
    ``(logits, features)``: lists of k arrays ([b, K] and [b, d_j]).
  """
  all_logits, all_features, prev = [], [], None
  for j in range(num_members):
    logits, features = forward(j, x, prev)
    all_logits.append(logits)
    all_features.append(features)
    prev = features
  return all_logits, all_features


def cumulative(member_logits: Sequence[Any]) -> list[Any]:
  """``[f_1, ..., f_k] -> [F_1, ..., F_k]`` with ``F_k = F_{k-1} + f_k`` (a running sum)."""
  out: list[Any] = []
  for logits in member_logits:
    out.append(logits if not out else out[-1] + logits)
  return out


def prefix_logits(member_logits: Sequence[Any]) -> Any:
  """``F_k = f_1 + ... + f_k`` of k >= 1 member logits ([N, K] each)."""
  if not member_logits:
    raise ValueError("an ensemble prefix needs at least one member")
  return cumulative(member_logits)[-1]


# ----------------------------------------------------------------------------
# Members.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
  """One member of an ensemble (or the teacher), as the run manifest records it.

  Attributes:
    name: ``"teacher"``, ``"student_<k>"`` (k = position in the ensemble) or
      ``"baseline_<k>"``.
    stage: the checkpoint stage it was trained in (``ckpt/<stage>``).
    size: ladder size name (``"s3"``, ``"teacher"``).
    flops: inference FLOPs per image.
    num_params: parameter count.
    d_model: width of the features it hands to a connected successor (its
      ``d_model``, or ``num_tokens * d_model`` with token features).
    connect_dim: width of the previous member's features it reads (0: none).
    weight: its ensemble weight ``eta`` (folded into ``params`` by the loaders).
    prefix_scale: the overall scale ``c`` that calibrates the logits of the
      prefix ending with this member (``softmax(c * F_k)``); 1 where the run
      did not calibrate. Only softmax-based uses (early exit) need it.
    config: its model configuration (a ``models.ModelConfig``) where loaded.
    params: its parameters (weight folded) where loaded.
  """

  name: str
  stage: str
  size: str
  flops: int
  num_params: int
  d_model: int
  connect_dim: int = 0
  weight: float = 1.0
  prefix_scale: float = 1.0
  config: Any = None
  params: PyTree = None


# ----------------------------------------------------------------------------
# Budgets (pure).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefixCost:
  """Cost of the prefix ``student_1..k``."""

  k: int
  sizes: tuple[str, ...]
  flops: int
  pct_teacher_flops: float

  def describe(self) -> str:
    return (
        f"prefix 1..{self.k} ({'+'.join(self.sizes)}): {self.flops:,} FLOPs/image, "
        f"{self.pct_teacher_flops:.2f}% of the teacher"
    )


def prefix_costs(
    member_flops: Sequence[int], member_sizes: Sequence[str], teacher_flops: int
) -> list[PrefixCost]:
  """Cumulative FLOPs of every prefix, ``k = 1..len(member_flops)``."""
  out, total = [], 0
  for k, f in enumerate(member_flops, start=1):
    total += int(f)
    out.append(PrefixCost(k, tuple(member_sizes[:k]), total, 100.0 * total / teacher_flops))
  return out


def parse_flops(text: str | float | int) -> tuple[float | None, float | None]:
  """``"2.5e6"``, ``"120k"``, ``"3M"`` -> (absolute, None); ``"25%"`` -> (None, 25.0).

  Raises:
    ValueError: not a positive number with an optional k/M/G suffix or ``%``.
  """
  if isinstance(text, (int, float)):
    value, pct = float(text), False
  else:
    s = str(text).strip()
    pct = s.endswith("%")
    s = s[:-1] if pct else s
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}.get(s[-1:], 1.0)
    s = s[:-1] if scale != 1.0 else s
    try:
      value = float(s) * scale
    except ValueError:
      value = float("nan")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"max_flops={text!r} must be a positive number of FLOPs per image "
        "(e.g. 2.5e6, 120k, 3M) or a percentage of the teacher's (e.g. 25%)"
    )
  return (None, value) if pct else (value, None)


def largest_prefix_within(
    costs: Sequence[PrefixCost],
    *,
    max_flops: float | None = None,
    max_flops_pct: float | None = None,
    max_latency_ms: float | None = None,
    latency_ms: Callable[[int], float] | None = None,
) -> tuple[int, dict[int, float]]:
  """The largest k whose prefix fits every given budget.

  FLOPs budgets filter first (static). Latency is then measured by
  ``latency_ms(k)`` for k = 1, 2, ... up to the FLOPs limit, stopping at the
  first prefix over ``max_latency_ms`` (latency grows with k: each prefix runs
  all the members of the previous one).

  Args:
    costs: from :func:`prefix_costs`, k = 1..n in order.
    max_flops: FLOPs per image, or None.
    max_flops_pct: percent of the teacher's FLOPs, or None.
    max_latency_ms: milliseconds per call, or None.
    latency_ms: ``k -> measured ms`` (required with ``max_latency_ms``).

  Returns:
    ``(k, measured)`` with ``measured`` the latencies taken, by k.

  Raises:
    BudgetError: even the cheapest prefix does not fit (the message gives its cost).
    ValueError: a budget that is not a positive number.
  """
  for name, value in (
      ("max_flops", max_flops),
      ("max_flops_pct", max_flops_pct),
      ("max_latency_ms", max_latency_ms),
  ):
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{name} must be a positive number, got {value!r}")
  if not costs:
    raise ValueError("there is no prefix to choose from (the ensemble is empty)")
  fits = [
      c
      for c in costs
      if (max_flops is None or c.flops <= max_flops)
      and (max_flops_pct is None or c.pct_teacher_flops <= max_flops_pct)
  ]
  if not fits:
    asked = " and ".join(
        s
        for s in (
            f"--max_flops={max_flops:,.0f}" if max_flops is not None else "",
            f"--max_flops_pct={max_flops_pct:g}" if max_flops_pct is not None else "",
        )
        if s
    )
    raise BudgetError(f"no ensemble prefix fits {asked}: the cheapest, {costs[0].describe()}")
  k_best = fits[-1].k
  measured: dict[int, float] = {}
  if max_latency_ms is not None:
    if latency_ms is None:
      raise ValueError("max_latency_ms needs a latency_ms(k) measurement function")
    k_lat = 0
    for cost in fits:
      measured[cost.k] = float(latency_ms(cost.k))
      if measured[cost.k] > max_latency_ms:
        break
      k_lat = cost.k
    if k_lat == 0:
      raise BudgetError(
          f"no ensemble prefix fits --max_latency_ms={max_latency_ms:g}: the "
          f"cheapest, {costs[0].describe()}, takes {measured[1]:.3g} ms per call "
          "on this machine"
      )
    k_best = k_lat
  return k_best, measured


# ----------------------------------------------------------------------------
# Runtimes: one interface over in-process models, exported bundles, ONNX.
# ----------------------------------------------------------------------------

DEFAULT_BATCH_SIZE = 256  # largest batch of one compiled call; bigger inputs are chunked


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch for n rows: the next power of two, at most ``batch_size``."""
  return min(batch_size, 1 << max(0, (n - 1).bit_length()))


class Ensemble:
  """An ordered list of members whose summed logits are the prediction.

  Subclasses set the attributes below and provide ``_member_fn(j)``
  (``(x, prev) -> (logits, features)``) and ``_prefix_fn(k)`` (``x -> F_k``).
  Inputs are padded to power-of-two batches (at most ``batch_size``) so that
  only a few shapes are ever compiled.

  Attributes:
    preprocessing: the input normalisation (``preprocessing.Preprocessing``).
    members: the :class:`Member` records (params may be absent).
    teacher_flops: the teacher's FLOPs per image (for percentages).
    prefix_accuracy: the run's test accuracy of each prefix (or None).
    batch_size: largest batch of one compiled call.
    description: where the members come from, for messages.
    combination: the run's ``combine.Combination`` (per-prefix weights,
      temperatures, early-exit rules per budget) when these are all its
      students, else None.
    teacher_fn: ``x (normalised) -> teacher logits`` when the teacher is
      loaded (a cascade's last exit), else None.
  """

  preprocessing: Any
  members: list[Member]
  teacher_flops: int
  prefix_accuracy: list[float | None]
  batch_size: int = DEFAULT_BATCH_SIZE
  description: str = ""
  combination: Any = None
  teacher_fn: Callable | None = None

  @property
  def num_members(self) -> int:
    return len(self.members)

  def costs(self) -> list[PrefixCost]:
    return prefix_costs(
        [m.flops for m in self.members], [m.size for m in self.members], self.teacher_flops
    )

  def resolve_num_members(self, k: int | None) -> int:
    """``k`` (None: all members) checked to be in 1..num_members."""
    n = self.num_members
    k = n if k is None else k
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
      raise ValueError(f"num_members={k!r} must be in 1..{n}")
    return int(k)

  def _run_padded(self, fn: Callable, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``fn`` over row chunks of ``arrays`` padded to bucket sizes; outputs concatenated."""
    n = len(arrays[0])
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start : start + self.batch_size] for a in arrays]
      rows = len(chunk[0])
      pad = _bucket(rows, self.batch_size) - rows
      if pad:
        chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      result = fn(*chunk)
      result = result if isinstance(result, tuple) else (result,)
      outs.append([np.asarray(r)[:rows] for r in result])
    return [np.concatenate(parts) for parts in zip(*outs)]

  def member_forward(
      self, j: int, x: np.ndarray, prev_features: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Member ``j`` (0-based) on normalised inputs.

    Args:
      j: member index, 0 <= j < num_members.
      x: float32 [N, H, W, C], normalised.
      prev_features: float32 [N, d_{j-1}], member j-1's features; needed when
        member j is connected (``connect_dim > 0``), ignored otherwise.

    Returns:
      (logits float32 [N, K], features float32 [N, d_j]).
    """
    connect = self.members[j].connect_dim
    if not connect:
      logits, feats = self._run_padded(self._member_fn(j), [x])
      return logits, feats
    if prev_features is None or prev_features.shape != (len(x), connect):
      raise ValueError(f"member {j + 1} is connected: pass prev_features [N, {connect}]")
    logits, feats = self._run_padded(self._member_fn(j), [x, prev_features.astype(np.float32)])
    return logits, feats

  def logits(
      self, images: np.ndarray, *, num_members: int | None = None, normalized: bool = False
  ) -> np.ndarray:
    """``F_k(x)``: the summed logits of the first ``num_members`` members.

    Args:
      images: [N, H, W, C] uint8 pixels or float pixels in [0, 1] (see
        ``Preprocessing.normalize``; ``normalized=True`` for model inputs).
      num_members: k (default: all).
      normalized: inputs are already normalised.

    Returns:
      float32 [N, K].
    """
    k = self.resolve_num_members(num_members)
    x = self.preprocessing.normalize(images, normalized=normalized)
    return self._run_padded(self._prefix_fn(k), [x])[0]

  __call__ = logits

  def prefix_forward(self, k: int) -> Callable:
    """The compiled ``x f32[b, H, W, C] -> F_k f32[b, K]`` (for timing)."""
    return self._prefix_fn(self.resolve_num_members(k))

  def _member_fn(self, j: int) -> Callable:
    raise NotImplementedError

  def _prefix_fn(self, k: int) -> Callable:
    raise NotImplementedError


# ----------------------------------------------------------------------------
# Anytime prediction.
# ----------------------------------------------------------------------------


def softmax_margin(logits: np.ndarray) -> np.ndarray:
  """Top-1 minus top-2 softmax probability per row: [N, K] -> [N] in [0, 1]."""
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(axis=-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(axis=-1, keepdims=True)
  top2 = np.sort(p, axis=-1)[:, -2:]
  return (top2[:, 1] - top2[:, 0]).astype(np.float32)


@dataclasses.dataclass
class AnytimeResult:
  """Per-image outcome of :func:`anytime_predict`.

  Attributes:
    logits: float32 [N, K], ``F_{m_i}`` of image i where m_i = members_used[i].
    classes: int [N], argmax of ``logits``.
    margins: float32 [N], :func:`softmax_margin` of ``prefix_scale * logits``.
    members_used: int [N], in 1..num_members.
    flops: int [N], the cumulative FLOPs of the prefix at which image i stopped.
  """

  logits: np.ndarray
  classes: np.ndarray
  margins: np.ndarray
  members_used: np.ndarray
  flops: np.ndarray

  @property
  def mean_flops(self) -> float:
    """Mean FLOPs per image: sum over images of the cumulative cost at their exit, / N."""
    return float(np.mean(self.flops)) if len(self.flops) else 0.0


def exit_flops(members_used: np.ndarray, member_flops: Sequence[int]) -> np.ndarray:
  """Per image, the cumulative FLOPs of prefix ``1..members_used[i]`` (int64 [N])."""
  cumulative_flops = np.concatenate([[0], np.cumsum(np.asarray(member_flops, np.int64))])
  return cumulative_flops[np.asarray(members_used, np.int64)]


def anytime_predict(
    ensemble: Ensemble,
    x: np.ndarray,
    *,
    num_members: int | None = None,
    confidence: float | None = None,
) -> AnytimeResult:
  """Runs members 1..k, each only on the images whose prefix is still unsure.

  Args:
    ensemble: the members.
    x: float32 [N, H, W, C], normalised model inputs.
    num_members: k, the prefix length (default: all).
    confidence: stop for an image once the softmax margin of its prefix logits
      (calibrated by the prefix's ``prefix_scale``) is >= confidence (in
      (0, 1]); None runs all k members on every image.

  Returns:
    An :class:`AnytimeResult`.
  """
  k = ensemble.resolve_num_members(num_members)
  if confidence is not None and not 0 < confidence <= 1:
    raise ValueError(f"confidence={confidence!r} must be in (0, 1] (a softmax margin)")
  n = len(x)
  logits = np.zeros((n, ensemble.preprocessing.num_classes), np.float32)
  used = np.zeros(n, np.int32)
  active = np.arange(n)
  prev_all = None  # features of the previous member, [N, d] (rows of active images valid)
  # Prefix j's calibration: softmax(scale_j * F_j) are its probabilities.
  scales = np.array([ensemble.members[j].prefix_scale for j in range(k)], np.float32)
  for j in range(k):
    if len(active) == 0:
      break
    connected = prev_all is not None and ensemble.members[j].connect_dim
    prev = prev_all[active] if connected else None
    member_logits, feats = ensemble.member_forward(j, x[active], prev)
    logits[active] += member_logits
    used[active] = j + 1
    prev_all = np.zeros((n, feats.shape[1]), np.float32)
    prev_all[active] = feats
    if confidence is not None and j < k - 1:
      active = active[softmax_margin(scales[j] * logits[active]) < confidence]
  return AnytimeResult(
      logits=logits,
      classes=logits.argmax(-1).astype(np.int32),
      margins=softmax_margin(scales[used - 1, None] * logits),
      members_used=used,
      flops=exit_flops(used, [m.flops for m in ensemble.members[:k]]),
  )
