r"""One ensemble member (teacher or student) as an ONNX graph, written with ``onnx.helper``.

API (for the export CLI)::

    from mamba_pkd.edge import onnx_lower
    proto = onnx_lower.member_to_onnx(member.config, member.params)   # onnx.ModelProto
    onnx_lower.save(proto, "member_1.onnx")

Graph contract (``b`` is a symbolic batch dimension, opset :data:`OPSET` = 17):

* input ``x``: float32 [b, H, W, C], the *normalised* images
  ``(uint8 / 255 - mean) / std`` (NHWC, exactly what ``export.py``'s
  ``member_<j>.stablehlo`` takes);
* input ``prev_features``: float32 [b, connect_dim], only for a connected
  student (``connect_dim > 0``): the previous member's ``features``;
* output ``logits``: float32 [b, K] (a student's ensemble weight is whatever is
  folded into its ``head`` params, see ``ensemble.fold_weight``);
* output ``features``: float32 [b, d_model], the pooled penultimate features
  (what the next connected student reads).

The graph keeps every Mamba block in
channels-first layout ``[b, channels, L]`` (one Transpose at the input, no other),
so the depthwise causal conv is one grouped ``Conv`` and every projection is one
``MatMul``; both branches of a bidirectional block share these ops (stacked
on a branch axis ``nb``; the reversed branch's conv is anti-causal, one
``Conv`` with 2K-1 taps serves both). Two scan forms:

* ``"dual"`` (quadratic, for short sequences): over the T = L(L+1)/2 causal
  pairs (t, s) (s <= t; s >= t for the reversed branch),
  ``delta[t, s] = sum_{r in (s, t]} dt_r`` is one ``MatMul`` of ``dt`` with a
  constant 0/1 matrix (a sum of positive terms: no cancellation, unlike a
  difference of cumulative sums), ``W = exp(A * delta)`` [b, nb, E, N, T],
  ``M[t, s] = sum_n C_t[n] B_s[n] W[n, t, s]`` and
  ``y_t = sum_s M[t, s] dt_s u_s``: 13 ONNX ops for both branches whatever L,
  but O(E * N * L^2) work and float32 temporaries of that size (the default
  run's s5 at batch 256: 428 MB each; its prefix 1..5 was OOM-killed at 21 GB);
* ``"recurrent"`` (the scan unrolled over time): ``exp(dt * A)`` and
  ``dt * B * u`` for all steps at once, then ``h = dA_t * h + dBu_t`` for each of
  the L steps (2 ops a step, both branches at once: the reversed branch runs
  on its time-flipped sequence), the states concatenated and contracted with C
  in one op: O(E * N * L) work, 2L + ~15 ops.

``scan_form="auto"`` picks ``"dual"`` for ``num_tokens <= DUAL_MAX_TOKENS`` (32)
with a decay tensor of at most ``DUAL_MAX_ELEMENTS`` (20k) per image and layer
(the smoke ladder's members), ``"recurrent"`` otherwise (mnist ladder,
bidirectional: s1 44k, s4 174k, s8 836k). Measured side by side with JAX on
the default run's students by ``experiments/bench_edge.py`` (README, "ONNX for
edge runtimes"; docs/results/default/bench_edge.md).

The recurrent form keeps its states as [b, nb, L, N, E] (E innermost: with N
innermost the 5-D broadcasts ran onnxruntime's scalar loops over 4-16
elements and the form was 1.1-1.6x slower); the dual form's
[b, nb, E, N, L(L+1)/2] elementwise work makes it 2.1-2.8x slower at batch 256.
onnxruntime costs about 0.35 us per node (60 chained Adds on [1, 40, 16]:
25 us), so at batch 1 a 1-layer member's ~90 nodes alone take ~30 us.

Why written by hand and not with jax2onnx: the converter's graph of the sequential scan was slower in
onnxruntime than JAX at batch 1 (0.36 ms vs 0.12 ms, measured before this
module by the project), and writing the graph directly chooses the scan form,
the layout and the op count.

This module needs ``numpy`` and ``onnx`` only: ``config`` is read by attribute
(a :class:`mamba_pkd.models.ModelConfig`) and ``params`` may hold numpy or JAX
arrays (converted with ``np.asarray``); Flax and JAX are not imported.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:  # pragma: no cover
  from mamba_pkd.models import ModelConfig

OPSET = 17
IR_VERSION = 8  # readable by onnxruntime >= 1.10
SCAN_FORMS = ("auto", "dual", "recurrent")
# "auto" uses the dual form up to this many tokens and this many elements of
# its [nb, E, N, L(L+1)/2] decay tensor per image and layer (see the module docstring).
DUAL_MAX_TOKENS = 32
DUAL_MAX_ELEMENTS = 20_000
RMS_EPS = 1e-5  # layers.RMSNorm's default, used by every block and the final norm
INPUT = "x"
PREV_INPUT = "prev_features"
LOGITS = "logits"
FEATURES = "features"


def check_lowerable(config, name: str = "member") -> None:
  """Raises ValueError unless ``config`` is a Mamba member (the only family lowered here)
  with pooled features (token-connected members are not lowered)."""
  family = getattr(config, "family", "mamba")
  if family != "mamba":
    raise ValueError(
        f"{name} is a {family} student: the ONNX lowering covers Mamba members only; "
        "export this run with --format=stablehlo"
    )
  if getattr(config, "token_features", False):
    raise ValueError(
        f"{name} hands on or reads token-level hidden states (pkd.connect_tokens=True), "
        "which the ONNX lowering does not cover; export this run with --format=stablehlo"
    )


def resolve_scan_form(config: "ModelConfig", scan_form: str = "auto") -> str:
  """``"dual"`` or ``"recurrent"``: the form :func:`member_to_onnx` uses for ``config``."""
  if scan_form not in SCAN_FORMS:
    raise ValueError(f"scan_form={scan_form!r} must be one of {SCAN_FORMS}")
  if scan_form == "auto":
    length = config.num_tokens
    branches = 2 if config.bidirectional else 1
    elements = branches * config.d_inner * config.d_state * length * (length + 1) // 2
    short = length <= DUAL_MAX_TOKENS and elements <= DUAL_MAX_ELEMENTS
    return "dual" if short else "recurrent"
  return scan_form


class _Graph:
  """Accumulates nodes and initializers with unique names."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._shared: dict = {}

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value, hint: str, dtype=np.float32) -> str:
    name = self.name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def shared(self, key, make, hint: str) -> str:
    """A constant built once by ``make()`` and reused by every node that asks for ``key``."""
    if key not in self._shared:
      self._shared[key] = self.const(make(), hint)
    return self._shared[key]

  def ints(self, values, hint: str = "shape") -> str:
    return self.const(np.asarray(values, np.int64), hint, np.int64)

  def op(self, op_type: str, inputs, hint: str | None = None, n_out: int = 1, **attrs):
    outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
    return outs[0] if n_out == 1 else outs


def _np(tree: Mapping, *keys: str) -> np.ndarray:
  node: Any = tree
  for key in keys:
    if key not in node:
      raise ValueError(f"params have no {'/'.join(keys)!r} (missing {key!r})")
    node = node[key]
  return np.asarray(node, np.float32)


def _rms_denominator(g: _Graph, x: str, axis: int, size: int, hint: str) -> str:
  """``x / sqrt(sum(x^2 over axis) + size * eps)``: RMSNorm without ``sqrt(size) * weight``.

  ``x / sqrt(mean(x^2) + eps) = sqrt(size) * x / sqrt(sum(x^2) + size * eps)``;
  the factor ``sqrt(size) * weight`` is folded into the next linear map.
  """
  ss = g.op("ReduceSumSquare", [x], f"{hint}_ss", axes=[axis], keepdims=1)
  rms = g.op("Sqrt", [g.op("Add", [ss, g.const(size * RMS_EPS, "eps")])], f"{hint}_rms")
  return g.op("Div", [x, rms], hint)


def _softplus(g: _Graph, x: str, hint: str) -> str:
  """``softplus(x) = relu(x) + log1p(exp(-|x|))`` from vectorised ops.

  onnxruntime's ``Softplus`` kernel is scalar: 2.5x (batch 1) to 5.5x (batch
  256) slower than 7 ops ``relu(x) + log(1 + exp(-|x|))`` on [b, 2, 16, 40] and
  [b, 2, 16, 96] (2-core machine, load 5.5), and those 7 ops round ``1 + e``:
  the default run's s4 logits moved 2x further from JAX (1.4e-4 against
  6.9e-5), past the export's 1e-4 tolerance, so these 11 stay. ``log1p(e)`` is ``log(u) * e / (u - 1)`` with
  ``u = 1 + e`` (Goldberg's trick: a few ulps, where ``log(1 + e)`` alone would
  lose ``e``'s low bits); where ``u == 1`` (``e < 2**-24``) it returns 0, an
  absolute error below 6e-8.
  """
  one = g.const(1.0, "one")
  e = g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])], f"{hint}_e")
  u = g.op("Add", [e, one], f"{hint}_u")
  d = g.op("Max", [g.op("Sub", [u, one]), g.const(1e-30, "tiny")], f"{hint}_d")
  log1p = g.op("Mul", [g.op("Log", [u]), g.op("Div", [e, d])], f"{hint}_log1p")
  return g.op("Add", [g.op("Relu", [x]), log1p], hint)


def _silu(g: _Graph, x: str, hint: str) -> str:
  return g.op("Mul", [x, g.op("Sigmoid", [x])], hint)


def _conv_weights(kernels: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
  """Flax [K, 1, E] causal taps of each branch -> one grouped Conv weight and its pads.

  One branch: weight [E, 1, K], pads (K-1, 0): ``y_t = sum_j w[j] x_{t-K+1+j}``.
  Two branches (forward, reversed): weight [2E, 1, 2K-1], pads (K-1, K-1); the
  forward channels use taps 0..K-1 (causal), the reversed ones taps K-1..2K-2
  with the kernel reversed: the causal conv of the flipped sequence is the
  anti-causal ``y_t = sum_m kernel[K-1-m] x_{t+m}`` of the original one.
  """
  taps, _, e = kernels[0].shape
  if len(kernels) == 1:
    return np.ascontiguousarray(kernels[0][:, 0, :].T[:, None, :]), [taps - 1, 0]
  weight = np.zeros((2 * e, 1, 2 * taps - 1), np.float32)
  weight[:e, 0, :taps] = kernels[0][:, 0, :].T
  weight[e:, 0, taps - 1 :] = kernels[1][::-1, 0, :].T
  return weight, [taps - 1, taps - 1]


def _dual_matrices(length: int, reverse: bool) -> dict[str, np.ndarray]:
  """Constant 0/1 matrices of the dual form over the causal pairs of one branch.

  The T = L(L+1)/2 pairs ``k = (t_k, s_k)`` with ``s_k <= t_k`` (forward; ``s_k >= t_k``
  for the reversed branch), in row-major order, index the last axis of:

  * ``P`` [L, T]: ``(dt @ P)[k] = delta_k``, the sum of the step sizes that
    decay the contribution of step s_k to the state at step t_k: ``r in (s, t]``
    (forward) or ``r in [t, s)`` (reversed); a sum of positive terms, so no
    cancellation (unlike a difference of cumulative sums);
  * ``Rt``, ``Rs`` [L, T]: ``(v @ Rt)[k] = v[t_k]``, ``(v @ Rs)[k] = v[s_k]``;
  * ``St`` [T, L] = ``Rt.T``: ``(m @ St)[t] = sum_{k: t_k = t} m[k]``.
  """
  pairs = [(t, s) for t in range(length) for s in range(length) if (s >= t if reverse else s <= t)]
  t_k = np.array([t for t, _ in pairs])
  s_k = np.array([s for _, s in pairs])
  r = np.arange(length)[:, None]
  if reverse:
    p = (r >= t_k) & (r < s_k)
  else:
    p = (r > s_k) & (r <= t_k)
  rt = (r == t_k).astype(np.float32)
  return {
      "P": p.astype(np.float32),
      "Rt": rt,
      "Rs": (r == s_k).astype(np.float32),
      "St": np.ascontiguousarray(rt.T),
  }


def _mixer(g: _Graph, normed: str, mixer: Mapping, scale: np.ndarray, config, form: str, hint):
  """MambaMixer on ``normed`` [b, d, L] (times ``scale`` per channel) -> [b, d, L].

  The branches (forward, and reversed if bidirectional) are stacked: in_proj
  writes ``x`` and ``z`` once per branch, one grouped Conv serves both, the
  branch-wise tensors are [b, nb, E, L], and out_proj (its weight repeated per
  branch) sums the gated branch outputs.
  """
  length, d, e, n = config.num_tokens, config.d_model, config.d_inner, config.d_state
  rank = config.resolved_dt_rank
  suffixes = ["", "_b"] if config.bidirectional else [""]
  nb = len(suffixes)
  w_in = _np(mixer, "in_proj", "kernel") * scale[:, None]  # [d, 2E], norm weight folded
  w_in = np.concatenate([w_in[:, :e]] * nb + [w_in[:, e:]] * nb, axis=1)  # [d, 2*nb*E]
  xz = g.op("MatMul", [g.const(w_in.T, f"{hint}_in_w"), normed], f"{hint}_xz")
  x, z = g.op("Split", [xz, g.ints([nb * e, nb * e], "split")], f"{hint}_xz", n_out=2, axis=1)
  conv_w, pads = _conv_weights([_np(mixer, "conv1d" + sfx, "kernel") for sfx in suffixes])
  conv_b = np.concatenate([_np(mixer, "conv1d" + sfx, "bias") for sfx in suffixes])
  # The depthwise conv as a 2-D Conv over [b, nb*E, 1, L] with [1, K] kernels:
  # onnxruntime's grouped 1-D Conv took 1.7-3x as long at batch 1 and 6-13x at batch
  # 256 on [b, 80 or 192, 16] (2-core machine, load 4).
  x4 = g.op("Reshape", [x, g.ints([-1, nb * e, 1, length])], f"{hint}_x4")
  conv = g.op(
      "Conv",
      [x4, g.const(conv_w[:, :, None, :], f"{hint}_conv_w"), g.const(conv_b, f"{hint}_conv_b")],
      f"{hint}_conv",
      group=nb * e,
      kernel_shape=[1, conv_w.shape[-1]],
      pads=[0, pads[0], 0, pads[1]],
  )  # [b, nb*E, 1, L]
  u = g.op(
      "Reshape", [_silu(g, conv, f"{hint}_u"), g.ints([-1, nb, e, length])], f"{hint}_u4"
  )  # [b, nb, E, L]
  # x_proj then dt_proj, folded into one [E, E] matrix for the dt rows:
  # delta = (u^T Wx_dt) Wdt + bias = u^T (Wx_dt Wdt) + bias.
  w_x = []
  for sfx in suffixes:
    wx = _np(mixer, "x_proj" + sfx, "kernel")  # [E, R + 2N]
    wdt = _np(mixer, "dt_proj" + sfx, "kernel")  # [R, E]
    w_x.append(np.concatenate([wx[:, :rank] @ wdt, wx[:, rank:]], axis=1))  # [E, E + 2N]
  w_x = np.stack(w_x)  # [nb, E, E + 2N]
  dt_bias = np.stack([_np(mixer, "dt_proj" + sfx, "bias") for sfx in suffixes])  # [nb, E]
  a = -np.exp(np.stack([_np(mixer, "A_b_log" if sfx else "A_log") for sfx in suffixes]))
  if form == "dual":
    proj = g.op("MatMul", [g.const(w_x.transpose(0, 2, 1), f"{hint}_xproj_w"), u], f"{hint}_xproj")
    delta, b_mat, c_mat = g.op(
        "Split", [proj, g.ints([e, n, n], "split")], f"{hint}_dbc", n_out=3, axis=2
    )  # [b, nb, E, L], [b, nb, N, L], [b, nb, N, L]
    dt = _softplus(
        g, g.op("Add", [delta, g.const(dt_bias[..., None], f"{hint}_dt_b")]), f"{hint}_dt"
    )
    dtu = g.op("Mul", [dt, u], f"{hint}_dtu")  # [b, nb, E, L]
    # y_t = sum_{k: t_k = t} v_{s_k} sum_n C_t[n] B_s[n] exp(A[n] delta_k) over the
    # causal pairs k = (t, s) (see _dual_matrices), v = dt * u: [b, nb, E, N, T] work.
    mats = [_dual_matrices(length, reverse=bool(sfx)) for sfx in suffixes]
    num_pairs = mats[0]["P"].shape[1]

    def stacked(key):  # [nb, ., .], shared by all layers
      return g.shared(
          ("dual", key, length, nb), lambda: np.stack([m[key] for m in mats]), f"dual_{key}"
      )

    dsum = g.op("MatMul", [dt, stacked("P")], f"{hint}_dsum")  # [b, nb, E, T]
    dsum = g.op("Reshape", [dsum, g.ints([-1, nb, e, 1, num_pairs])], f"{hint}_dsum5")
    decay = g.op(
        "Exp", [g.op("Mul", [dsum, g.const(a[..., None], f"{hint}_A")])], f"{hint}_W"
    )  # [b, nb, E, N, T]
    c_t = g.op("MatMul", [c_mat, stacked("Rt")], f"{hint}_Ct")  # [b, nb, N, T]
    b_s = g.op("MatMul", [b_mat, stacked("Rs")], f"{hint}_Bs")  # [b, nb, N, T]
    cb = g.op("Mul", [c_t, b_s], f"{hint}_cb")
    cb = g.op("Reshape", [cb, g.ints([-1, nb, 1, n, num_pairs])], f"{hint}_cb5")
    m = g.op(
        "ReduceSum", [g.op("Mul", [decay, cb]), g.ints([3], "axes")], f"{hint}_M", keepdims=0
    )  # [b, nb, E, T]
    v_s = g.op("MatMul", [dtu, stacked("Rs")], f"{hint}_v")  # [b, nb, E, T]
    y = g.op("MatMul", [g.op("Mul", [m, v_s]), stacked("St")], f"{hint}_y4")  # [b, nb, E, L]
  elif form == "recurrent":
    # Time-major per branch, [b, nb, L, ...], so that the per-step Split and the
    # Concat copy contiguous blocks. Both branches run in one loop over "scan
    # time": the reversed branch's sequence is flipped (x_proj, softplus and
    # dt * u are pointwise in time) and its output flipped back, each by a
    # MatMul with a constant [nb, L, L] permutation (identity for the forward
    # branch), which is exact.
    u_t = g.op("Transpose", [u], f"{hint}_uT", perm=[0, 1, 3, 2])  # [b, nb, L, E]
    flip = None
    if nb > 1:
      flip = g.shared(
          ("flip", length),
          lambda: np.stack([np.eye(length), np.eye(length)[::-1]]).astype(np.float32),
          "flip",
      )
      u_t = g.op("MatMul", [flip, u_t], f"{hint}_uT_scan_time")
    proj = g.op("MatMul", [u_t, g.const(w_x, f"{hint}_xproj_w")], f"{hint}_xproj")
    delta, b_mat, c_mat = g.op(
        "Split", [proj, g.ints([e, n, n], "split")], f"{hint}_dbc", n_out=3, axis=3
    )  # [b, nb, L, E], [b, nb, L, N], [b, nb, L, N]
    dt = _softplus(
        g, g.op("Add", [delta, g.const(dt_bias[:, None, :], f"{hint}_dt_b")]), f"{hint}_dt"
    )
    dtu = g.op("Mul", [dt, u_t], f"{hint}_dtu")  # [b, nb, L, E]
    # States [b, nb, L, N, E]: E innermost, so every broadcast multiplies rows of E
    # contiguous values (with N innermost onnxruntime's broadcast loops ran over 4-16).
    dt5 = g.op("Unsqueeze", [dt, g.ints([3], "axes")], f"{hint}_dt5")  # [b, nb, L, 1, E]
    a_ne = np.ascontiguousarray(a.transpose(0, 2, 1)[:, None])  # [nb, 1, N, E]
    d_a = g.op(
        "Exp", [g.op("Mul", [dt5, g.const(a_ne, f"{hint}_A")])], f"{hint}_dA"
    )  # [b, nb, L, N, E]
    dtu5 = g.op("Unsqueeze", [dtu, g.ints([3], "axes")], f"{hint}_dtu5")  # [b, nb, L, 1, E]
    b5 = g.op("Unsqueeze", [b_mat, g.ints([4], "axes")], f"{hint}_b5")  # [b, nb, L, N, 1]
    d_bu = g.op("Mul", [dtu5, b5], f"{hint}_dBu")  # [b, nb, L, N, E]
    if length == 1:
      states = d_bu
    else:
      da_t = g.op("Split", [d_a], f"{hint}_dA_t", n_out=length, axis=2)
      dbu_t = g.op("Split", [d_bu], f"{hint}_dBu_t", n_out=length, axis=2)
      hs = [dbu_t[0]]
      for t in range(1, length):
        hs.append(g.op("Add", [g.op("Mul", [da_t[t], hs[-1]]), dbu_t[t]], f"{hint}_h"))
      states = g.op("Concat", hs, f"{hint}_H", axis=2)  # [b, nb, L, N, E]
    c5 = g.op("Unsqueeze", [c_mat, g.ints([4], "axes")], f"{hint}_c5")  # [b, nb, L, N, 1]
    y = g.op(
        "ReduceSum", [g.op("Mul", [states, c5]), g.ints([3], "axes")], f"{hint}_yT", keepdims=0
    )  # [b, nb, L, E]
    if flip is not None:
      y = g.op("MatMul", [flip, y], f"{hint}_yT_time")
    y = g.op("Transpose", [y], f"{hint}_y4", perm=[0, 1, 3, 2])  # [b, nb, E, L]
  else:
    raise ValueError(f"scan form {form!r} is not 'dual' or 'recurrent'")
  d_skip = np.stack([_np(mixer, "D" + sfx) for sfx in suffixes])[..., None]  # [nb, E, 1]
  y = g.op("Add", [y, g.op("Mul", [u, g.const(d_skip, f"{hint}_D")])], f"{hint}_y")
  y = g.op("Reshape", [y, g.ints([-1, nb * e, length])], f"{hint}_y3")  # [b, nb*E, L]
  gated = g.op("Mul", [y, _silu(g, z, f"{hint}_gate")], f"{hint}_gated")  # [b, nb*E, L]
  w_out = np.concatenate([_np(mixer, "out_proj", "kernel")] * nb, axis=0)  # [nb*E, d]
  return g.op("MatMul", [g.const(w_out.T, f"{hint}_out_w"), gated], f"{hint}_mix")


def _block(g: _Graph, hidden: str, block: Mapping, config: "ModelConfig", form: str, i: int):
  """Pre-norm residual Mamba block on hidden [b, d, L]."""
  hint = f"l{i}"
  normed = _rms_denominator(g, hidden, 1, config.d_model, f"{hint}_norm")
  scale = _np(block, "norm", "weight") * np.sqrt(np.float32(config.d_model))
  out = _mixer(g, normed, block["mixer"], scale, config, form, hint)
  return g.op("Add", [hidden, out], f"{hint}_res")


def _member_nodes(g: _Graph, config: "ModelConfig", params: Mapping, form: str, prev: str | None):
  """Appends one member's nodes reading ``INPUT``; returns (logits [b, K], features [b, d])."""
  h, w, c = config.image_shape
  p, d, length = config.patch_size, config.d_model, config.num_tokens
  # Patch embedding: NHWC -> NCHW, a Conv with kernel = stride = p -> [b, d, L].
  nchw = g.op("Transpose", [INPUT], "nchw", perm=[0, 3, 1, 2])
  kernel = _np(params, "patch_embed", "proj", "kernel")  # [p, p, C, d] (HWIO)
  tokens = g.op(
      "Conv",
      [
          nchw,
          g.const(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), "patch_w"),
          g.const(_np(params, "patch_embed", "proj", "bias"), "patch_b"),
      ],
      "patches",
      kernel_shape=[p, p],
      strides=[p, p],
  )
  tokens = g.op("Reshape", [tokens, g.ints([-1, d, length])], "tokens")  # row-major patches
  pos = _np(params, "pos_embed")[0].T  # [d, L]
  hidden = g.op("Add", [tokens, g.const(pos, "pos")], "embedded")
  for i in range(config.n_layers):
    hidden = _block(g, hidden, params[f"layers_{i}"], config, form, i)
  # Final RMSNorm and pooling; the norm's weight is applied after pooling (both
  # pool over tokens, the weight is per channel).
  if config.pool == "mean":
    normed = _rms_denominator(g, hidden, 1, d, "norm_f")
    pooled = g.op("ReduceMean", [normed], "pooled", axes=[2], keepdims=0)
  elif config.pool == "last":
    last = g.op("Gather", [hidden, g.ints(length - 1, "last")], "last_token", axis=2)
    pooled = _rms_denominator(g, last, 1, d, "norm_f")
  else:
    raise ValueError(f"pool={config.pool!r} is not 'mean' or 'last'")
  norm_w = _np(params, "norm_f", "weight") * np.sqrt(np.float32(d))
  features = g.op("Mul", [pooled, g.const(norm_w, "norm_f_w")], "pooled_w")
  if config.connect_dim:
    if prev is None:
      raise ValueError("a connected member (connect_dim > 0) needs the previous features")
    connect_w = g.const(_np(params, "connect", "kernel"), "connect_w")
    projected = g.op(
        "Add",
        [g.op("MatMul", [prev, connect_w]), g.const(_np(params, "connect", "bias"), "connect_b")],
        "connected",
    )
    features = g.op("Add", [features, projected], "features_sum")
  head = g.op("MatMul", [features, g.const(_np(params, "head", "kernel"), "head_w")], "head")
  logits = g.op("Add", [head, g.const(_np(params, "head", "bias"), "head_b")], "logits")
  return logits, features


def _model(g: _Graph, inputs, outputs, name: str, doc: str, opset: int) -> onnx.ModelProto:
  """The checked ModelProto of ``g``; ``outputs`` are (graph name, node output, shape)."""
  for out_name, node_out, _ in outputs:
    g.nodes.append(helper.make_node("Identity", [node_out], [out_name]))
  graph = helper.make_graph(
      g.nodes,
      name,
      inputs,
      [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, _, s in outputs],
      g.initializers,
  )
  model = helper.make_model(
      graph,
      opset_imports=[helper.make_opsetid("", opset)],
      producer_name="mamba_pkd.edge.onnx_lower",
      doc_string=doc,
  )
  model.ir_version = IR_VERSION
  onnx.checker.check_model(model, full_check=True)
  return model


def _image_input(config: "ModelConfig"):
  return helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["b", *config.image_shape])


def member_to_onnx(
    config: "ModelConfig",
    params: Mapping,
    *,
    opset: int = OPSET,
    scan_form: str = "auto",
    name: str = "member",
) -> onnx.ModelProto:
  """Lowers ``MambaClassifier(config)`` with ``params`` to a checked ONNX model.

  Args:
    config: the member's ModelConfig (uni- or bidirectional, mean or last
      pooling, connected or not; ``scan_method`` is ignored).
    params: its Flax ``params`` (nested dict of numpy or JAX arrays; a
      student's ensemble weight already folded into ``head``).
    opset: ONNX opset of the default domain; only :data:`OPSET` (17) is written
      (the graph uses ReduceMean with ``axes`` as an attribute, < 18 semantics).
    scan_form: one of :data:`SCAN_FORMS` (module docstring).
    name: the graph name.

  Returns:
    An ``onnx.ModelProto`` (inputs ``x`` [+ ``prev_features``], outputs
    ``logits``, ``features``; batch dimension ``"b"``), already passed through
    ``onnx.checker.check_model``.
  """
  if opset != OPSET:
    raise ValueError(f"opset={opset} is not supported; the lowering writes opset {OPSET}")
  check_lowerable(config, name or "member")
  form = resolve_scan_form(config, scan_form)
  g = _Graph()
  inputs = [_image_input(config)]
  prev = None
  if config.connect_dim:
    prev = PREV_INPUT
    inputs.append(helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["b", config.connect_dim]))
  logits, features = _member_nodes(g, config, params, form, prev)
  outputs = [
      (LOGITS, logits, ["b", config.num_classes]),
      (FEATURES, features, ["b", config.d_model]),
  ]
  return _model(g, inputs, outputs, name, f"MambaClassifier member, scan form {form}", opset)


def prefix_to_onnx(
    configs: Sequence["ModelConfig"],
    params: Sequence[Mapping],
    *,
    opset: int = OPSET,
    scan_form: str = "auto",
    name: str = "prefix",
) -> onnx.ModelProto:
  """The prefix ``F_k = f_1 + ... + f_k`` of k members as ONE checked ONNX graph.

  Members are lowered as in :func:`member_to_onnx` (connected members read
  their predecessor's features inside the graph) and their logits summed in
  order, so one onnxruntime call runs the whole prefix (no Python between
  members). Input ``x`` [b, H, W, C] (normalised), output ``logits`` [b, K].
  """
  if opset != OPSET:
    raise ValueError(f"opset={opset} is not supported; the lowering writes opset {OPSET}")
  if not configs or len(configs) != len(params):
    raise ValueError(f"need one params per config, got {len(configs)} and {len(params)}")
  g = _Graph()
  total, prev, forms = None, None, []
  for config, p in zip(configs, params):
    forms.append(resolve_scan_form(config, scan_form))
    logits, prev = _member_nodes(g, config, p, forms[-1], prev)
    total = logits if total is None else g.op("Add", [total, logits], "prefix_sum")
  outputs = [(LOGITS, total, ["b", configs[0].num_classes])]
  doc = f"sum of {len(configs)} MambaClassifier members, scan forms {forms}"
  return _model(g, [_image_input(configs[0])], outputs, name, doc, opset)
