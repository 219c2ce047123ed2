"""Layers against hand-written NumPy (float64) step-by-step recurrences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd import layers
from mamba_pkd.ssm import native


def _skip_without_native(method="native"):
  if method == "native" and not native.native_available()[0]:
    pytest.skip(f"native kernel unavailable: {native.native_available()[1]}")


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _softplus(x):
  return np.log1p(np.exp(x))


def _mixer_reference(p, hidden, *, d_state, dt_rank, d_conv, bidirectional):
  """Mamba mixer written as an explicit loop over time, float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  hidden = np.asarray(hidden, np.float64)
  batch, length, _ = hidden.shape
  xz = hidden @ p["in_proj"]["kernel"]
  x, z = np.split(xz, 2, axis=-1)
  d_inner = x.shape[-1]

  def branch(x, sfx, a_name):
    conv_k = p["conv1d" + sfx]["kernel"][:, 0, :]  # [K, E]
    xc = np.zeros_like(x)
    for t in range(length):  # causal depthwise conv
      acc = p["conv1d" + sfx]["bias"].copy()
      for j in range(d_conv):
        src = t - (d_conv - 1) + j
        if src >= 0:
          acc = acc + conv_k[j] * x[:, src]
      xc[:, t] = acc
    xc = _silu(xc)
    dbl = xc @ p["x_proj" + sfx]["kernel"]
    dt_low, b_mat, c_mat = (
        dbl[..., :dt_rank],
        dbl[..., dt_rank : dt_rank + d_state],
        dbl[..., dt_rank + d_state :],
    )
    dt = _softplus(dt_low @ p["dt_proj" + sfx]["kernel"] + p["dt_proj" + sfx]["bias"])
    a = -np.exp(p[a_name])  # [E, N]
    h = np.zeros((batch, d_inner, d_state))
    y = np.zeros_like(xc)
    for t in range(length):
      h = (
          np.exp(dt[:, t, :, None] * a) * h
          + dt[:, t, :, None] * b_mat[:, t, None, :] * xc[:, t, :, None]
      )
      y[:, t] = np.einsum("ben,bn->be", h, c_mat[:, t]) + p["D" + sfx] * xc[:, t]
    return y

  y = branch(x, "", "A_log")
  if bidirectional:
    y = y + branch(x[:, ::-1], "_b", "A_b_log")[:, ::-1]
  y = y * _silu(z)
  return y @ p["out_proj"]["kernel"]


@pytest.mark.parametrize("method", ["sequential", "fused", "native"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mixer_matches_step_by_step_recurrence(bidirectional, method):
  """ "fused" with bidirectional=True runs both branches in one fused scan; "native"
  also runs the convolution and its SiLU in the C++ kernel."""
  _skip_without_native(method)
  mixer = layers.MambaMixer(
      d_model=8,
      d_state=3,
      d_conv=3,
      expand=2,
      bidirectional=bidirectional,
      scan_method=method,
  )
  hidden = jax.random.normal(jax.random.key(1), (2, 7, 8))
  params = mixer.init(jax.random.key(0), hidden)["params"]
  # Perturb D and A_log so that neither sits at its special initial value.
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  out = mixer.apply({"params": params}, hidden)
  ref = _mixer_reference(
      params, hidden, d_state=3, dt_rank=1, d_conv=3, bidirectional=bidirectional
  )
  np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["fused", "native"])
def test_bidirectional_mixer_equals_sequential_in_params_values_and_gradients(method):
  _skip_without_native(method)
  hidden = jax.random.normal(jax.random.key(3), (5, 11, 8))
  mixers = {
      m: layers.MambaMixer(d_model=8, d_state=4, bidirectional=True, scan_method=m)
      for m in ("sequential", method)
  }
  params = {m: mixer.init(jax.random.key(0), hidden)["params"] for m, mixer in mixers.items()}
  assert jax.tree.structure(params[method]) == jax.tree.structure(params["sequential"])
  jax.tree.map(np.testing.assert_array_equal, params[method], params["sequential"])
  p = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params[method]
  )
  out = {}
  for m, mixer in mixers.items():
    loss = lambda q, mixer=mixer: jnp.sum(jnp.sin(mixer.apply({"params": q}, hidden)))
    out[m] = jax.jit(jax.value_and_grad(loss))(p)
  np.testing.assert_allclose(out[method][0], out["sequential"][0], rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(out[method][1]), jax.tree.leaves(out["sequential"][1])):
    assert float(jnp.max(jnp.abs(g - g_ref))) <= 1e-4 * float(jnp.max(jnp.abs(g_ref)))


def _conv_loop(x, kernel, bias, silu):
  """The causal depthwise conv (+ SiLU) as a float64 NumPy loop over time and taps."""
  x, kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, bias))
  taps, length = kernel.shape[0], x.shape[1]
  out = np.zeros_like(x)
  for t in range(length):
    acc = bias.copy()
    for k in range(taps):
      if t - (taps - 1) + k >= 0:
        acc = acc + kernel[k, 0] * x[:, t - (taps - 1) + k]
    out[:, t] = _silu(acc) if silu else acc
  return out


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape", [(3, 9, 5, 4), (2, 2, 7, 4), (4, 16, 33, 3)])
def test_native_conv_gradient_matches_float64_autodiff(shape, silu):
  """The layer with native=True: values against a float64 loop, and the C++ backward's
  gradients (x, kernel, bias) against XLA's autodiff of the shifted sums in float64,
  including L < K."""
  _skip_without_native()
  batch, length, channels, taps = shape
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal((batch, length, channels)).astype(np.float32)
  kernel = rng.standard_normal((taps, 1, channels)).astype(np.float32)
  bias = rng.standard_normal(channels).astype(np.float32)
  weights = rng.standard_normal(x.shape).astype(np.float32)

  def loss(x, kernel, bias, on_native):
    conv = layers.CausalDepthwiseConv1d(taps, silu=silu, native=on_native)
    return jnp.sum(weights * conv.apply({"params": {"kernel": kernel, "bias": bias}}, x))

  conv = layers.CausalDepthwiseConv1d(taps, silu=silu, native=True)
  out = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(out, _conv_loop(x, kernel, bias, silu), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(x, kernel, bias, True)
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (x, kernel, bias)]
    ref = [np.asarray(r) for r in jax.grad(loss, (0, 1, 2))(*args, False)]
  for g, r in zip(grads, ref):
    assert g.dtype == jnp.float32 and g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_native_conv_gradient_does_not_depend_on_threads():
  """Rows are independent; the kernel and bias gradients are per-row partials summed by
  JAX in a fixed order: 1 and 3 threads give bit-identical gradients."""
  _skip_without_native()
  rng = np.random.default_rng(0)
  x, gy = (jnp.asarray(rng.standard_normal((7, 13, 24)), jnp.float32) for _ in range(2))
  kernel = jnp.asarray(rng.standard_normal((4, 1, 24)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(24), jnp.float32)
  run = lambda threads: native.causal_conv_backward(x, kernel, bias, gy, threads=threads)
  for a, b in zip(run(1), run(3)):
    np.testing.assert_array_equal(a, b)


def test_mixer_parameter_names_and_shapes_follow_reference_mamba():
  mixer = layers.MambaMixer(d_model=32, d_state=16, d_conv=4, expand=2)
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 5, 32)))["params"]
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
      "in_proj": {"kernel": (32, 128)},
      "conv1d": {"kernel": (4, 1, 64), "bias": (64,)},
      "x_proj": {"kernel": (64, 2 + 32)},  # dt_rank = ceil(32 / 16) = 2
      "dt_proj": {"kernel": (2, 64), "bias": (64,)},
      "A_log": (64, 16),
      "D": (64,),
      "out_proj": {"kernel": (64, 32)},
  }


def test_mixer_initialisation_follows_reference():
  mixer = layers.MambaMixer(d_model=32, d_state=4, dt_min=0.001, dt_max=0.1)
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 5, 32)))["params"]
  # S4D-real: A = -exp(A_log) = -(1, 2, ..., N) for every channel; D = 1.
  np.testing.assert_allclose(
      -np.exp(params["A_log"]), -np.tile(np.arange(1.0, 5.0), (64, 1)), rtol=1e-6
  )
  np.testing.assert_array_equal(params["D"], np.ones(64))
  # softplus(dt bias) lies in [dt_min, dt_max].
  dt = _softplus(np.asarray(params["dt_proj"]["bias"], np.float64))
  assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
  assert np.log(dt).std() > 0.5  # log-uniform spread, not a constant


def test_rmsnorm_matches_formula():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  norm = layers.RMSNorm(eps=1e-5)
  params = {"weight": jnp.arange(1.0, 6.0)}
  out = norm.apply({"params": params}, x)
  xn = np.asarray(x, np.float64)
  ref = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * np.arange(1.0, 6.0)
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_patch_embed_tokens_and_bad_patch_size():
  embed = layers.PatchEmbed(patch_size=4, d_model=6)
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  params = embed.init(jax.random.key(1), images)["params"]
  tokens = embed.apply({"params": params}, images)
  assert tokens.shape == (2, 6, 6)
  # Token 1 is the patch at row 0, column 1: a plain matmul of its pixels.
  patch = np.asarray(images[:, 0:4, 4:8, :]).reshape(2, -1)
  kernel = np.asarray(params["proj"]["kernel"]).reshape(-1, 6)
  np.testing.assert_allclose(
      tokens[:, 1], patch @ kernel + params["proj"]["bias"], rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="patch_size=5"):
    layers.PatchEmbed(patch_size=5, d_model=6).init(jax.random.key(0), images)


def test_dt_rank_validation():
  assert layers.resolve_dt_rank(64) == 4 and layers.resolve_dt_rank(65) == 5
  with pytest.raises(ValueError, match="dt_rank"):
    layers.resolve_dt_rank(16, 0)
