"""Tests of mamba_pkd.ssm.scan: every method against an independent float64 NumPy loop.

Relative error, everywhere in this file: ``max|x - ref| / max|ref|`` (max over all
elements of the array).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from mamba_pkd.ssm import SCAN_METHODS
from mamba_pkd.ssm import scan as scan_lib
from mamba_pkd.ssm import selective_scan

METHODS = ("sequential", "parallel", "chunked", "fused", "pallas")
CHUNK = 16  # chunk_size of "chunked"; L = 37 and 784 are not multiples of it
F32_RTOL = 1e-5  # values vs the float64 reference (the bar)
GRAD_RTOL = 1e-4  # float32 gradients of one method vs another
BF16_RTOL = 2e-2  # bfloat16 inputs vs the float32 result
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def selective_scan_reference_numpy(
    u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, reverse=False
):
  """Float64 loop over time, written from the Mamba equations (not from scan.py).

  Shapes: u, delta [b, L, d]; A [d, n]; B, C [b, L, n]; D, delta_bias [d].
  Returns y [b, L, d] float64.
  """
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  batch, length, d_inner = u.shape
  dt = delta + (0.0 if delta_bias is None else np.asarray(delta_bias, np.float64))
  if delta_softplus:
    dt = np.logaddexp(0.0, dt)  # softplus, overflow-safe
  h = np.zeros((batch, d_inner, A.shape[1]))
  y = np.zeros((batch, length, d_inner))
  for t in (range(length - 1, -1, -1) if reverse else range(length)):
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
    y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  return y


def make_inputs(batch, length, d_inner, n_state, seed=0, delta_mean=0.0, dtype=np.float32):
  """Random (u, delta, A, B, C, D, delta_bias) with A < 0 as in Mamba (-exp(A_log))."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  return (
      normal(batch, length, d_inner),
      normal(batch, length, d_inner) + delta_mean,
      -np.exp(normal(d_inner, n_state)),
      normal(batch, length, n_state),
      normal(batch, length, n_state),
      normal(d_inner),
      normal(d_inner),
  )


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def require(method):
  """Skips (with the reason) when the Pallas kernel cannot run here."""
  if method != "pallas":
    return
  try:
    from mamba_pkd.ssm import pallas_scan  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"mamba_pkd.ssm.pallas_scan does not import: {e}")
  ok, why = pallas_scan.pallas_available(interpret=jax.default_backend() != "gpu")
  if not ok:
    pytest.skip(f"Pallas kernel unavailable: {why}")


@functools.lru_cache(maxsize=None)
def jitted(method, reverse=False, delta_softplus=True):
  """One jitted scan per static configuration, shared by the tests (compiles dominate)."""
  return jax.jit(
      lambda u, delta, A, B, C, D, delta_bias: selective_scan(
          u,
          delta,
          A,
          B,
          C,
          D,
          delta_bias=delta_bias,
          delta_softplus=delta_softplus,
          reverse=reverse,
          method=method,
          chunk_size=CHUNK,
      )
  )


def grads_of(method, args):
  """Gradients w.r.t. all 7 inputs of sum(y * w) for a fixed random w."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal(args[0].shape), jnp.float32)
  loss = lambda *a: jnp.sum(jitted(method)(*a) * w)
  return jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args)


# Shapes: L = 1; L = 37 (not a multiple of CHUNK nor of the fused chunk);
# L = 784 (pixel-level MNIST) with tiny batch and d_inner.
# Variants: (reverse, use D, use delta_bias, delta_softplus).
FWD, REV, NOSOFTPLUS = (
    (False, True, True, True),
    (True, False, False, True),
    (True, True, False, False),
)
CASES = [
    ((2, 1, 3, 4), FWD),
    ((2, 1, 3, 4), REV),
    ((3, 37, 5, 4), FWD),
    ((3, 37, 5, 4), REV),
    ((3, 37, 5, 4), NOSOFTPLUS),
    ((2, 784, 3, 4), FWD),
    ((2, 784, 3, 4), REV),
]
CASE_IDS = [
    f"{'x'.join(map(str, s))}-{n}"
    for s, n in zip(
        [c[0] for c in CASES],
        ["fwd-D-bias", "rev-noD-nobias"] * 2
        + ["rev-D-nosoftplus"]
        + ["fwd-D-bias", "rev-noD-nobias"],
    )
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,variant", CASES, ids=CASE_IDS)
def test_matches_float64_reference(method, shape, variant):
  require(method)
  reverse, use_d, use_bias, softplus = variant
  u, delta, A, B, C, D, bias = make_inputs(*shape)
  if not softplus:
    delta = np.logaddexp(0.0, delta).astype(np.float32)  # a valid (positive) step size
  D = D if use_d else None
  bias = bias if use_bias else None
  y = jitted(method, reverse, softplus)(u, delta, A, B, C, D, bias)
  ref = selective_scan_reference_numpy(u, delta, A, B, C, D, bias, softplus, reverse)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  assert rel_err(y, ref) <= F32_RTOL


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_large_delta_is_finite(method):
  """L = 784 with dt ~ 50: exp(dt * A) underflows to 0; values and gradients stay finite."""
  require(method)
  args = make_inputs(2, 784, 3, 4, seed=3, delta_mean=50.0)
  y = jitted(method)(*args)
  assert np.all(np.isfinite(y))
  assert rel_err(y, selective_scan_reference_numpy(*args)) <= F32_RTOL
  if method == "fused":  # a hand-written backward (Pallas' is tested in test_pallas_scan.py)
    for name, g in zip(ARG_NAMES, grads_of(method, args)):
      assert np.all(np.isfinite(g)), name


def test_fused_with_several_batch_tiles_and_padding(monkeypatch):
  """Force the fused method into 3 batch tiles of 2 rows (1 padded) and 5 chunks of 8 steps."""
  monkeypatch.setattr(scan_lib, "FUSED_TILE_ELEMENTS", 40)
  monkeypatch.setattr(scan_lib, "FUSED_MAX_CHUNK", 8)
  assert scan_lib.fused_geometry(5, 37, 5, 4) == (3, 2, 5, 8)
  args = tuple(jnp.asarray(x) for x in make_inputs(5, 37, 5, 4, seed=4))
  w = jnp.asarray(np.random.default_rng(1).standard_normal(args[0].shape), jnp.float32)

  def both_directions(method, *a):
    scan = functools.partial(selective_scan, delta_bias=a[6], method=method)
    return scan(*a[:6]), scan(*a[:6], reverse=True)

  y_fwd, y_rev = jax.jit(functools.partial(both_directions, "fused"))(*args)
  assert rel_err(y_fwd, selective_scan_reference_numpy(*args)) <= F32_RTOL
  assert rel_err(y_rev, selective_scan_reference_numpy(*args, reverse=True)) <= F32_RTOL
  grad = lambda m: jax.jit(
      jax.grad(lambda *a: jnp.sum(w * sum(both_directions(m, *a))), argnums=tuple(range(7)))
  )(*args)
  for name, g, g_ref in zip(ARG_NAMES, grad("fused"), grad("sequential")):
    assert rel_err(g, g_ref) <= GRAD_RTOL, name


@pytest.fixture(scope="module")
def reference_grads():
  args = tuple(jnp.asarray(x) for x in make_inputs(3, 37, 5, 4, seed=5))
  return args, grads_of("sequential", args)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "sequential"])
def test_gradients_agree_across_methods(method, reference_grads):
  """float32 gradients w.r.t. all inputs equal those of "sequential" to GRAD_RTOL."""
  require(method)
  args, expected = reference_grads
  for name, g, g_ref in zip(ARG_NAMES, grads_of(method, args), expected):
    assert g.shape == g_ref.shape
    assert rel_err(g, g_ref) <= GRAD_RTOL, name


@pytest.mark.parametrize("method", ["sequential", "parallel", "chunked", "fused"])
def test_check_grads_float64(method):
  """Finite-difference check in float64 (scoped x64; other test modules are unaffected).

  The checked function sums a forward and a reverse scan, so both directions are
  covered by one compile. "fused" is a jax.custom_vjp, which supports reverse mode
  only, so it is checked in "rev" mode; the others are plain JAX and are checked
  in both modes. (The Pallas kernel accumulates in float32 by design, so its
  gradients are checked against the other methods above instead.)
  """
  modes = ("rev",) if method == "fused" else ("fwd", "rev")
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x, jnp.float64) for x in make_inputs(2, 6, 3, 2, seed=6))

    @jax.jit
    def f(*a):
      scan = functools.partial(selective_scan, delta_bias=a[6], method=method, chunk_size=4)
      return scan(*a[:6]) + 0.5 * scan(*a[:6], reverse=True)

    assert f(*args).dtype == jnp.float64
    jtu.check_grads(f, args, order=1, modes=modes, atol=1e-6, rtol=1e-6, eps=1e-5)
  assert jnp.asarray(1.0).dtype == jnp.float32  # x64 really was scoped


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs(method):
  """bf16 u, delta, B, C: output dtype bf16, within BF16_RTOL of the float32 result."""
  require(method)
  args = make_inputs(3, 37, 5, 4, seed=7)
  y32 = jitted(method)(*args)
  low = tuple(jnp.asarray(x, jnp.bfloat16) if i in (0, 1, 3, 4) else x for i, x in enumerate(args))
  y16 = jitted(method)(*low)
  assert y16.dtype == jnp.bfloat16
  assert rel_err(jnp.asarray(y16, jnp.float32), y32) <= BF16_RTOL


def test_auto_resolves_to_fused_on_cpu_and_logs_once(caplog):
  if jax.default_backend() == "gpu":
    pytest.skip("'auto' means 'pallas' on GPU")
  args = make_inputs(2, 5, 3, 4)
  scan_lib._AUTO_LOGGED.clear()
  with caplog.at_level(logging.INFO, logger=scan_lib.__name__):
    y = selective_scan(*args[:6], delta_bias=args[6])
    selective_scan(*args[:6], delta_bias=args[6], method="auto")
  lines = [r.getMessage() for r in caplog.records if "method='auto'" in r.getMessage()]
  assert len(lines) == 1 and "'fused'" in lines[0]
  np.testing.assert_array_equal(y, selective_scan(*args[:6], delta_bias=args[6], method="fused"))


def test_sequential_unroll_matches():
  """unroll=True (no while loop, for XLA cost analysis) computes the same values."""
  args = make_inputs(2, 7, 3, 4)
  y = selective_scan(*args[:6], delta_bias=args[6], method="sequential", unroll=True)
  assert rel_err(y, selective_scan_reference_numpy(*args)) <= F32_RTOL


@pytest.mark.parametrize("method", ["sequential", "parallel", "chunked", "fused"])
def test_export_with_symbolic_batch(method):
  """jax.export with a polymorphic batch (used to export students) gives the same values."""
  from jax import export  # pylint: disable=g-import-not-at-top

  args = make_inputs(3, 37, 5, 4, seed=8)
  (batch,) = export.symbolic_shape("b")
  specs = [
      jax.ShapeDtypeStruct((batch,) + x.shape[1:] if x.ndim == 3 else x.shape, x.dtype)
      for x in args
  ]
  exported = export.export(jitted(method))(*specs)
  y = exported.call(*args)
  assert rel_err(y, selective_scan_reference_numpy(*args)) <= F32_RTOL


def test_scan_methods_tuple():
  assert set(SCAN_METHODS) == set(METHODS) | {"auto"}


def _bad(**changes):
  """Arguments of a valid (2, 5, 3, 4) call with some replaced."""
  u, delta, A, B, C, D, bias = make_inputs(2, 5, 3, 4)
  kwargs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
  kwargs.update(changes)
  return kwargs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (_bad(u=np.zeros((2, 5))), "u has shape"),
        (
            _bad(
                u=np.zeros((2, 0, 3)),
                delta=np.zeros((2, 0, 3)),
                B=np.zeros((2, 0, 4)),
                C=np.zeros((2, 0, 4)),
            ),
            r"u has shape \(2, 0, 3\); batch, L and d_inner must",
        ),
        (_bad(delta=np.zeros((2, 4, 3))), r"delta has shape \(2, 4, 3\); expected .*\(2, 5, 3\)"),
        (_bad(A=np.zeros((4, 4))), r"A has shape \(4, 4\)"),
        (
            _bad(B=np.zeros((2, 5, 3))),
            r"B has shape \(2, 5, 3\); expected \(batch, L, N\) = \(2, 5, 4\)",
        ),
        (_bad(C=np.zeros((1, 5, 4))), r"C has shape \(1, 5, 4\)"),
        (_bad(D=np.zeros((4,))), r"D has shape \(4,\)"),
        (_bad(delta_bias=np.zeros((3, 1))), r"delta_bias has shape \(3, 1\)"),
        (_bad(u=np.zeros((2, 5, 3), np.int32)), "u has dtype int32"),
        (_bad(method="magic"), r"method='magic'.*'sequential'.*'fused'"),
        (_bad(chunk_size=0), "chunk_size=0"),
        (_bad(chunk_size=2.5), "chunk_size=2.5"),
    ],
    ids=[
        "u",
        "L0",
        "delta",
        "A",
        "B",
        "C",
        "D",
        "delta_bias",
        "dtype",
        "method",
        "chunk0",
        "chunkfloat",
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    selective_scan(**kwargs)
