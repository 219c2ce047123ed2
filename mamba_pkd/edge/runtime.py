r"""Anytime ensemble of ONNX members on onnxruntime: needs ONLY ``numpy`` and ``onnxruntime``.

No JAX, Flax or other ``mamba_pkd`` module is imported (``mamba_pkd/__init__``
imports its names lazily), so this file also works copied alone onto a device.

API (for ``predict --runtime=onnx``)::

    from mamba_pkd.edge.runtime import OnnxEnsemble, confidence
    ens = OnnxEnsemble(
        ["member_1.onnx", "member_2.onnx"],          # paths or serialized bytes
        member_meta=[{"name": "student_1", "flops": 1.2e6, "connect_dim": 0,
                      "prefix_scale": 1.0}, ...],    # export.json's "members"
        preprocessing={"mean": [...], "std": [...], "image_shape": [28, 28, 1],
                       "num_classes": 10},           # export.json's "preprocessing"
    )
    ens.logits(images, num_members=2)                # F_2 = f_1 + f_2, [N, K]
    res = ens.cascade(images, thresholds=0.9)        # early exit
    res.classes, res.members_used, res.mean_flops

Each member file is what :func:`mamba_pkd.edge.onnx_lower.member_to_onnx`
writes: input ``x`` float32 [b, H, W, C] normalised (+ ``prev_features``
[b, connect_dim] for a connected student), outputs ``logits`` [b, K] and
``features`` [b, d]. Ensemble weights are folded into the heads, so a prefix
is the plain sum of its members' logits.

Early exit (:meth:`OnnxEnsemble.cascade`): member 1 runs on every image; after
member j (j < k) the images whose :func:`confidence` of the prefix logits
``F_j`` is ``>= thresholds[j-1]`` stop with ``F_j``; member j+1 runs only on the
others. The confidence rule is :func:`confidence`; with ``rule="margin"``
and ``scale = prefix_scale`` it is the rule of ``mamba_pkd.predict.anytime_predict``
(``softmax_margin(prefix_scale_j * F_j) >= confidence``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

CONFIDENCE_RULES = ("margin", "max_prob")


def confidence(logits: np.ndarray, scale: float = 1.0, rule: str = "margin") -> np.ndarray:
  """Confidence of each row of prefix logits, in [0, 1].

  ``p = softmax(scale * logits)`` (``scale``: the prefix's calibration
  temperature inverse, ``prefix_scale``), computed in float64; then

  * ``rule="margin"``: ``p_top1 - p_top2`` (``mamba_pkd.predict.softmax_margin``);
  * ``rule="max_prob"``: ``p_top1``.

  Args:
    logits: [N, K] prefix logits ``F_j``.
    scale: multiplies the logits before the softmax.
    rule: one of :data:`CONFIDENCE_RULES`.

  Returns:
    float32 [N].
  """
  if rule not in CONFIDENCE_RULES:
    raise ValueError(f"rule={rule!r} must be one of {CONFIDENCE_RULES}")
  z = scale * np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(axis=-1, keepdims=True)
  if rule == "max_prob":
    return p.max(axis=-1).astype(np.float32)
  top2 = np.sort(p, axis=-1)[:, -2:]
  return (top2[:, 1] - top2[:, 0]).astype(np.float32)


def session_options(intra_op_threads: int | None = 1) -> ort.SessionOptions:
  """onnxruntime options for low latency on a small CPU.

  Full graph optimisation (``ORT_ENABLE_ALL``), sequential execution, and
  ``intra_op_threads`` threads per op (default 1: these members are small, and
  thread hand-offs cost more than they save: ``experiments/bench_edge.py
  --threads=1,2`` on the smoke run, 2 shared cores, batch 1: 0.036 ms with 1
  thread, 0.035 ms with 2 for student 1, 0.116 vs 0.366 ms for the teacher;
  batch 256: 0.013 vs 0.025 ms per image). ``None`` leaves onnxruntime's
  default (one thread per physical core).
  """
  opts = ort.SessionOptions()
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  if intra_op_threads is not None:
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    if intra_op_threads == 1:
      opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
  opts.log_severity_level = 3
  return opts


def load_session(
    model: str | os.PathLike | bytes, *, intra_op_threads: int | None = 1
) -> ort.InferenceSession:
  """An ``InferenceSession`` of one ONNX member (path or serialized bytes) on the CPU."""
  source = model if isinstance(model, bytes) else str(model)
  return ort.InferenceSession(
      source, sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
  )


@dataclasses.dataclass
class CascadeResult:
  """Per-image outcome of :meth:`OnnxEnsemble.cascade`.

  Attributes:
    logits: float32 [N, K], ``F_{m_i}`` of image i, m_i = members_used[i].
    classes: int32 [N], argmax of ``logits``.
    confidences: float32 [N], :func:`confidence` of ``logits`` at the exit prefix.
    members_used: int32 [N], m_i in 1..k.
    mean_flops: mean over images of the cumulative FLOPs of prefix 1..m_i.
  """

  logits: np.ndarray
  classes: np.ndarray
  confidences: np.ndarray
  members_used: np.ndarray
  mean_flops: float


def cascade_mean_flops(members_used: np.ndarray, member_flops: Sequence[float]) -> float:
  """``sum_i cumflops[m_i - 1] / N``: the mean cost of an early-exit run.

  Args:
    members_used: int [N], the prefix length m_i at which image i stopped (>= 1).
    member_flops: FLOPs per image of each member, in ensemble order.
  """
  used = np.asarray(members_used, np.int64)
  if used.size == 0:
    return 0.0
  cumulative = np.cumsum(np.asarray(member_flops, np.float64))
  return float(cumulative[used - 1].mean())


class OnnxEnsemble:
  """Members as onnxruntime sessions; prefix logits and early exit.

  Args:
    members: one ONNX model per member, in ensemble order (paths or bytes).
    member_meta: one dict per member with ``flops`` (per image) and optionally
      ``connect_dim`` (default 0), ``prefix_scale`` (default 1.0), ``name``,
      ``size`` (``export.json``'s ``members`` entries have all of these).
    preprocessing: dict with ``mean``, ``std`` (per channel), ``image_shape``
      (H, W, C) and ``num_classes`` (``export.json``'s ``preprocessing``).
    intra_op_threads: threads per op in each session (:func:`session_options`).
    max_batch: largest batch one session call gets; bigger inputs are run in
      chunks (the dual scan form holds [b, 2, E, N, L(L+1)/2] float32
      temporaries: a wide member at b = 256 needs gigabytes).
  """

  def __init__(
      self,
      members: Sequence[str | os.PathLike | bytes],
      member_meta: Sequence[Mapping],
      preprocessing: Mapping,
      *,
      intra_op_threads: int | None = 1,
      max_batch: int = 256,
  ):
    if len(members) != len(member_meta) or not members:
      raise ValueError(
          f"need one member_meta per member and at least one member, got "
          f"{len(members)} members and {len(member_meta)} member_meta"
      )
    self.member_meta = [dict(m) for m in member_meta]
    if self.member_meta[0].get("connect_dim", 0):
      raise ValueError("the first member reads a previous member's features (connect_dim > 0)")
    self.image_shape = tuple(int(s) for s in preprocessing["image_shape"])
    self.num_classes = int(preprocessing["num_classes"])
    self.mean = np.asarray(preprocessing["mean"], np.float32)
    self.std = np.asarray(preprocessing["std"], np.float32)
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch!r} must be >= 1")
    self.max_batch = int(max_batch)
    self.sessions = [load_session(m, intra_op_threads=intra_op_threads) for m in members]
    self.member_flops = [float(m["flops"]) for m in self.member_meta]
    self.prefix_scales = [float(m.get("prefix_scale", 1.0)) for m in self.member_meta]

  @property
  def num_members(self) -> int:
    return len(self.sessions)

  def normalize(self, images: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """The model input float32 [N, H, W, C] from uint8 pixels (0..255), float pixels
    in [0, 1], or (``normalized=True``) already normalised floats."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"images must have shape [N, {', '.join(map(str, self.image_shape))}], "
          f"got {tuple(images.shape)}"
      )
    if normalized:
      return np.ascontiguousarray(images, np.float32)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / np.float32(255.0)
    elif not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be uint8 or float pixels, got dtype {images.dtype}")
    return np.ascontiguousarray((images.astype(np.float32) - self.mean) / self.std, np.float32)

  def member_forward(
      self, j: int, x: np.ndarray, prev_features: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Member ``j`` (0-based) on normalised ``x``: (logits [N, K], features [N, d_j])."""
    feeds = {"x": x}
    if self.member_meta[j].get("connect_dim", 0):
      if prev_features is None:
        raise ValueError(f"member {j + 1} is connected: pass prev_features")
      feeds["prev_features"] = np.ascontiguousarray(prev_features, np.float32)
    if len(x) <= self.max_batch:
      logits, features = self.sessions[j].run(None, feeds)
      return logits, features
    parts = [
        self.sessions[j].run(None, {k: v[i : i + self.max_batch] for k, v in feeds.items()})
        for i in range(0, len(x), self.max_batch)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  def _resolve_k(self, num_members: int | None) -> int:
    k = self.num_members if num_members is None else num_members
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_members:
      raise ValueError(f"num_members={num_members!r} must be in 1..{self.num_members}")
    return int(k)

  def logits(
      self, images: np.ndarray, num_members: int | None = None, *, normalized: bool = False
  ) -> np.ndarray:
    """``F_k = f_1 + ... + f_k`` (k = ``num_members``, default all): float32 [N, K]."""
    k = self._resolve_k(num_members)
    x = self.normalize(images, normalized=normalized)
    total, prev = None, None
    for j in range(k):
      member_logits, prev = self.member_forward(j, x, prev)
      total = member_logits if total is None else total + member_logits
    return total

  __call__ = logits

  def cascade(
      self,
      images: np.ndarray,
      thresholds: float | Sequence[float],
      *,
      num_members: int | None = None,
      rule: str = "margin",
      scales: Sequence[float] | None = None,
      normalized: bool = False,
  ) -> CascadeResult:
    """Early exit over the prefixes 1..k (see the module docstring).

    Args:
      images: [N, H, W, C] (see :meth:`normalize`).
      thresholds: one threshold for every prefix, or k-1 values (prefix j's
        threshold at index j-1; a k-th value is ignored: the last prefix
        always stops).
      num_members: k (default all).
      rule: :func:`confidence` rule.
      scales: per-prefix logit scale for :func:`confidence` (default: each
        member's ``prefix_scale``).
      normalized: inputs are already normalised.
    """
    k = self._resolve_k(num_members)
    x = self.normalize(images, normalized=normalized)
    thr = np.asarray(thresholds, np.float64)
    if thr.ndim == 0:
      thr = np.full(k - 1, float(thr))
    elif thr.ndim != 1 or len(thr) not in (k - 1, k):
      raise ValueError(
          f"thresholds must be one value or {k - 1} values (one per prefix 1..{k - 1}) "
          f"for {k} members, got {np.shape(thresholds)}"
      )
    scales = self.prefix_scales[:k] if scales is None else [float(s) for s in scales]
    n = len(x)
    logits = np.zeros((n, self.num_classes), np.float32)
    used = np.zeros(n, np.int32)
    active = np.arange(n)
    prev_all = None
    for j in range(k):
      if len(active) == 0:
        break
      prev = prev_all[active] if self.member_meta[j].get("connect_dim", 0) else None
      member_logits, features = self.member_forward(j, x[active], prev)
      logits[active] += member_logits
      used[active] = j + 1
      prev_all = np.zeros((n, features.shape[1]), np.float32)
      prev_all[active] = features
      if j < k - 1:
        active = active[confidence(logits[active], scales[j], rule) < thr[j]]
    conf = np.empty(n, np.float32)
    for j in range(1, k + 1):
      rows = used == j
      if rows.any():
        conf[rows] = confidence(logits[rows], scales[j - 1], rule)
    return CascadeResult(
        logits=logits,
        classes=logits.argmax(-1).astype(np.int32),
        confidences=conf,
        members_used=used,
        mean_flops=cascade_mean_flops(used, self.member_flops),
    )


def read_bytes(path: str | os.PathLike) -> bytes:
  """The bytes of a file (to pass models as bytes)."""
  return pathlib.Path(path).read_bytes()
