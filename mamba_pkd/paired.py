"""Paired tests of two classifiers on the same test examples (NumPy and ``math`` only).

:func:`mcnemar_exact`: the exact (binomial) McNemar test. Of the examples where exactly
one of the two classifiers is right, ``b`` favour A and ``c`` favour B; under the null
hypothesis (equal accuracy) each such example favours A with probability 1/2, so
``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])`` (two-sided). Over seeds, the
discordant pairs of every (seed, example) are pooled into one test (the seeds' runs
are independent, so their discordant examples are independent draws).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class McNemar:
  """The result of :func:`mcnemar_exact`.

  Attributes:
    b: examples A gets right and B wrong.
    c: examples B gets right and A wrong.
    p_value: two-sided exact p-value (1.0 when b + c == 0).
  """

  b: int
  c: int
  p_value: float


def binomial_two_sided(b: int, c: int) -> float:
  """``min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2**(b + c))`` (1.0 for b + c == 0)."""
  n, low = b + c, min(b, c)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(low + 1))
  return min(1.0, 2.0 * tail / 2**n)  # exact integers until the last division


def mcnemar_exact(
    labels: np.ndarray | Sequence[np.ndarray],
    predictions_a: np.ndarray | Sequence[np.ndarray],
    predictions_b: np.ndarray | Sequence[np.ndarray],
) -> McNemar:
  """Exact McNemar test of classifier A against B on the same examples.

  Args:
    labels: true classes [N], or one such array per seed.
    predictions_a, predictions_b: predicted classes, shaped like ``labels`` (per seed:
      the same examples in the same order as that seed's labels).

  Returns:
    :class:`McNemar` with the discordant counts pooled over seeds.

  Raises:
    ValueError: mismatched shapes or numbers of seeds.
  """
  as_list = lambda x: [np.asarray(x)] if np.ndim(x) == 1 else [np.asarray(v) for v in x]
  labels, a, b = as_list(labels), as_list(predictions_a), as_list(predictions_b)
  if not len(labels) == len(a) == len(b):
    raise ValueError(f"{len(labels)} label arrays but {len(a)} and {len(b)} prediction arrays")
  right_only_a = right_only_b = 0
  for y, pa, pb in zip(labels, a, b):
    if not y.shape == pa.shape == pb.shape or y.ndim != 1:
      raise ValueError(
          f"labels and predictions must be [N] alike, got {y.shape}, {pa.shape}, {pb.shape}"
      )
    ok_a, ok_b = pa == y, pb == y
    right_only_a += int(np.sum(ok_a & ~ok_b))
    right_only_b += int(np.sum(ok_b & ~ok_a))
  return McNemar(right_only_a, right_only_b, binomial_two_sided(right_only_a, right_only_b))
