"""Tests of the Pallas selective-scan kernel (interpret mode on CPU).

Values and gradients of `selective_scan_pallas` are compared with the float64
NumPy reference of `tests/scan_reference.py` (forward recurrence and
hand-derived backpropagation through time, itself checked by finite
differences in `tests/test_scan.py`) and with the `"sequential"` method of
`mamba_pkd.ssm.scan` (autodiff gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd.ssm import pallas_scan
from mamba_pkd.ssm.pallas_scan import selective_scan_pallas
import scan_reference
from scan_reference import ARG_NAMES
from scan_reference import reference_scan

F32_RTOL = 1e-5  # max |kernel - reference| / max |reference|, float32
BF16_RTOL = 2e-2  # same, bfloat16 inputs/outputs (8-bit mantissa)


def make_inputs(batch, seq_len, d_inner, n, seed=0, softplus=True):
  """Random float32 inputs in the range Mamba sees; dict of NumPy arrays."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  delta = f(batch, seq_len, d_inner)
  if not softplus:  # raw delta is the step size: keep it positive
    delta = np.abs(delta) + np.float32(0.05)
  return {
      "u": f(batch, seq_len, d_inner),
      "delta": delta,
      "A": -np.exp(0.5 * f(d_inner, n)).astype(np.float32),
      "B": f(batch, seq_len, n),
      "C": f(batch, seq_len, n),
      "D": f(d_inner),
      "delta_bias": (0.5 * f(d_inner)).astype(np.float32),
  }


def kernel_value_and_grads(inputs, gy, use_d, use_bias, dtype=jnp.float32, **kwargs):
  """y and the VJP of `selective_scan_pallas` for cotangent gy, one jit."""
  args = [jnp.asarray(inputs[k]) for k in ARG_NAMES]
  for i in (0, 1, 3, 4):  # u, delta, B, C in the tested dtype
    args[i] = args[i].astype(dtype)

  def f(u, delta, A, B, C, D, delta_bias):
    return selective_scan_pallas(
        u,
        delta,
        A,
        B,
        C,
        D if use_d else None,
        delta_bias=delta_bias if use_bias else None,
        **kwargs,
    )

  @jax.jit
  def run(*args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(jnp.asarray(gy, dtype))

  y, grads = run(*args)
  return y, dict(zip(ARG_NAMES, grads))


def rel_err(actual, expected):
  """scan_reference.rel_err, accepting bfloat16 ``actual``."""
  return scan_reference.rel_err(jnp.asarray(actual, jnp.float32), expected)


# ----------------------------------------------------------------------------
# Kernel against the float64 reference.

CASES = [
    # (batch, L, d_inner, N, kwargs, use_d, use_bias)
    # d_inner 24 padded to 32 with block_d 16, N 5 padded to 8, L = 3 + 2*4.
    pytest.param(
        2, 11, 24, 5, dict(block_d=16, chunk_size=4), True, True, id="pad_d_pad_n_partial_chunk"
    ),
    pytest.param(
        2,
        11,
        24,
        5,
        dict(
            block_d=16, chunk_size=4, reverse=True, delta_softplus=False, prefetch=3, prefetch_bwd=1
        ),
        False,
        False,
        id="reverse_no_softplus_no_D_no_bias",
    ),
    pytest.param(1, 1, 16, 16, dict(), True, True, id="L1_batch1_defaults"),
    pytest.param(
        2,
        9,
        32,
        16,
        dict(block_d=8, chunk_size=3, reverse=True, prefetch=0),
        True,
        True,
        id="reverse_full_chunks_no_prefetch",
    ),
    pytest.param(
        1,
        6,
        16,
        4,
        dict(block_d=32, chunk_size=64, prefetch=3),
        True,
        False,
        id="block_wider_than_d_chunk_longer_than_L",
    ),
]


@pytest.mark.parametrize("batch,seq_len,d_inner,n,kwargs,use_d,use_bias", CASES)
def test_values_and_gradients_match_float64_reference(
    batch, seq_len, d_inner, n, kwargs, use_d, use_bias
):
  softplus = kwargs.get("delta_softplus", True)
  inputs = make_inputs(batch, seq_len, d_inner, n, softplus=softplus)
  gy = np.random.default_rng(7).standard_normal((batch, seq_len, d_inner)).astype(np.float32)
  y, grads = kernel_value_and_grads(inputs, gy, use_d, use_bias, interpret=True, **kwargs)
  ref_inputs = dict(
      inputs,
      D=inputs["D"] if use_d else None,
      delta_bias=inputs["delta_bias"] if use_bias else None,
  )
  y_ref, grads_ref = reference_scan(
      **ref_inputs, delta_softplus=softplus, reverse=kwargs.get("reverse", False), gy=gy
  )
  assert y.dtype == jnp.float32 and y.shape == (batch, seq_len, d_inner)
  assert rel_err(y, y_ref) <= F32_RTOL
  for name in ARG_NAMES:
    if (name == "D" and not use_d) or (name == "delta_bias" and not use_bias):
      np.testing.assert_array_equal(np.asarray(grads[name]), 0.0)
      continue
    assert grads[name].dtype == jnp.float32, name
    err = rel_err(grads[name], grads_ref[name])
    assert err <= F32_RTOL, f"grad {name}: relative error {err:.2e}"


def test_bfloat16_inputs_within_tolerance():
  inputs = make_inputs(2, 7, 24, 16, seed=4)
  # Round the low-precision inputs once so the reference sees the same values.
  for k in ("u", "delta", "B", "C"):
    inputs[k] = np.asarray(jnp.asarray(inputs[k], jnp.bfloat16), np.float32)
  gy = np.asarray(
      jnp.asarray(np.random.default_rng(5).standard_normal((2, 7, 24)), jnp.bfloat16), np.float32
  )
  y, grads = kernel_value_and_grads(
      inputs,
      gy,
      True,
      True,
      dtype=jnp.bfloat16,
      block_d=16,
      chunk_size=4,
      prefetch=1,
      interpret=True,
  )
  y_ref, grads_ref = reference_scan(**inputs, gy=gy)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y, y_ref) <= BF16_RTOL
  for name in ARG_NAMES:
    expected_dtype = jnp.bfloat16 if name in ("u", "delta", "B", "C") else (jnp.float32)
    assert grads[name].dtype == expected_dtype, name
    err = rel_err(grads[name], grads_ref[name])
    assert err <= BF16_RTOL, f"grad {name}: relative error {err:.2e}"


def test_matches_sequential_method_values_and_autodiff_gradients():
  scan = pytest.importorskip("mamba_pkd.ssm.scan")
  inputs = {k: jnp.asarray(v) for k, v in make_inputs(2, 13, 40, 16, seed=6).items()}
  w = jnp.asarray(np.random.default_rng(8).standard_normal((2, 13, 40)), jnp.float32)

  def loss(fn, reverse):
    def f(u, delta, A, B, C, D, delta_bias):
      return jnp.sum(w * fn(u, delta, A, B, C, D, delta_bias=delta_bias, reverse=reverse))

    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(7))))

  kernel = lambda *a, **k: selective_scan_pallas(
      *a, block_d=16, chunk_size=5, prefetch=1, interpret=True, **k
  )
  sequential = lambda *a, **k: scan.selective_scan(*a, method="sequential", **k)
  args = [inputs[k] for k in ARG_NAMES]
  for reverse in (False, True):
    value, grads = loss(kernel, reverse)(*args)
    value_ref, grads_ref = loss(sequential, reverse)(*args)
    assert abs(float(value) - float(value_ref)) <= F32_RTOL * max(1.0, abs(float(value_ref)))
    for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref):
      err = rel_err(g, np.asarray(g_ref))
      assert err <= F32_RTOL, f"grad {name} reverse={reverse}: {err:.2e}"


# ----------------------------------------------------------------------------
# Argument checking.


def _small_args(batch=1, seq_len=3, d_inner=8, n=4):
  inputs = make_inputs(batch, seq_len, d_inner, n)
  return [jnp.asarray(inputs[k]) for k in ("u", "delta", "A", "B", "C", "D")]


@pytest.mark.parametrize("block_d", [12, 0, -4, 2048, 16.0])
def test_bad_block_d_raises_value_error_naming_it(block_d):
  with pytest.raises(ValueError, match=r"block_d=.*power of two"):
    selective_scan_pallas(*_small_args(), block_d=block_d, interpret=True)


def test_bad_shapes_and_chunk_size_raise_value_error():
  u, delta, A, B, C, D = _small_args()
  with pytest.raises(
      ValueError, match=r"B has shape \(1, 3, 5\); expected " r"\(batch, L, N\) = \(1, 3, 4\)"
  ):
    selective_scan_pallas(u, delta, A, jnp.zeros((1, 3, 5)), C, D)
  with pytest.raises(ValueError, match=r"delta has shape"):
    selective_scan_pallas(u, delta[:, :2], A, B, C, D)
  with pytest.raises(ValueError, match=r"D has shape \(7,\)"):
    selective_scan_pallas(u, delta, A, B, C, D[:7])
  with pytest.raises(ValueError, match=r"chunk_size=0"):
    selective_scan_pallas(u, delta, A, B, C, D, chunk_size=0)
  with pytest.raises(ValueError, match=r"num_warps=3"):
    selective_scan_pallas(u, delta, A, B, C, D, num_warps=3)
  with pytest.raises(ValueError, match=r"prefetch=-1"):
    selective_scan_pallas(u, delta, A, B, C, D, prefetch=-1)
  with pytest.raises(ValueError, match=r"prefetch_bwd=17"):
    selective_scan_pallas(u, delta, A, B, C, D, prefetch_bwd=17)


# ----------------------------------------------------------------------------
# The compiled path, as far as a CPU can check it.


def test_triton_lowering_succeeds_for_forward_and_backward():
  """Lowers the compiled (non-interpret) kernels to Triton IR for CUDA.

  Runs the Pallas Triton lowering on CPU: catches non-power-of-two in-kernel
  arrays and primitives without a Triton lowering rule before a GPU sees them.
  """
  ok, reason = pallas_scan.pallas_available(interpret=False)
  if not ok:
    pytest.skip(reason)
  sds = jax.ShapeDtypeStruct
  batch, seq_len, d_inner, n = 2, 49, 48, 16  # L not a power of two
  args = (
      sds((batch, seq_len, d_inner), jnp.bfloat16),
      sds((batch, seq_len, d_inner), jnp.bfloat16),
      sds((d_inner, n), jnp.float32),
      sds((batch, seq_len, n), jnp.bfloat16),
      sds((batch, seq_len, n), jnp.bfloat16),
      sds((d_inner,), jnp.float32),
      sds((d_inner,), jnp.float32),
  )

  def loss(u, delta, A, B, C, D, bias):
    y = selective_scan_pallas(
        u, delta, A, B, C, D, delta_bias=bias, reverse=True, interpret=False, block_d=32
    )
    return jnp.sum(y.astype(jnp.float32))

  grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
  text = grad_fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  # The forward (saving chunk states) and the backward kernel.
  assert text.count("triton") >= 2
