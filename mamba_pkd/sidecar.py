r"""The sidecar ``export.json`` of an export bundle: the contract between its writers and loaders.

Written by :mod:`mamba_pkd.export` (StableHLO bundles, ``jax.export``) and
:mod:`mamba_pkd.edge.onnx_export` (ONNX bundles); read by
``export.load_export`` and ``edge.runtime.load_onnx_export``. It imports
neither JAX nor Flax, so a JAX-free runtime can read it.

Fields every bundle has (:func:`build_sidecar`): ``format``, ``version``,
``artifact`` (``"stablehlo"`` or ``"onnx"``), ``preprocessing`` (mean, std,
image shape, class count), ``members`` (name, size, FLOPs, params, config,
weight, calibration scale, file), ``teacher_flops``, ``flops``,
``pct_teacher_flops``, ``prefix_accuracy`` (the run's test accuracy per
prefix), ``source``, ``combination`` (per-prefix weights and temperatures and
the early-exit rules per budget, for a bundle of all the run's students) and
``teacher`` (its entry where a rule ends at it). Each writer adds its own.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

from mamba_pkd.combine import Combination
from mamba_pkd.ensemble import Member
from mamba_pkd.preprocessing import Preprocessing

FORMAT = "mamba_pkd.export"
FORMAT_VERSION = 4  # 3: "combination" and "teacher"; 4: "artifact" (stablehlo or onnx)
READABLE_VERSIONS = (1, 2, 3, 4)
ARTIFACTS = ("stablehlo", "onnx")  # --format: jax.export, or ONNX (mamba_pkd.edge)
SIDECAR = "export.json"


def build_sidecar(
    members: Sequence[Member],
    member_entries: Sequence[Mapping[str, Any]],
    *,
    artifact: str,
    preprocessing: Preprocessing,
    teacher_flops: int,
    prefix_accuracy: Sequence[float | None] = (),
    source: Mapping[str, Any] | None = None,
    combination: Combination | None = None,
    teacher_entry: Mapping[str, Any] | None = None,
) -> dict:
  """The sidecar fields every bundle has (StableHLO or ONNX); the writer adds its own."""
  if artifact not in ARTIFACTS:
    raise ValueError(f"artifact={artifact!r} must be one of {ARTIFACTS}")
  total = sum(m.flops for m in members)
  accuracy = (list(prefix_accuracy) + [None] * len(members))[: len(members)]
  return {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "artifact": artifact,
      "preprocessing": preprocessing.to_json(),
      "members": list(member_entries),
      "member_output": "(logits float32 [b, K], features float32 [b, d_model])",
      "input": "float32 [b, H, W, C] = (uint8 / 255 - mean) / std; b symbolic",
      "teacher_flops": int(teacher_flops),
      "flops": int(total),
      "pct_teacher_flops": 100.0 * total / teacher_flops,
      "prefix_accuracy": accuracy,
      "source": dict(source or {}),
      "combination": None if combination is None else combination.to_json(),
      "teacher": None if teacher_entry is None else dict(teacher_entry),
  }


def write_sidecar(out_dir: str | pathlib.Path, sidecar: Mapping[str, Any]) -> pathlib.Path:
  """Writes ``<out_dir>/export.json`` and returns its path."""
  path = pathlib.Path(out_dir) / SIDECAR
  path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return path


def read_sidecar(directory: pathlib.Path, artifact: str | None = None) -> dict:
  """The sidecar of a bundle directory, checked (format, version and, if given, artifact)."""
  path = directory / SIDECAR
  if not path.is_file():
    raise ValueError(
        f"{path} does not exist: pass a directory written by mamba_pkd.export (it holds "
        f"{SIDECAR})"
    )
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); export the bundle again") from None
  if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
    raise ValueError(
        f"{path} is not a {FORMAT} v{FORMAT_VERSION} sidecar "
        f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
    )
  found = meta.get("artifact", "stablehlo")  # bundles before version 4 are StableHLO
  if artifact is not None and found != artifact:
    runtime = "--runtime=onnx" if found == "onnx" else "--runtime=jax"
    raise ValueError(
        f"{directory} holds a {found} export, not {artifact}: load it with {runtime} "
        f"(or export again with --format={artifact})"
    )
  return meta
