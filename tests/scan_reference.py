"""The one reference of the selective scan for the tests: a float64 NumPy loop.

Written from the Mamba equations (Gu & Dao 2023, Algorithm 2), not from
``mamba_pkd.ssm``: the forward recurrence and, given an output cotangent, the
hand-derived backpropagation through time. ``tests/test_scan.py`` checks it
against finite differences and a hand-computed step, and every scan method (the
XLA methods, ``"fused"`` and the Pallas kernel) against it.
"""

import numpy as np

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def rel_err(x, ref):
  """``max|x - ref| / max|ref|`` over all elements, in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _flip_time(*xs):
  return tuple(x[:, ::-1] for x in xs)


def reference_scan(
    u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, reverse=False, gy=None
):
  """float64 forward (and, given gy, backward) of the selective scan.

  Args:
    u, delta: [b, L, d]; A: [d, n]; B, C: [b, L, n]; D, delta_bias: [d] or None
      (array-likes of any float dtype).
    delta_softplus: ``dt = softplus(delta + delta_bias)``, else ``delta + delta_bias``.
    reverse: run the recurrence from ``t = L - 1`` down to ``0``.
    gy: [b, L, d] cotangent of y, or None.

  Returns:
    y [b, L, d] float64; when gy is given, ``(y, grads)`` with ``grads`` a dict of
    float64 gradients of ``sum(gy * y)`` keyed by ``ARG_NAMES`` (those of absent
    D / delta_bias are what they would be for a zero argument).
  """
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  D = np.zeros(u.shape[2]) if D is None else np.asarray(D, np.float64)
  bias = np.zeros(u.shape[2]) if delta_bias is None else np.asarray(delta_bias, np.float64)
  if reverse:
    u, delta, B, C = _flip_time(u, delta, B, C)
    if gy is not None:
      (gy,) = _flip_time(np.asarray(gy, np.float64))
  x = delta + bias
  dt = np.logaddexp(0.0, x) if delta_softplus else x  # softplus, overflow-safe
  with np.errstate(over="ignore"):
    ddt_dx = 1.0 / (1.0 + np.exp(-x)) if delta_softplus else np.ones_like(x)
  batch, seq_len, d_inner = u.shape
  h = np.zeros((batch, d_inner, A.shape[1]))
  hs = np.zeros((seq_len + 1,) + h.shape)  # hs[t + 1] = h_t, hs[0] = 0
  y = np.zeros_like(u)
  for t in range(seq_len):
    d_a = np.exp(dt[:, t, :, None] * A)
    h = d_a * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
    hs[t + 1] = h
    y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D * u[:, t]
  if gy is None:
    return y[:, ::-1] if reverse else y
  gy = np.asarray(gy, np.float64)
  g = {k: np.zeros_like(v) for k, v in (("u", u), ("x", x), ("A", A), ("B", B), ("C", C), ("D", D))}
  g_h = np.zeros_like(h)
  for t in reversed(range(seq_len)):
    d_a = np.exp(dt[:, t, :, None] * A)
    g_h = g_h + C[:, t, None, :] * gy[:, t, :, None]
    g["C"][:, t] = np.einsum("bd,bdn->bn", gy[:, t], hs[t + 1])
    g["D"] += np.sum(gy[:, t] * u[:, t], axis=0)
    g_hb = np.einsum("bdn,bn->bd", g_h, B[:, t])
    g["u"][:, t] = gy[:, t] * D + dt[:, t] * g_hb
    g["B"][:, t] = np.einsum("bdn,bd->bn", g_h, dt[:, t] * u[:, t])
    g_da = g_h * hs[t]
    g_dt = np.sum(g_da * d_a * A, axis=2) + u[:, t] * g_hb
    g["A"] += np.sum(g_da * d_a * dt[:, t, :, None], axis=0)
    g["x"][:, t] = g_dt * ddt_dx[:, t]
    g_h = g_h * d_a
  grads = {
      "u": g["u"],
      "delta": g["x"],
      "A": g["A"],
      "B": g["B"],
      "C": g["C"],
      "D": g["D"],
      "delta_bias": g["x"].sum(axis=(0, 1)),
  }
  if reverse:
    y = y[:, ::-1]
    for k in ("u", "delta", "B", "C"):
      grads[k] = grads[k][:, ::-1]
  return y, grads
