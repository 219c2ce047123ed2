"""A pixel baseline and sanity warnings: is the teacher better than a linear model on pixels?

:func:`fit_pixel_baseline` fits multinomial logistic regression on standardised
pixels (pure NumPy, full batch, Nesterov-accelerated gradient descent with the
step 1/L from the loss's smoothness bound, so it needs no tuning and converges
monotonically enough in a few hundred steps on MNIST-sized data). A teacher that
does not beat it has not learned anything a linear model would not; a student
below chance (1 / num_classes) is broken. :func:`sanity_warnings` words both as
one line each for the report (the lead adds the report row).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

METHODS = ("logistic", "nearest_mean")


@dataclasses.dataclass(frozen=True)
class PixelBaseline:
  """A fitted linear classifier on pixels: ``logits = standardise(x) @ weights + bias``."""

  mean: np.ndarray  # [D]
  scale: np.ndarray  # [D]
  weights: np.ndarray  # [D, K]
  bias: np.ndarray  # [K]
  method: str

  def logits(self, x: np.ndarray) -> np.ndarray:
    """[N, K] scores of images ``x`` ([N, ...] uint8 0..255 or float, as in training)."""
    z = (_flat(x) - self.mean) / self.scale
    return z @ self.weights + self.bias

  def predict(self, x: np.ndarray) -> np.ndarray:
    """[N] predicted labels."""
    return np.argmax(self.logits(x), axis=1)

  __call__ = predict

  def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(self.predict(x) == np.asarray(y)))


def _flat(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  scale = 1 / 255.0 if x.dtype == np.uint8 else 1.0
  return x.reshape(len(x), -1).astype(np.float64) * scale


def fit_pixel_baseline(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    *,
    method: str = "logistic",
    steps: int = 300,
    l2: float = 1e-4,
    max_examples: int = 10000,
    seed: int = 0,
) -> PixelBaseline:
  """Fits a linear pixel classifier; returns a :class:`PixelBaseline` (call it to predict).

  Args:
    x_train: [N, ...] images (uint8 0..255 are divided by 255; floats used as they are).
    y_train: [N] int labels in [0, num_classes).
    num_classes: K >= 2.
    method: ``"logistic"`` (multinomial logistic regression, mean cross-entropy +
      ``l2/2 * |W|^2``, ``steps`` accelerated gradient steps) or ``"nearest_mean"``
      (nearest class mean in the standardised pixel space, as a linear rule).
    steps: gradient steps for ``"logistic"``.
    l2: weight decay for ``"logistic"`` (keeps separable data from diverging).
    max_examples: fit on at most this many training images (a fixed random subset
      drawn with ``seed``): the cost is ``steps * N * D * K``.
    seed: subset seed.

  Raises:
    ValueError: a bad argument (named).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
  x, y = _flat(x_train), np.asarray(y_train).astype(np.int64)
  if len(x) != len(y) or len(y) == 0:
    raise ValueError(f"x_train has {len(x)} images but y_train has {len(y)} labels (need >= 1)")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
  if len(y) > max_examples:
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:max_examples])
    x, y = x[keep], y[keep]
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale = np.where(scale > 1e-8, scale, 1.0)  # constant pixels (MNIST borders) stay 0
  z = (x - mean) / scale
  n, d = z.shape
  if method == "nearest_mean":
    # argmin_k |z - m_k|^2 = argmax_k z.m_k - |m_k|^2 / 2; absent classes never win.
    means = np.zeros((num_classes, d))
    present = np.zeros(num_classes, bool)
    for k in range(num_classes):
      if np.any(y == k):
        means[k] = z[y == k].mean(axis=0)
        present[k] = True
    bias = np.where(present, -0.5 * np.sum(means**2, axis=1), -np.inf)
    return PixelBaseline(mean, scale, means.T.copy(), bias, method)

  onehot = np.eye(num_classes)[y]
  zb = np.concatenate([z, np.ones((n, 1))], axis=1)  # bias as a constant feature
  # Smoothness of mean softmax CE: L <= lambda_max(Zb^T Zb) / (2 n) + l2 (power iteration).
  v = np.random.default_rng(seed).normal(size=d + 1)
  for _ in range(30):
    v = zb.T @ (zb @ v)
    v /= np.linalg.norm(v)
  lipschitz = float(v @ (zb.T @ (zb @ v))) / (2 * n) + l2
  lr = 1.0 / lipschitz
  w = np.zeros((d + 1, num_classes))
  w_prev = w
  decay = np.ones((d + 1, 1))
  decay[-1] = 0.0  # no decay on the bias

  def grad(w):
    logits = zb @ w
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return zb.T @ (p - onehot) / n + l2 * decay * w

  for t in range(1, steps + 1):
    look = w + (t - 1) / (t + 2) * (w - w_prev)  # Nesterov momentum
    w_prev, w = w, look - lr * grad(look)
  return PixelBaseline(mean, scale, w[:-1], w[-1], method)


def sanity_warnings(
    teacher_acc: float,
    baseline_acc: float,
    student_accs: Mapping[str, float] | Sequence[float],
    num_classes: int,
) -> list[str]:
  """One line per problem found (empty when none), for the log and the report.

  * the teacher's test accuracy is not above the pixel baseline's;
  * a student's test accuracy is below chance, ``1 / num_classes``.

  ``student_accs`` is ``{name: accuracy}`` or a sequence (named ``student_1``, ...).
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
  if not isinstance(student_accs, Mapping):
    student_accs = {f"student_{i + 1}": a for i, a in enumerate(student_accs)}
  out = []
  if not teacher_acc > baseline_acc:
    out.append(
        f"the teacher's test accuracy {teacher_acc:.4f} does not beat the pixel baseline "
        f"(logistic regression on pixels) {baseline_acc:.4f}: it learned nothing a linear model "
        "does not; train it longer (teacher.epochs, teacher.min_steps) or check the data"
    )
  chance = 1.0 / num_classes
  for name, acc in student_accs.items():
    if acc < chance:
      out.append(
          f"{name}'s test accuracy {acc:.4f} is below chance ({chance:.4f} for {num_classes} "
          "classes): it is broken (diverged, or trained on mislabelled data)"
      )
  return out
