r"""An export bundle of ONNX files (``python -m mamba_pkd.export --format=onnx``).

Needs ``numpy``, ``onnx`` and (for ``int8``) ``onnxruntime``; the members come
from a finished run (:func:`mamba_pkd.export.export_run` loads them), the
graphs from :mod:`mamba_pkd.edge.onnx_lower`, the sidecar fields shared with
the StableHLO bundle from :func:`mamba_pkd.sidecar.build_sidecar`.

Bundle layout (one directory; ``b`` is a symbolic batch dimension)::

    export.json        sidecar, "artifact": "onnx": preprocessing constants,
                       members (size, FLOPs, params, config, file, scan form),
                       the run's test accuracy per prefix, its combination
                       (per-prefix weights and temperatures, the early-exit
                       thresholds per budget) for a bundle of all its students,
                       and "onnx": opset, IR version, onnx version, files
    member_<j>.onnx    member j: x f32[b, H, W, C] (+ prev_features f32[b, c]
                       for a connected student) -> logits f32[b, K],
                       features f32[b, d_j] (the cascade runs these one by one)
    prefix_<k>.onnx    students 1..k in ONE graph: x -> logits F_k f32[b, K]
    teacher.onnx       only when a stored early-exit rule ends at the teacher
    *.int8.onnx        with ``int8=True``: :func:`quantize_int8` of each file

``x`` is the normalised input ``(uint8 / 255 - mean) / std`` (NHWC);
:class:`mamba_pkd.edge.runtime.OnnxEnsemble` applies it.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Sequence

import onnx

from mamba_pkd import manifest, sidecar
from mamba_pkd.combine import Combination
from mamba_pkd.edge import onnx_lower
from mamba_pkd.ensemble import Member
from mamba_pkd.preprocessing import Preprocessing

TEACHER_FILE = "teacher.onnx"


def member_file(j: int, int8: bool = False) -> str:
  return f"member_{j}{'.int8' if int8 else ''}.onnx"


def prefix_file(k: int, int8: bool = False) -> str:
  return f"prefix_{k}{'.int8' if int8 else ''}.onnx"


def save(model: onnx.ModelProto, path: str | pathlib.Path) -> pathlib.Path:
  """Writes ``model`` to ``path`` (one file, weights inside) and returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.SerializeToString())
  return path


# Initializers of the scan's structure (0/1 pair matrices, time flips): never quantized.
_STRUCTURAL_PREFIXES = ("dual_", "flip", "shift")


def quantize_int8(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
  """Dynamic int8 quantisation of an ONNX member or prefix; writes ``dst`` and returns it.

  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
  quantised per call) on the ``MatMul`` nodes whose *second* input is a weight:
  with this lowering's channels-first layout that is the classifier ``head``
  (and ``connect``) and, in the recurrent scan form, each block's ``x_proj``.
  ``in_proj`` and ``out_proj`` multiply a constant from the left, which
  ``quantize_dynamic`` does not quantise, and the scan's constant 0/1 and
  permutation matrices are excluded on purpose (quantising them would quantise
  the step sizes). On the default run's 1,000 test digits the accuracy changes
  by at most 0.1 points per prefix (``experiments/bench_edge.py``). Needs
  onnxruntime.
  """
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top

  model = onnx.load(str(src))
  structural = {
      init.name for init in model.graph.initializer if init.name.startswith(_STRUCTURAL_PREFIXES)
  }
  exclude = [
      node.name
      for node in model.graph.node
      if node.op_type == "MatMul" and any(i in structural for i in node.input)
  ]
  dst = pathlib.Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger on every call
  try:
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude,
    )
  finally:
    root.setLevel(level)
  return dst


def export_onnx(
    members: Sequence[Member],
    out_dir: str | pathlib.Path,
    *,
    preprocessing: Preprocessing,
    teacher_flops: int,
    prefix_accuracy: Sequence[float | None] = (),
    source: Mapping[str, Any] | None = None,
    combination: Combination | None = None,
    teacher: Member | None = None,
    scan_form: str = "auto",
    int8: bool = False,
) -> pathlib.Path:
  """Writes ``members`` (in ensemble order, configs and folded params) as an ONNX bundle.

  Args:
    members: a prefix, one student or the teacher (as :func:`export.export_members`).
    out_dir: bundle directory (created; files of the same names are replaced).
    preprocessing, teacher_flops, prefix_accuracy, source, combination:
      the sidecar fields (see :func:`mamba_pkd.sidecar.build_sidecar`).
    teacher: written as ``teacher.onnx`` (a cascade rule's last exit).
    scan_form: :data:`mamba_pkd.edge.onnx_lower.SCAN_FORMS`.
    int8: also write ``*.int8.onnx`` (:func:`quantize_int8`).

  Returns:
    The path of ``export.json``.
  """
  members = list(members)
  if not members:
    raise ValueError("members is empty: nothing to export")
  if members[0].connect_dim:
    raise ValueError(f"{members[0].name} reads the previous student's features: export a prefix")
  for m in members + ([teacher] if teacher is not None else []):
    onnx_lower.check_lowerable(m.config, m.name)  # before anything is written
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written: list[pathlib.Path] = []
  entries = []
  for j, m in enumerate(members, start=1):
    proto = onnx_lower.member_to_onnx(m.config, m.params, scan_form=scan_form, name=m.name)
    written.append(save(proto, out_dir / member_file(j)))
    form = onnx_lower.resolve_scan_form(m.config, scan_form)
    entries.append({**manifest.member_entry(m), "file": member_file(j), "scan_form": form})
  for k in range(1, len(members) + 1):
    proto = onnx_lower.prefix_to_onnx(
        [m.config for m in members[:k]],
        [m.params for m in members[:k]],
        scan_form=scan_form,
        name=f"prefix_1_{k}",
    )
    written.append(save(proto, out_dir / prefix_file(k)))
  teacher_entry = None
  if teacher is not None:
    proto = onnx_lower.member_to_onnx(teacher.config, teacher.params, scan_form=scan_form)
    written.append(save(proto, out_dir / TEACHER_FILE))
    teacher_entry = {**manifest.member_entry(teacher), "file": TEACHER_FILE}
  int8_files = []
  if int8:
    for path in written:
      int8_files.append(quantize_int8(path, path.with_suffix(".int8.onnx")).name)
  meta = sidecar.build_sidecar(
      members,
      entries,
      artifact="onnx",
      preprocessing=preprocessing,
      teacher_flops=teacher_flops,
      prefix_accuracy=prefix_accuracy,
      source=source,
      combination=combination,
      teacher_entry=teacher_entry,
  )
  meta["onnx"] = {
      "opset": onnx_lower.OPSET,
      "ir_version": onnx_lower.IR_VERSION,
      "onnx_version": onnx.__version__,
      "checked": "onnx.checker.check_model(full_check=True)",
      "prefix_files": [prefix_file(k) for k in range(1, len(members) + 1)],
      "prefix_output": "logits float32 [b, K]: F_k = f_1 + ... + f_k (weights folded)",
      "int8_files": int8_files or None,
      "int8": "onnxruntime.quantization.quantize_dynamic, QInt8 weights of right-hand MatMuls",
  }
  return sidecar.write_sidecar(out_dir, meta)
