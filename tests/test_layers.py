"""Layers against hand-written NumPy (float64) step-by-step recurrences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd import layers


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


@pytest.mark.parametrize("method", ["sequential", "fused"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mixer_matches_step_by_step_recurrence(bidirectional, method):
  """ "fused" with bidirectional=True runs both branches in one fused scan."""
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


def test_bidirectional_fused_mixer_equals_sequential_in_params_values_and_gradients():
  hidden = jax.random.normal(jax.random.key(3), (5, 11, 8))
  mixers = {
      m: layers.MambaMixer(d_model=8, d_state=4, bidirectional=True, scan_method=m)
      for m in ("sequential", "fused")
  }
  params = {m: mixer.init(jax.random.key(0), hidden)["params"] for m, mixer in mixers.items()}
  assert jax.tree.structure(params["fused"]) == jax.tree.structure(params["sequential"])
  jax.tree.map(np.testing.assert_array_equal, params["fused"], params["sequential"])
  p = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params["fused"]
  )
  out = {}
  for m, mixer in mixers.items():
    loss = lambda q, mixer=mixer: jnp.sum(jnp.sin(mixer.apply({"params": q}, hidden)))
    out[m] = jax.jit(jax.value_and_grad(loss))(p)
  np.testing.assert_allclose(out["fused"][0], out["sequential"][0], rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(out["fused"][1]), jax.tree.leaves(out["sequential"][1])):
    assert float(jnp.max(jnp.abs(g - g_ref))) <= 1e-4 * float(jnp.max(jnp.abs(g_ref)))


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
