"""Tests of mamba_pkd.ssm (scan, fused, common): every method against the float64 reference.

The reference is ``tests/scan_reference.py`` (a float64 NumPy loop with a
hand-derived backward; checked here against finite differences). Relative error,
everywhere in this file: ``max|x - ref| / max|ref|`` (max over all elements).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from mamba_pkd import models
from mamba_pkd.ssm import SCAN_METHODS
from mamba_pkd.ssm import ScanMethod
from mamba_pkd.ssm import as_scan_method
from mamba_pkd.ssm import common
from mamba_pkd.ssm import fused
from mamba_pkd.ssm import native
from mamba_pkd.ssm import scan as scan_lib
from mamba_pkd.ssm import selective_scan
from scan_reference import ARG_NAMES
from scan_reference import reference_scan
from scan_reference import rel_err

# Every concrete method, from the enum: a new member is tested without editing this file.
METHODS = tuple(m.value for m in ScanMethod if m is not ScanMethod.AUTO)
CHUNK = 16  # chunk_size of "chunked"; L = 37 and 784 are not multiples of it
F32_RTOL = 1e-5  # values vs the float64 reference (the bar)
GRAD_RTOL = 1e-4  # float32 gradients vs the float64 reference
BF16_RTOL = 2e-2  # bfloat16 inputs vs the float32 result


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


def require(method):
  """Skips (with the reason) when the Pallas or native kernel cannot run here."""
  if method == "native":
    ok, why = native.native_available()
    if not ok:
      pytest.skip(f"native kernel unavailable: {why}")
    return
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


def grad_weights(shape):
  """The fixed random w of ``grads_of``: the output cotangent, [b, L, d] float32."""
  return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def grads_of(method, args):
  """Gradients w.r.t. all 7 inputs of sum(y * w) for w = grad_weights(shape)."""
  w = jnp.asarray(grad_weights(args[0].shape))
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
  ref = reference_scan(u, delta, A, B, C, D, bias, softplus, reverse)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  assert rel_err(y, ref) <= F32_RTOL


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_large_delta_is_finite(method):
  """L = 784 with dt ~ 50: exp(dt * A) underflows to 0; values and gradients stay finite."""
  require(method)
  args = make_inputs(2, 784, 3, 4, seed=3, delta_mean=50.0)
  y = jitted(method)(*args)
  assert np.all(np.isfinite(y))
  assert rel_err(y, reference_scan(*args)) <= F32_RTOL
  if method in ("fused", "native"):  # hand-written backwards (Pallas': test_pallas_scan.py)
    for name, g in zip(ARG_NAMES, grads_of(method, args)):
      assert np.all(np.isfinite(g)), name


def test_fused_with_several_batch_tiles_and_padding(monkeypatch):
  """Force the fused method into 3 batch tiles of 2 rows (1 padded) and 5 chunks of 8 steps."""
  monkeypatch.setattr(fused, "FUSED_TILE_ELEMENTS", 40)
  monkeypatch.setattr(fused, "FUSED_MAX_CHUNK", 8)
  assert fused.fused_geometry(5, 37, 5, 4) == (3, 2, 5, 8)
  args = tuple(jnp.asarray(x) for x in make_inputs(5, 37, 5, 4, seed=4))
  w = jnp.asarray(np.random.default_rng(1).standard_normal(args[0].shape), jnp.float32)

  def both_directions(method, *a):
    scan = functools.partial(selective_scan, delta_bias=a[6], method=method)
    return scan(*a[:6]), scan(*a[:6], reverse=True)

  y_fwd, y_rev = jax.jit(functools.partial(both_directions, "fused"))(*args)
  assert rel_err(y_fwd, reference_scan(*args)) <= F32_RTOL
  assert rel_err(y_rev, reference_scan(*args, reverse=True)) <= F32_RTOL
  grads = jax.jit(
      jax.grad(lambda *a: jnp.sum(w * sum(both_directions("fused", *a))), argnums=tuple(range(7)))
  )(*args)
  _, ref_fwd = reference_scan(*args, gy=w)
  _, ref_rev = reference_scan(*args, reverse=True, gy=w)
  for name, g in zip(ARG_NAMES, grads):
    assert rel_err(g, ref_fwd[name] + ref_rev[name]) <= GRAD_RTOL, name


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_float64_reference(method):
  """float32 gradients w.r.t. all inputs equal the reference's backward to GRAD_RTOL."""
  require(method)
  args = tuple(jnp.asarray(x) for x in make_inputs(3, 37, 5, 4, seed=5))
  _, expected = reference_scan(*args, gy=grad_weights(args[0].shape))
  for name, g in zip(ARG_NAMES, grads_of(method, args)):
    assert rel_err(g, expected[name]) <= GRAD_RTOL, name


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


def test_auto_resolves_to_native_on_cpu_and_logs_once(caplog):
  if jax.default_backend() == "gpu":
    pytest.skip("'auto' means 'pallas' on GPU")
  ok, why = native.native_available()
  expected = "native" if ok else "fused"
  args = make_inputs(2, 5, 3, 4)
  scan_lib._AUTO_LOGGED.clear()
  with caplog.at_level(logging.INFO, logger=scan_lib.__name__):
    y = selective_scan(*args[:6], delta_bias=args[6])
    selective_scan(*args[:6], delta_bias=args[6], method="auto")
  lines = [r.getMessage() for r in caplog.records if "method='auto'" in r.getMessage()]
  assert len(lines) == 1 and f"-> {expected!r}" in lines[0], (lines, why)
  np.testing.assert_array_equal(y, selective_scan(*args[:6], delta_bias=args[6], method=expected))


def test_without_the_native_kernel_auto_is_fused_and_native_raises(monkeypatch, caplog):
  """No compiler (or headers): 'auto' keeps the XLA fused method and says why;
  method='native' fails with one line naming the reason."""
  if jax.default_backend() != "cpu":
    pytest.skip("the native kernel is CPU only")
  monkeypatch.setattr(native, "_state", {"ok": False, "why": "no C++ compiler ('g++' ...)"})
  args = make_inputs(2, 5, 3, 4)
  scan_lib._AUTO_LOGGED.clear()
  with caplog.at_level(logging.INFO, logger=scan_lib.__name__):
    y = selective_scan(*args[:6], delta_bias=args[6])
  (line,) = [r.getMessage() for r in caplog.records if "method='auto'" in r.getMessage()]
  assert "-> 'fused'" in line and "native kernel is unavailable (no C++ compiler" in line
  np.testing.assert_array_equal(y, selective_scan(*args[:6], delta_bias=args[6], method="fused"))
  with pytest.raises(RuntimeError, match=r"^scan method 'native' is unavailable: no C\+\+ comp"):
    selective_scan(*args[:6], delta_bias=args[6], method="native")
  scan_lib._AUTO_LOGGED.clear()


def test_native_results_do_not_depend_on_threads():
  """Rows are independent and each is computed in a fixed order: 1 and 3 threads give
  bit-identical outputs and gradients (the parameter gradients are summed by JAX)."""
  if not native.native_available()[0]:
    pytest.skip(f"native kernel unavailable: {native.native_available()[1]}")
  s1, s2 = _two_streams((7, 37, 5, 4))
  w = jnp.asarray(grad_weights(s1[0].shape))

  def run(threads):
    f = lambda a, b: native.scan_native_streams([a, b], [False, True], True, threads=threads)
    loss = lambda a, b: sum(jnp.sum(w * y) for y in f(a, b))
    return jax.jit(f)(s1, s2), jax.jit(jax.grad(loss, (0, 1)))(s1, s2)

  one, three = run(1), run(3)
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(three)):
    np.testing.assert_array_equal(x, y)


def test_sequential_unroll_matches():
  """unroll=True (no while loop, for XLA cost analysis) computes the same values."""
  args = make_inputs(2, 7, 3, 4)
  y = selective_scan(*args[:6], delta_bias=args[6], method="sequential", unroll=True)
  assert rel_err(y, reference_scan(*args)) <= F32_RTOL


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
  assert rel_err(y, reference_scan(*args)) <= F32_RTOL


@pytest.mark.parametrize("method", list(ScanMethod), ids=str)
def test_every_scan_method_member_is_dispatched(method):
  """Each ScanMethod member (the member itself, and its string) runs and matches the reference.

  Fails for a member added to the enum without an implementation in selective_scan.
  """
  require(method.value)
  args = make_inputs(2, 9, 3, 4, seed=9)
  ref = reference_scan(*args)
  for value in (method, method.value):
    y = selective_scan(*args[:6], delta_bias=args[6], method=value)
    assert rel_err(y, ref) <= F32_RTOL, value


def test_as_scan_method_accepts_members_and_names_only():
  assert SCAN_METHODS == tuple(m.value for m in ScanMethod)
  for m in ScanMethod:
    assert as_scan_method(m) is m and as_scan_method(m.value) is m and m == m.value
    assert str(m) == f"{m}" == m.value
  for bad in ("magic", "Fused", "", None, 3, ("fused",)):
    with pytest.raises(ValueError) as e:
      as_scan_method(bad)
    assert str(e.value) == (
        f"method={bad!r} is not a scan method; valid: {', '.join(SCAN_METHODS)}"
    )


def test_config_and_scan_use_the_one_validator():
  """ModelConfig, selective_scan and the Pallas-free dispatch raise the same one-line error."""
  expected = (
      "is not a scan method; valid: sequential, parallel, chunked, fused, native, pallas, auto"
  )
  with pytest.raises(ValueError) as e:
    models.ModelConfig(scan_method="magic")
  assert str(e.value) == f"scan_method='magic' {expected}"
  with pytest.raises(ValueError) as e:
    selective_scan(*make_inputs(2, 5, 3, 4)[:6], method="magic")
  assert str(e.value) == f"method='magic' {expected}"
  # A string config is kept as given and works wherever a ScanMethod does.
  assert models.ModelConfig(scan_method=ScanMethod.FUSED).scan_method == "fused"


# ----------------------------------------------------------------------------
# The reference itself (tests/scan_reference.py).


def test_reference_gradients_match_finite_differences():
  inputs = dict(zip(ARG_NAMES, (x.astype(np.float64) for x in make_inputs(2, 5, 3, 2, seed=1))))
  gy = np.random.default_rng(2).standard_normal((2, 5, 3))
  for reverse in (False, True):
    _, grads = reference_scan(**inputs, reverse=reverse, gy=gy)
    rng = np.random.default_rng(3)
    for name in ARG_NAMES:
      direction = rng.standard_normal(inputs[name].shape)
      eps = 1e-6
      plus = dict(inputs, **{name: inputs[name] + eps * direction})
      minus = dict(inputs, **{name: inputs[name] - eps * direction})
      fd = np.sum(
          gy * (reference_scan(**plus, reverse=reverse) - reference_scan(**minus, reverse=reverse))
      ) / (2 * eps)
      analytic = np.sum(grads[name] * direction)
      np.testing.assert_allclose(
          analytic, fd, rtol=1e-6, atol=1e-8, err_msg=f"{name} reverse={reverse}"
      )


def test_reference_hand_computed_single_step():
  # L = 1: y = C * dt * B * u + D * u with dt = softplus(delta + bias).
  u, delta, a, b, c, d, bias = 2.0, 0.3, -1.0, 0.5, -1.5, 0.25, 0.2
  dt = np.log1p(np.exp(delta + bias))
  expected = c * dt * b * u + d * u
  arr = lambda v, *s: np.full(s, v)
  y = reference_scan(
      arr(u, 1, 1, 1),
      arr(delta, 1, 1, 1),
      arr(a, 1, 1),
      arr(b, 1, 1, 1),
      arr(c, 1, 1, 1),
      arr(d, 1),
      arr(bias, 1),
  )
  np.testing.assert_allclose(y[0, 0, 0], expected, rtol=1e-12)


def test_reference_two_steps_by_hand():
  # L = 2, reverse: h_1 = dt1 B1 u1; h_0 = exp(dt0 A) h_1 + dt0 B0 u0 (no softplus, no D).
  u, delta, B, C = [[[1.0], [2.0]]], [[[0.5], [0.25]]], [[[3.0], [-1.0]]], [[[2.0], [0.5]]]
  A = [[-2.0]]
  y = reference_scan(u, delta, A, B, C, delta_softplus=False, reverse=True)
  h1 = 0.25 * -1.0 * 2.0
  h0 = np.exp(0.5 * -2.0) * h1 + 0.5 * 3.0 * 1.0
  np.testing.assert_allclose(y[0, :, 0], [2.0 * h0, 0.5 * h1], rtol=1e-12)


# ----------------------------------------------------------------------------
# Symbolic shapes (jax.export with a polymorphic batch, ONNX converters).


def _symbolic_specs(u_dims="b, 16, 8", n_state=4):
  """ShapeDtypeStructs (u, delta, A, B, C, D, delta_bias) with u of symbolic shape u_dims."""
  from jax import export  # pylint: disable=g-import-not-at-top

  batch, length, d_inner = export.symbolic_shape(u_dims)
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct
  return (
      sds((batch, length, d_inner), f32),
      sds((batch, length, d_inner), f32),
      sds((d_inner, n_state), f32),
      sds((batch, length, n_state), f32),
      sds((batch, length, n_state), f32),
      sds((d_inner,), f32),
      sds((d_inner,), f32),
  )


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_export_lowers_with_symbolic_batch_shape(method):
  from jax import export  # pylint: disable=g-import-not-at-top

  def f(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, method=method)

  exported = export.export(jax.jit(f))(*_symbolic_specs("b, 16, 8"))
  assert str(exported.out_avals[0].shape[0]) == "b"
  assert exported.out_avals[0].shape[1:] == (16, 8)
  assert "stablehlo" in exported.mlir_module()


def test_symbolic_dims_are_not_compared_but_concrete_ones_are():
  from jax import export  # pylint: disable=g-import-not-at-top

  def f(*a):
    return selective_scan(*a[:6], delta_bias=a[6], method="sequential")

  specs = list(_symbolic_specs("b, 16, 8"))
  specs[3] = jax.ShapeDtypeStruct(specs[3].shape[:2] + (5,), jnp.float32)  # B: N = 5, not 4
  with pytest.raises(ValueError, match=r"B has shape \(b, 16, 5\); expected .* = \(b, 16, 4\)"):
    export.export(jax.jit(f))(*specs)


class _OpaqueDim:
  """A converter's symbolic dimension: any comparison or conversion raises."""

  def _fail(self, *args):
    raise TypeError("symbolic dimension compared")

  __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __index__ = __int__ = _fail
  __hash__ = object.__hash__

  def __str__(self):
    return "B"


def _spec(*shape):
  """An array-like with only a shape (possibly opaque dims) and a float32 dtype."""
  return type("Spec", (), {"shape": shape, "dtype": np.dtype(np.float32)})()


def test_validation_never_compares_symbolic_dims():
  """An (opaque) symbolic batch passes; a bad concrete dim is still reported."""
  b = _OpaqueDim()
  arrays = [_spec(b, 16, 8), _spec(b, 16, 8), _spec(8, 4), _spec(b, 16, 4), _spec(b, 16, 4)]
  common.validate_scan_inputs(*arrays, _spec(8), _spec(8))
  arrays[4] = _spec(b, 15, 4)
  with pytest.raises(ValueError, match=r"C has shape \(B, 15, 4\); expected \(batch, L, N\)"):
    common.validate_scan_inputs(*arrays)


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
        (_bad(method="magic"), r"^method='magic' is not a scan method; valid: sequential, .*auto$"),
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


# ----------------------------------------------------------------------------
# Several scans in one call (both directions of a bidirectional mixer).


def _two_streams(shape=(5, 37, 5, 4)):
  a = tuple(jnp.asarray(x) for x in make_inputs(*shape, seed=11))
  b = tuple(jnp.asarray(x) for x in make_inputs(*shape, seed=12))
  return a, b[:5] + (None, b[6])  # the second stream has no D


@pytest.mark.parametrize("method", ["fused", "native", "sequential"])
def test_streams_equal_separate_scans_values_and_gradients(method, monkeypatch):
  """One call for a forward and a reverse scan == two selective_scan calls (fused:
  3 batch tiles of 2 rows, one padded, per stream, so 6 tiles in one loop)."""
  require(method)
  monkeypatch.setattr(fused, "FUSED_TILE_ELEMENTS", 40)
  monkeypatch.setattr(fused, "FUSED_MAX_CHUNK", 8)
  monkeypatch.setattr(native, "MAX_CHUNK", 8)  # 5 chunks of 8 steps, the last one partial
  s1, s2 = _two_streams()
  w = jnp.asarray(grad_weights(s1[0].shape))

  def together(s1, s2):
    return scan_lib.selective_scan_streams([s1, s2], reverse=[False, True], method=method)

  def apart(s1, s2):
    one = lambda s, r: selective_scan(*s[:6], delta_bias=s[6], reverse=r, method=method)
    return [one(s1, False), one(s2, True)]

  y_tog, y_apart = jax.jit(together)(s1, s2), jax.jit(apart)(s1, s2)
  for y, y_ref in zip(y_tog, y_apart):
    np.testing.assert_array_equal(y, y_ref)
  assert rel_err(y_tog[1], reference_scan(*s2, reverse=True)) <= F32_RTOL
  loss = lambda f: jax.jit(jax.grad(lambda a, b: sum(jnp.sum(w * y) for y in f(a, b)), (0, 1)))
  g_tog, g_apart = loss(together)(s1, s2), loss(apart)(s1, s2)
  for g, g_ref in zip(jax.tree.leaves(g_tog), jax.tree.leaves(g_apart)):
    assert rel_err(g, g_ref) <= 1e-6
  _, ref = reference_scan(*s2, reverse=True, gy=w)
  for name, g in zip(ARG_NAMES, g_tog[1]):
    if g is not None:
      assert rel_err(g, ref[name]) <= GRAD_RTOL, name


def test_streams_reject_mismatched_streams():
  s1, s2 = _two_streams()
  s3 = tuple(x[:, :5] if x is not None and x.ndim == 3 else x for x in s2)
  with pytest.raises(ValueError, match=r"stream 1 has u \(5, 5, 5\)"):
    scan_lib.selective_scan_streams([s1, s3], reverse=[False, False], method="fused")
  with pytest.raises(ValueError, match="one reverse flag each"):
    scan_lib.selective_scan_streams([s1, s2], reverse=[False], method="fused")
  with pytest.raises(ValueError, match="method='magic' is not a scan method"):
    scan_lib.selective_scan_streams([s1], reverse=[False], method="magic")
