"""Tests of mamba_pkd.losses against hand-computed float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd import losses

# 2 examples x 3 classes.
STUDENT = np.array([[2.0, 1.0, 0.1], [0.5, -1.0, 3.0]], np.float64)
TEACHER = np.array([[1.0, 3.0, -0.5], [0.0, 0.2, 2.0]], np.float64)
LABELS = np.array([0, 2], np.int32)


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _ce64(logits, labels):
  """Per-example cross-entropy by the textbook formula, float64."""
  out = []
  for row, y in zip(np.asarray(logits, np.float64), labels):
    out.append(-row[y] + np.log(np.sum(np.exp(row))))
  return np.array(out)


def _kl64(student, teacher, t):
  """Per-example KL(softmax(teacher/t) || softmax(student/t)), float64."""
  p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
  q = np.exp(student / t) / np.exp(student / t).sum(-1, keepdims=True)
  return np.sum(p * np.log(p / q), axis=-1)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def test_cross_entropy_matches_hand_computed_value():
  # Example 0: -2 + log(e^2 + e^1 + e^0.1); example 1: -3 + log(e^.5+e^-1+e^3).
  expected0 = -2.0 + np.log(np.exp(2.0) + np.exp(1.0) + np.exp(0.1))
  expected1 = -3.0 + np.log(np.exp(0.5) + np.exp(-1.0) + np.exp(3.0))
  np.testing.assert_allclose(_ce64(STUDENT, LABELS), [expected0, expected1])
  got = losses.cross_entropy(_f32(STUDENT), jnp.asarray(LABELS))
  np.testing.assert_allclose(got, (expected0 + expected1) / 2, rtol=1e-6)


def test_zero_weights_exclude_examples():
  per_example = _ce64(STUDENT, LABELS)
  got = losses.cross_entropy(_f32(STUDENT), jnp.asarray(LABELS), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(got, per_example[0], rtol=1e-6)
  # Weighted: (3 * l0 + 1 * l1) / 4.
  got = losses.cross_entropy(_f32(STUDENT), jnp.asarray(LABELS), jnp.array([3.0, 1.0]))
  np.testing.assert_allclose(got, (3 * per_example[0] + per_example[1]) / 4, rtol=1e-6)
  # A padded example with NaN logits contributes nothing either.
  nan_logits = _f32(STUDENT).at[1].set(jnp.nan)
  got = losses.cross_entropy(nan_logits, jnp.asarray(LABELS), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(got, per_example[0], rtol=1e-6)
  kl = _kl64(STUDENT, TEACHER, 2.0)
  got = losses.soft_kl(_f32(STUDENT), _f32(TEACHER), 2.0, jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(got, 4.0 * kl[1], rtol=1e-5)


def test_all_zero_weights_give_zero_not_nan():
  got = losses.cross_entropy(_f32(STUDENT), jnp.asarray(LABELS), jnp.zeros(2))
  assert float(got) == 0.0
  got = losses.kd_loss(
      _f32(STUDENT),
      _f32(TEACHER),
      jnp.asarray(LABELS),
      alpha=0.5,
      temperature=3.0,
      weights=jnp.zeros(2),
  )
  assert float(got) == 0.0


def test_soft_kl_includes_temperature_squared():
  kl = _kl64(STUDENT, TEACHER, 2.0)  # KL of the softened distributions
  got = losses.soft_kl(_f32(STUDENT), _f32(TEACHER), 2.0)
  np.testing.assert_allclose(got, 4.0 * kl.mean(), rtol=1e-5)
  got1 = losses.soft_kl(_f32(STUDENT), _f32(TEACHER), 1.0)
  np.testing.assert_allclose(got1, _kl64(STUDENT, TEACHER, 1.0).mean(), rtol=1e-5)


def test_soft_kl_is_stable_for_large_logits():
  big = 1e3 * STUDENT
  got = losses.soft_kl(_f32(big), _f32(1e3 * TEACHER), 1.0)
  # Reference with log-softmax in float64.
  log_p = _log_softmax64(1e3 * TEACHER)
  log_q = _log_softmax64(big)
  expected = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
  assert np.isfinite(float(got))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_soft_kl_gradient_only_flows_into_student():
  s, t = _f32(STUDENT), _f32(TEACHER)
  grad_t = jax.grad(lambda t_: losses.soft_kl(s, t_, 2.0))(t)
  np.testing.assert_array_equal(grad_t, np.zeros_like(TEACHER))
  grad_s = jax.grad(lambda s_: losses.soft_kl(s_, t, 2.0))(s)
  # d/ds T^2 * mean KL = T^2 / B * (q - p) / T = T / B * (q - p).
  p = np.exp(_log_softmax64(TEACHER / 2.0))
  q = np.exp(_log_softmax64(STUDENT / 2.0))
  np.testing.assert_allclose(grad_s, 2.0 / 2 * (q - p), rtol=1e-5, atol=1e-7)


def test_soft_kl_of_identical_logits_is_zero_with_zero_gradient():
  s = _f32(STUDENT)
  value, grad = jax.value_and_grad(lambda x: losses.soft_kl(x, s, 3.0))(s)
  assert abs(float(value)) < 1e-6
  np.testing.assert_allclose(grad, np.zeros_like(STUDENT), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_mixes_hard_and_soft(alpha):
  t = 4.0
  hard64 = _ce64(STUDENT, LABELS).mean()
  soft64 = t**2 * _kl64(STUDENT, TEACHER, t).mean()
  got = losses.kd_loss(
      _f32(STUDENT), _f32(TEACHER), jnp.asarray(LABELS), alpha=alpha, temperature=t
  )
  np.testing.assert_allclose(got, alpha * hard64 + (1 - alpha) * soft64, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(alpha=-0.1, temperature=2.0), "alpha"),
        (dict(alpha=1.5, temperature=2.0), "alpha"),
        (dict(alpha=0.5, temperature=0.0), "temperature"),
        (dict(alpha=0.5, temperature=-1.0), "temperature"),
        (dict(alpha=0.5, temperature=float("nan")), "temperature"),
    ],
)
def test_bad_alpha_or_temperature_raise_value_error(kwargs, field):
  with pytest.raises(ValueError, match=field):
    losses.kd_loss(_f32(STUDENT), _f32(TEACHER), jnp.asarray(LABELS), **kwargs)
  with pytest.raises(ValueError, match=field):
    losses.kd(view="student", **kwargs)


def test_shape_errors_name_the_argument():
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(_f32(STUDENT), jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match="teacher_logits"):
    losses.soft_kl(_f32(STUDENT), _f32(TEACHER[:, :2]), 1.0)
  with pytest.raises(ValueError, match="weights"):
    losses.cross_entropy(_f32(STUDENT), jnp.asarray(LABELS), jnp.ones(3))
  with pytest.raises(ValueError, match="'prefix'"):
    losses.hard("prefix")({"student": _f32(STUDENT)}, jnp.asarray(LABELS), None)


def test_residual_view_stops_gradient_into_base():
  view = losses.residual("student", base="prefix")
  s, p = _f32(STUDENT), _f32(TEACHER)

  def loss(student, prefix):
    out = view({"student": student, "prefix": prefix})
    return jnp.sum(out * jnp.arange(1.0, 7.0).reshape(2, 3))

  np.testing.assert_allclose(view({"student": s, "prefix": p}), STUDENT + TEACHER, rtol=1e-6)
  g_s, g_p = jax.grad(loss, argnums=(0, 1))(s, p)
  np.testing.assert_array_equal(g_s, np.arange(1.0, 7.0).reshape(2, 3))
  np.testing.assert_array_equal(g_p, np.zeros((2, 3)))
  # Missing base (first student): the view is the student alone.
  np.testing.assert_array_equal(view({"student": s}), s)


def test_composed_kd_equals_kd_loss_and_names_metrics():
  s, t, y = _f32(STUDENT), _f32(TEACHER), jnp.asarray(LABELS)
  prefix = _f32([[0.5, -0.5, 0.0], [1.0, 0.0, -1.0]])
  w = jnp.array([1.0, 2.0])
  stage = losses.kd(alpha=0.5, temperature=4.0, view=losses.residual("student", base="prefix"))
  loss, metrics = jax.jit(stage)({"student": s, "teacher": t, "prefix": prefix}, y, w)
  direct = losses.kd_loss(s + prefix, t, y, alpha=0.5, temperature=4.0, weights=w)
  np.testing.assert_allclose(loss, direct, rtol=1e-6)
  assert set(metrics) == {"loss/hard", "loss/soft"}
  np.testing.assert_allclose(
      metrics["loss/hard"], losses.cross_entropy(s + prefix, y, w), rtol=1e-6
  )
  np.testing.assert_allclose(
      0.5 * metrics["loss/hard"] + 0.5 * metrics["loss/soft"], loss, rtol=1e-6
  )

  # Gradient w.r.t. the trained student equals that of the direct loss;
  # none flows into the frozen prefix or teacher.
  def composed(student, prefix_, teacher):
    return stage({"student": student, "teacher": teacher, "prefix": prefix_}, y, w)[0]

  g_s, g_p, g_t = jax.grad(composed, argnums=(0, 1, 2))(s, prefix, t)
  g_direct = jax.grad(
      lambda x: losses.kd_loss(x + prefix, t, y, alpha=0.5, temperature=4.0, weights=w)
  )(s)
  np.testing.assert_allclose(g_s, g_direct, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(g_p, np.zeros((2, 3)))
  np.testing.assert_array_equal(g_t, np.zeros((2, 3)))


def test_chain_and_teacher_stages():
  s, prev, y = _f32(STUDENT), _f32(TEACHER), jnp.asarray(LABELS)
  chain = losses.kd(0.5, 4.0, view="student", target="previous")
  loss, _ = chain({"student": s, "previous": prev}, y, None)
  np.testing.assert_allclose(
      loss, losses.kd_loss(s, prev, y, alpha=0.5, temperature=4.0), rtol=1e-6
  )
  teacher_stage = losses.hard("student")
  loss, metrics = teacher_stage({"student": s}, y, None)
  np.testing.assert_allclose(loss, _ce64(STUDENT, LABELS).mean(), rtol=1e-6)
  assert list(metrics) == ["loss/hard"]


def test_weighted_sum_and_metric_name_collisions():
  s, t, y = _f32(STUDENT), _f32(TEACHER), jnp.asarray(LABELS)
  logits = {"student": s, "teacher": t}
  stage = losses.weighted_sum((2.0, losses.hard()), (0.25, losses.soft(temperature=2.0)))
  loss, metrics = stage(logits, y, None)
  expected = 2.0 * _ce64(STUDENT, LABELS).mean() + 0.25 * 4.0 * _kl64(STUDENT, TEACHER, 2.0).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert set(metrics) == {"loss/hard", "loss/soft"}
  clash = losses.weighted_sum((1.0, losses.hard("student")), (1.0, losses.hard("teacher")))
  with pytest.raises(ValueError, match="loss/hard"):
    clash(logits, y, None)
  ok = losses.weighted_sum(
      (1.0, losses.hard("student")), (1.0, losses.hard("teacher", name="loss/hard_t"))
  )
  loss, metrics = ok(logits, y, None)
  np.testing.assert_allclose(
      loss, _ce64(STUDENT, LABELS).mean() + _ce64(TEACHER, LABELS).mean(), rtol=1e-5
  )
  with pytest.raises(ValueError, match="alpha"):
    losses.mix(2.0, losses.hard(), losses.soft())


def test_adversary_weights_match_reference_and_are_normalised():
  g = np.array([[2.0, -1.0], [0.0, 0.5]])
  f = np.array([[1.0, 0.0], [0.5, 0.5]])
  k_plus, k_minus = losses.adversary_weights(_f32(g), _f32(f), scale=0.5)
  d = 0.5 * (g - f)
  z = np.exp(d).sum() + np.exp(-d).sum()
  np.testing.assert_allclose(k_plus, np.exp(d) / z, rtol=1e-6)
  np.testing.assert_allclose(k_minus, np.exp(-d) / z, rtol=1e-6)
  np.testing.assert_allclose(float(k_plus.sum() + k_minus.sum()), 1.0, rtol=1e-6)
  # Padded example (weight 0) gets no weight; the rest renormalise.
  k_plus, k_minus = losses.adversary_weights(_f32(g), _f32(f), weights=jnp.array([1.0, 0.0]))
  np.testing.assert_array_equal(k_plus[1], [0.0, 0.0])
  d0 = g[0] - f[0]
  z0 = np.exp(d0).sum() + np.exp(-d0).sum()
  np.testing.assert_allclose(k_plus[0], np.exp(d0) / z0, rtol=1e-6)
  # Huge differences do not overflow.
  k_plus, k_minus = losses.adversary_weights(_f32(1e4 * g), _f32(f))
  assert np.all(np.isfinite(k_plus)) and np.all(np.isfinite(k_minus))


def test_bdistil_loss_matches_reference_and_is_stable():
  x = np.array([[0.3, -2.0], [1.5, 0.0]])
  kp = np.array([[0.1, 0.2], [0.3, 0.05]])
  km = np.array([[0.05, 0.1], [0.1, 0.1]])
  f = np.tanh(x)
  expected = -np.sum(kp * np.log(1 + f) + km * np.log(1 - f))
  got = losses.bdistil_loss(_f32(x), _f32(kp), _f32(km))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Saturated heads: finite loss, finite non-zero gradient pushing back.
  big = _f32([[50.0, -50.0]])
  value, grad = jax.value_and_grad(losses.bdistil_loss)(big, _f32([[0.0, 0.5]]), _f32([[0.5, 0.0]]))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, [[1.0, -1.0]], rtol=1e-5)  # d/dx of 2|x|/2


def test_weak_learner_edge_sign_follows_agreement():
  g = np.array([[3.0, -1.0, 0.0], [-2.0, 2.0, 1.0]])
  prefix = np.zeros_like(g)
  k_plus, k_minus = losses.adversary_weights(_f32(g), _f32(prefix))
  residual_sign = np.sign(g - prefix)
  agree = losses.weak_learner_edge(_f32(5.0 * residual_sign), k_plus, k_minus)
  oppose = losses.weak_learner_edge(_f32(-5.0 * residual_sign), k_plus, k_minus)
  assert 0.0 < float(agree) <= 1.0
  assert -1.0 <= float(oppose) < 0.0
  np.testing.assert_allclose(agree, -oppose, rtol=1e-6)
  # Hand value: sum (K+ - K-) tanh(f).
  expected = np.sum((np.asarray(k_plus) - np.asarray(k_minus)) * np.tanh(5.0 * residual_sign))
  np.testing.assert_allclose(agree, expected, rtol=1e-6)
  # The log barrier is lower for the agreeing student.
  assert float(losses.bdistil_loss(_f32(residual_sign), k_plus, k_minus)) < (
      float(losses.bdistil_loss(_f32(-residual_sign), k_plus, k_minus))
  )


def test_bdistil_stage_term():
  g = _f32([[3.0, -1.0, 0.0], [-2.0, 2.0, 1.0]])
  prefix = _f32([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  s = _f32(STUDENT)
  term = losses.bdistil(view="student", target="teacher", base="prefix", scale=2.0)
  loss, metrics = jax.jit(term)(
      {"student": s, "teacher": g, "prefix": prefix}, jnp.asarray(LABELS), None
  )
  k_plus, k_minus = losses.adversary_weights(g, prefix, scale=2.0)
  np.testing.assert_allclose(loss, losses.bdistil_loss(s, k_plus, k_minus), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["bdistil/edge"], losses.weak_learner_edge(s, k_plus, k_minus), rtol=1e-6
  )
  assert set(metrics) == {"loss/bdistil", "bdistil/edge"}
  with pytest.raises(ValueError, match="scale"):
    losses.bdistil(scale=0.0)
