"""The pixel baseline (against hand-computed cases and scikit-learn) and the sanity warnings."""

import numpy as np
import pytest

from mamba_pkd import sanity


def _one_bright_pixel(n_per_class=20, seed=0):
  """4 classes of 2x2x1 uint8 images: class k has pixel k bright (200-255), others dark."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 40, size=(4 * n_per_class, 2, 2, 1)).astype(np.uint8)
  y = np.repeat(np.arange(4), n_per_class)
  flat = x.reshape(len(x), -1)
  flat[np.arange(len(x)), y] = rng.integers(200, 256, size=len(x))
  return flat.reshape(x.shape), y


@pytest.mark.parametrize("method", sanity.METHODS)
def test_linearly_separable_data_is_fitted_exactly(method):
  x, y = _one_bright_pixel()
  model = sanity.fit_pixel_baseline(x, y, 4, method=method)
  assert model.accuracy(x, y) == 1.0
  x_new, y_new = _one_bright_pixel(seed=1)
  np.testing.assert_array_equal(model(x_new), y_new)


def test_nearest_mean_on_two_points_by_hand():
  # Pixels 0 and 1: mean 0.5, std 0.5, so the standardised points are -1 and +1 and the
  # class means are m0 = -1, m1 = +1; logits z * m_k - m_k^2 / 2.
  x = np.array([[0.0], [1.0]])
  model = sanity.fit_pixel_baseline(x, np.array([0, 1]), 2, method="nearest_mean")
  z = (0.4 - 0.5) / 0.5  # -0.2
  np.testing.assert_allclose(model.logits(np.array([[0.4]])), [[z * -1 - 0.5, z * 1 - 0.5]])
  np.testing.assert_array_equal(model(np.array([[0.4], [0.6], [-3.0], [7.0]])), [0, 1, 0, 1])


def test_nearest_mean_never_predicts_an_absent_class():
  x = np.array([[0.0], [1.0]])
  model = sanity.fit_pixel_baseline(x, np.array([0, 2]), 3, method="nearest_mean")
  assert set(model(np.linspace(-5, 5, 21)[:, None]).tolist()) == {0, 2}


def test_logistic_on_two_symmetric_points_splits_in_the_middle():
  model = sanity.fit_pixel_baseline(np.array([[0.0], [1.0]]), np.array([0, 1]), 2)
  np.testing.assert_array_equal(model(np.array([[0.49], [0.51]])), [0, 1])
  logits = model.logits(np.array([[0.5]]))
  assert abs(logits[0, 0] - logits[0, 1]) < 1e-9  # the midpoint is the boundary (symmetry)


def test_logistic_matches_scikit_learn_on_digits():
  """Same objective (mean CE + l2/2 |W|^2, bias free) as sklearn's with C = 1 / (n * l2)."""
  from sklearn import datasets, linear_model  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  x = np.rint(digits.images * 255 / 16).astype(np.uint8)[..., None]
  y = digits.target
  train, test = np.arange(0, 1400), np.arange(1400, len(y))
  l2 = 1e-2
  ours = sanity.fit_pixel_baseline(x[train], y[train], 10, l2=l2, steps=800)
  z = lambda rows: (x[rows].reshape(len(rows), -1) / 255.0 - ours.mean) / ours.scale
  ref = linear_model.LogisticRegression(C=1 / (len(train) * l2), tol=1e-8, max_iter=2000)
  ref.fit(z(train), y[train])

  def softmax(a):
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

  np.testing.assert_allclose(softmax(ours.logits(x[test])), ref.predict_proba(z(test)), atol=2e-3)
  assert ours.accuracy(x[test], y[test]) == pytest.approx(ref.score(z(test), y[test]), abs=0.005)
  assert ours.accuracy(x[test], y[test]) > 0.85


def test_bad_arguments():
  x, y = _one_bright_pixel()
  with pytest.raises(ValueError, match="method must be one of"):
    sanity.fit_pixel_baseline(x, y, 4, method="svm")
  with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[0, 3\]"):
    sanity.fit_pixel_baseline(x, y, 3)


def test_sanity_warnings():
  assert sanity.sanity_warnings(0.98, 0.92, {"student_1": 0.95}, 10) == []
  w = sanity.sanity_warnings(0.90, 0.92, [0.95, 0.05], 10)
  assert len(w) == 2
  assert w[0].startswith(
      "the teacher's test accuracy 0.9000 does not beat the pixel baseline "
      "(logistic regression on pixels) 0.9200"
  )
  assert w[1].startswith("student_2's test accuracy 0.0500 is below chance (0.1000 for 10 classes)")
  assert sanity.sanity_warnings(0.92, 0.92, {}, 2)[0].startswith("the teacher's")  # a tie: no
  assert sanity.sanity_warnings(0.99, 0.5, {"s": 0.5}, 2) == []  # exactly chance: not below
  assert all("\n" not in line for line in w)
