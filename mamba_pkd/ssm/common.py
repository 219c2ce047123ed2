"""What every selective-scan implementation shares: method names and argument checks.

This module owns

* :class:`ScanMethod`, the one list of scan method names, and
  :func:`as_scan_method`, the one place that turns a user's value (a string such as
  ``"auto"`` from a config, or a :class:`ScanMethod`) into a member or raises;
* :func:`validate_scan_inputs`, the shape and dtype contract of the scan's
  arrays, checked by :mod:`mamba_pkd.ssm.scan` and :mod:`mamba_pkd.ssm.pallas_scan`;
* :func:`shapes_match`, :func:`check_chunk_size`, :func:`compute_dtype` and
  :func:`compute_dt`.

It imports nothing from ``mamba_pkd``. The import graph of the package is
``common <- fused <- scan`` and ``common <- pallas_scan <- scan`` (``scan`` owns
the dispatch ``selective_scan``); ``tests/test_imports.py`` keeps it acyclic.

Shape checks compare only dimensions that are concrete Python ints: a symbolic
dimension (``jax.export.symbolic_shape``, or a converter's own dimension objects
such as jax2onnx's) is never compared, so tracing with a polymorphic batch works.
"""

from __future__ import annotations

import enum
import operator

import jax
import jax.numpy as jnp
import numpy as np


class ScanMethod(str, enum.Enum):
  """Selective-scan methods (see :mod:`mamba_pkd.ssm.scan` for what each does).

  A ``str`` subclass: ``ScanMethod.FUSED == "fused"``, so string configs work.
  """

  SEQUENTIAL = "sequential"
  PARALLEL = "parallel"
  CHUNKED = "chunked"
  FUSED = "fused"
  NATIVE = "native"
  PALLAS = "pallas"
  AUTO = "auto"

  def __str__(self) -> str:
    return self.value


# The method names as plain strings, in the enum's order (public, for configs and CLIs).
SCAN_METHODS = tuple(m.value for m in ScanMethod)


def as_scan_method(value, name: str = "method") -> ScanMethod:
  """The :class:`ScanMethod` named by ``value`` (a member or its string value).

  Args:
    value: e.g. ``"fused"`` or ``ScanMethod.FUSED``.
    name: the argument's name in the error message (``"scan_method"`` in configs).

  Raises:
    ValueError: one line naming the bad value and the valid choices.
  """
  if isinstance(value, str):  # ScanMethod members are str too
    try:
      return ScanMethod(value)
    except ValueError:
      pass
  raise ValueError(f"{name}={value!r} is not a scan method; valid: {', '.join(SCAN_METHODS)}")


def check_chunk_size(chunk_size, name: str = "chunk_size") -> None:
  """Raises ValueError unless ``chunk_size`` is an int >= 1 (bool rejected)."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}={chunk_size!r} is invalid; expected an int >= 1")


def _concrete(d) -> bool:
  """True for a known dimension (an int), False for a symbolic one."""
  if isinstance(d, (bool, np.bool_)):
    return False
  if isinstance(d, (int, np.integer)):
    return True
  try:  # jax's symbolic dimensions that happen to be constant
    operator.index(d)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def _shape(x) -> tuple:
  shape = getattr(x, "shape", None)
  return tuple(np.shape(x) if shape is None else shape)


def _fmt(shape) -> str:
  return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def shapes_match(shape, expected) -> bool:
  """Equal ranks and equal concrete dimensions; symbolic dimensions are not compared."""
  if len(shape) != len(expected):
    return False
  return all(
      not (_concrete(a) and _concrete(b)) or int(a) == int(b) for a, b in zip(shape, expected)
  )


def _check_shape(name, x, expected, description):
  if x is None:
    raise ValueError(f"{name} is None; expected an array of shape {description} = {_fmt(expected)}")
  shape = _shape(x)
  if not shapes_match(shape, expected):
    raise ValueError(f"{name} has shape {_fmt(shape)}; expected {description} = {_fmt(expected)}")


def _positive(d) -> bool:
  return not _concrete(d) or int(d) >= 1


def validate_scan_inputs(u, delta, A, B, C, D=None, delta_bias=None):
  """Shapes and dtypes of the scan's arrays (every method and the Pallas kernel).

  Arrays, ``jax.ShapeDtypeStruct``s and tracers are accepted; symbolic dimensions
  are not compared (see the module docstring).

  Raises:
    ValueError: naming the first bad argument and the expected shape or dtype.
  """
  u_shape = _shape(u)
  if len(u_shape) != 3:
    raise ValueError(f"u has shape {_fmt(u_shape)}; expected 3 dims (batch, L, d_inner)")
  batch, length, d_inner = u_shape
  if not all(_positive(d) for d in u_shape):
    raise ValueError(f"u has shape {_fmt(u_shape)}; batch, L and d_inner must all be >= 1")
  a_shape = _shape(A)
  if len(a_shape) != 2 or not shapes_match(a_shape[:1], (d_inner,)) or not _positive(a_shape[1]):
    raise ValueError(
        f"A has shape {_fmt(a_shape)}; expected (d_inner, N) with d_inner = {d_inner}" " and N >= 1"
    )
  n_state = a_shape[1]
  _check_shape("delta", delta, (batch, length, d_inner), "(batch, L, d_inner)")
  _check_shape("B", B, (batch, length, n_state), "(batch, L, N)")
  _check_shape("C", C, (batch, length, n_state), "(batch, L, N)")
  if D is not None:
    _check_shape("D", D, (d_inner,), "(d_inner,)")
  if delta_bias is not None:
    _check_shape("delta_bias", delta_bias, (d_inner,), "(d_inner,)")
  for name, x in (
      ("u", u),
      ("delta", delta),
      ("A", A),
      ("B", B),
      ("C", C),
      ("D", D),
      ("delta_bias", delta_bias),
  ):
    if x is not None and not jnp.issubdtype(_dtype(x), jnp.floating):
      raise ValueError(f"{name} has dtype {_dtype(x)}; expected a floating dtype")


def _dtype(x):
  dtype = getattr(x, "dtype", None)
  return jnp.result_type(x) if dtype is None else jnp.dtype(dtype)


def compute_dtype(*arrays):
  """float32, or float64 when an input is float64 (x64 gradient checks)."""
  dtypes = [_dtype(x) for x in arrays if x is not None]
  return jnp.result_type(jnp.float32, *dtypes)


def compute_dt(delta, delta_bias=None, delta_softplus=True, dtype=jnp.float32):
  """Step size ``dt = softplus(delta + delta_bias)`` in ``dtype``.

  Args:
    delta: [batch, L, d_inner] raw step size.
    delta_bias: [d_inner] or None.
    delta_softplus: apply softplus after the bias.
    dtype: accumulation dtype.

  Returns:
    [batch, L, d_inner] array of ``dtype``.
  """
  dt = delta.astype(dtype)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(dtype)
  if delta_softplus:
    dt = jax.nn.softplus(dt)
  return dt
