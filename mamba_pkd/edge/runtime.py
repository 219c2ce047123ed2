r"""An ONNX export bundle on onnxruntime: prefixes and the early-exit cascade without JAX.

Needs ``numpy`` and ``onnxruntime`` only: besides them it imports the
NumPy-only modules of this package that own the ensemble arithmetic
(:mod:`mamba_pkd.ensemble`: budgets, prefix costs, anytime prediction;
:mod:`mamba_pkd.cascade` and :mod:`mamba_pkd.combine`: the stored early-exit
rules; :mod:`mamba_pkd.export`: the sidecar), never JAX or Flax
(``mamba_pkd/__init__`` imports names lazily; a test runs this module and
``predict --runtime=onnx`` in a process where importing ``jax`` fails).

API (what ``python -m mamba_pkd.predict --runtime=onnx`` uses)::

    from mamba_pkd.edge.runtime import load_onnx_export
    model = load_onnx_export("runs/default/export_onnx")   # export --format=onnx
    logits = model(images_uint8, num_members=2)             # F_2, one prefix_2.onnx call
    result = model.cascade(images_uint8, budget="2%")        # the run's early exit
    result.classes, result.members_used, result.mean_flops

A prefix runs as one graph (``prefix_<k>.onnx``: no Python between members);
the cascade (:func:`mamba_pkd.cascade.cascade_predict`, the same function
the in-process JAX models run) calls ``member_<j>.onnx`` on the images still
unsure after members 1..j-1, and ``teacher.onnx`` where a rule ends at the
teacher. ``--confidence`` early exit is :func:`mamba_pkd.ensemble.anytime_predict`.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from mamba_pkd import cascade, ensemble, manifest, sidecar
from mamba_pkd.combine import Combination
from mamba_pkd.ensemble import AnytimeResult
from mamba_pkd.preprocessing import Preprocessing


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
  """An ``InferenceSession`` of one ONNX file (path or serialized bytes) on the CPU."""
  source = model if isinstance(model, bytes) else str(model)
  return ort.InferenceSession(
      source, sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
  )


class OnnxEnsemble(ensemble.Ensemble):
  """A bundle of ``python -m mamba_pkd.export --format=onnx``, run with onnxruntime.

  The :class:`mamba_pkd.ensemble.Ensemble` interface (``logits``,
  ``member_forward``, ``costs``, ...), so budgets, ``anytime_predict`` and
  ``cascade.cascade_predict`` run on it unchanged. Sessions are created on
  first use.

  Args:
    path: the bundle directory (or its ``export.json``).
    int8: run the ``*.int8.onnx`` files (the bundle must have them).
    intra_op_threads: threads per op (:func:`session_options`).
    batch_size: largest batch of one call; bigger inputs run in chunks (no
      padding: the graphs have a symbolic batch).
  """

  def __init__(
      self,
      path: str | os.PathLike,
      *,
      int8: bool = False,
      intra_op_threads: int | None = 1,
      batch_size: int = ensemble.DEFAULT_BATCH_SIZE,
  ):
    path = pathlib.Path(path)
    directory = path.parent if path.name == sidecar.SIDECAR else path
    self.meta = sidecar.read_sidecar(directory, "onnx")
    self.directory = directory
    self.preprocessing = Preprocessing.from_json(self.meta["preprocessing"])
    self.members = [manifest.member_from_entry(m) for m in self.meta["members"]]
    self.teacher_flops = int(self.meta["teacher_flops"])
    self.prefix_accuracy = list(self.meta.get("prefix_accuracy") or [None] * len(self.members))
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    self.batch_size = int(batch_size)
    self.int8 = bool(int8)
    self.intra_op_threads = intra_op_threads
    self.description = f"ONNX export {directory}" + (" (int8)" if int8 else "")
    if int8 and not self.meta["onnx"].get("int8_files"):
      raise ValueError(f"{directory} has no int8 files: export again with --format=onnx --int8")
    self._sessions: dict[str, ort.InferenceSession] = {}
    if self.meta.get("combination"):
      self.combination = Combination.from_json(self.meta["combination"])
    if self.meta.get("teacher"):
      teacher = self.meta["teacher"]["file"]
      self.teacher_fn = lambda x: self._run_padded(self._file_fn(teacher, 1), [x])[0]

  def session(self, filename: str) -> ort.InferenceSession:
    """The (cached) session of a file of the bundle; ``int8`` picks its ``.int8.onnx``."""
    if self.int8:
      filename = filename.replace(".onnx", ".int8.onnx")
    if filename not in self._sessions:
      file = self.directory / filename
      if not file.is_file():
        raise ValueError(f"{file} is missing; the bundle in {self.directory} is incomplete")
      self._sessions[filename] = load_session(file, intra_op_threads=self.intra_op_threads)
    return self._sessions[filename]

  def _file_fn(self, filename: str, n_out: int) -> Callable:
    session = self.session(filename)
    names = [o.name for o in session.get_outputs()][:n_out]
    inputs = [i.name for i in session.get_inputs()]

    def run(*arrays):
      out = session.run(names, dict(zip(inputs, arrays)))
      return out[0] if n_out == 1 else tuple(out)

    return run

  def _member_fn(self, j: int) -> Callable:
    return self._file_fn(self.meta["members"][j]["file"], 2)

  def _prefix_fn(self, k: int) -> Callable:
    return self._file_fn(self.meta["onnx"]["prefix_files"][k - 1], 1)

  def _run_padded(self, fn: Callable, arrays) -> list[np.ndarray]:
    """``fn`` over row chunks of at most ``batch_size`` (the graphs take any batch: no padding)."""
    arrays = [np.ascontiguousarray(a, np.float32) for a in arrays]
    if len(arrays[0]) <= self.batch_size:
      result = fn(*arrays)
      return list(result) if isinstance(result, tuple) else [result]
    outs = []
    for start in range(0, len(arrays[0]), self.batch_size):
      result = fn(*[a[start : start + self.batch_size] for a in arrays])
      outs.append(result if isinstance(result, tuple) else (result,))
    return [np.concatenate(parts) for parts in zip(*outs)]

  def cascade(self, images: np.ndarray, budget: str, *, normalized: bool = False) -> AnytimeResult:
    """The run's early-exit cascade for ``budget`` (``"2%"`` of the teacher's FLOPs or
    FLOPs per image, ``"60k"``): the stored rule of the largest budget within it.

    Raises:
      BudgetError: the bundle stores no cascade (not all of the run's students)
        or none fits.
    """
    rule = cascade.rule_for_budget_text(self.combination, budget, self.teacher_flops)
    x = self.preprocessing.normalize(images, normalized=normalized)
    return cascade.cascade_predict(self, x, self.combination, rule, teacher=self.teacher_fn)

  def measure_latency_ms(self, k: int, *, batch: int = 1, repeats: int = 10) -> float:
    """Median ms of one ``prefix_<k>.onnx`` call on ``batch`` images, on this machine."""
    fn = self._prefix_fn(self.resolve_num_members(k))
    x = np.zeros((batch, *self.preprocessing.image_shape), np.float32)
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(x)
      times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def load_onnx_export(
    path: str | os.PathLike, *, int8: bool = False, batch_size: int = ensemble.DEFAULT_BATCH_SIZE
) -> OnnxEnsemble:
  """Loads an ONNX bundle: ``load_onnx_export(dir)(images) -> logits [N, K]`` (float32)."""
  return OnnxEnsemble(path, int8=int8, batch_size=batch_size)
