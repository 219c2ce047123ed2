r"""Export students and ensemble prefixes with ``jax.export``; load them back with jax alone.

Serialisation and its command line; the members come from a finished run
(:mod:`mamba_pkd.runs`, which reads the run manifest), the ensemble arithmetic
from :mod:`mamba_pkd.ensemble`.

Bundle layout (one directory)::

    export.json          sidecar: preprocessing constants (mean, std, image
                         shape, class count), members (size, FLOPs, params,
                         config, weight, calibration scale), teacher FLOPs, the
                         run's test accuracy per prefix; for a bundle of all
                         the run's students, the run's combination (per-prefix
                         weights and temperatures, early-exit rule per budget,
                         from the run manifest; else null)
    teacher.stablehlo    only when a stored early-exit rule ends at the
                         teacher: x -> (logits, features) of the teacher
    prefix.stablehlo     x f32[b, H, W, C] -> cumulative logits f32[b, k, K]
                         (F_1, ..., F_k in one call)
    member_<j>.stablehlo member j alone: x f32[b, H, W, C]
                         (+ prev_features f32[b, c] for a connected student)
                         -> (logits f32[b, K], features f32[b, d_j])

``x`` is the *normalised* input ``(uint8 / 255 - mean) / std`` (NHWC), as in
training; the loader applies it. ``b`` is a symbolic dimension
(``jax.export.symbolic_shape("b")``): one artifact serves every batch size.
The per-member files let :mod:`mamba_pkd.predict` stop early per image
(run member j only on the images still unsure) and evaluate any shorter prefix.

Exported functions are lowered with a scan method that supports a symbolic
batch (``EXPORT_SCAN_METHODS``; the default ``"parallel"``); the ``"fused"``
method sizes its tiles from the batch and the ``"pallas"`` kernel is GPU-only,
so neither is exported. The methods agree to float32 rounding (the tests check
the exported logits against the in-process model).

Loading a bundle (:func:`load_export`) needs ``jax`` and ``numpy`` only: this
module imports Flax, optax and Orbax (through :mod:`mamba_pkd.runs`) inside the
writing functions, never at import time.

Command line::

  python -m mamba_pkd.export --workdir=runs/default --out=runs/default/export \
      --max_flops_pct=25     # the largest prefix within 25% of the teacher's FLOPs
  python -m mamba_pkd.export --workdir=runs/default --out=/tmp/s1 --student=1
  python -m mamba_pkd.export --workdir=runs/default --out=/tmp/t --teacher
"""

from __future__ import annotations

import argparse
import logging
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from mamba_pkd import ensemble, manifest
from mamba_pkd.sidecar import ARTIFACTS, FORMAT, FORMAT_VERSION, SIDECAR  # noqa: F401
from mamba_pkd.sidecar import build_sidecar, read_sidecar, write_sidecar
from mamba_pkd.combine import Combination
from mamba_pkd.ensemble import Member
from mamba_pkd.preprocessing import Preprocessing

PREFIX_FILE = "prefix.stablehlo"
TEACHER_FILE = "teacher.stablehlo"
EXPORT_SCAN_METHODS = ("parallel", "sequential", "chunked")
DEFAULT_EXPORT_SCAN_METHOD = "parallel"
DEFAULT_BATCH_SIZE = ensemble.DEFAULT_BATCH_SIZE


def _check_scan_method(scan_method: str) -> None:
  if scan_method not in EXPORT_SCAN_METHODS:
    raise ValueError(
        f"scan_method={scan_method!r} cannot be exported with a symbolic batch; "
        f"choose one of {EXPORT_SCAN_METHODS}"
    )


# ----------------------------------------------------------------------------
# Writing bundles (needs Flax: imported inside the functions).
# ----------------------------------------------------------------------------


def export_members(
    members: Sequence[Member],
    out_dir: str | pathlib.Path,
    *,
    preprocessing: Preprocessing,
    teacher_flops: int,
    prefix_accuracy: Sequence[float | None] = (),
    scan_method: str = DEFAULT_EXPORT_SCAN_METHOD,
    platforms: Sequence[str] | None = None,
    source: Mapping[str, Any] | None = None,
    combination: Combination | None = None,
    teacher: Member | None = None,
) -> pathlib.Path:
  """Serialises ``members`` (a prefix, one student or the teacher) into a bundle.

  Args:
    members: in ensemble order, with ``config`` (a ModelConfig) and ``params``
      (weight folded); a connected member must follow the member whose
      features it reads.
    out_dir: bundle directory (created; existing bundle files are replaced).
    preprocessing: the run's input normalisation (stored in the sidecar).
    teacher_flops: the teacher's FLOPs per image (for percentages).
    prefix_accuracy: the run's test accuracy of each prefix, if known.
    scan_method: scan used inside the exported functions (EXPORT_SCAN_METHODS).
    platforms: lowering platforms, e.g. ``("cpu", "cuda")``; default: this
      machine's backend.
    source: extra provenance stored in the sidecar (workdir, dataset, mode).
    combination: the run's combination (only for a bundle of all its students).
    teacher: the teacher (config and params), exported as ``teacher.stablehlo``
      for early-exit rules that end at it.

  Returns:
    The path of the sidecar ``export.json``.

  Raises:
    ValueError: no members, a connected first member, an unexportable scan method.
  """
  import jax  # pylint: disable=g-import-not-at-top  (this module loads without jax)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mamba_pkd import models  # pylint: disable=g-import-not-at-top  (Flax: writing only)

  members = list(members)
  if not members:
    raise ValueError("members is empty: nothing to export")
  if members[0].connect_dim:
    raise ValueError(
        f"{members[0].name} reads the previous student's features: export a "
        "prefix that starts at student 1"
    )
  _check_scan_method(scan_method)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  configs = tuple(m.config.replace(scan_method=scan_method) for m in members)
  params = [jax.tree.map(jax.device_put, m.params) for m in members]
  h, w, c = preprocessing.image_shape
  (batch,) = jax.export.symbolic_shape("b")
  image_spec = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32)
  kwargs = {} if platforms is None else {"platforms": tuple(platforms)}

  def export_to(fn, specs, filename):
    try:
      exported = jax.export.export(jax.jit(fn), **kwargs)(*specs)
    except jax.errors.InconclusiveDimensionOperation as e:  # a model bug, said plainly
      raise ValueError(
          f"{filename}: the model code compares the batch size with a constant, so it cannot "
          "be exported with a symbolic batch dimension (compare each symbolic dimension "
          f"with 1 only, e.g. `batch < 1`, never min(batch, ...)): {str(e).splitlines()[0]}"
      ) from e
    (out_dir / filename).write_bytes(exported.serialize())
    return exported

  member_entries = []
  for j, (cfg, p, m) in enumerate(zip(configs, params, members), start=1):
    model = models.create_model(cfg)
    filename = f"member_{j}.stablehlo"
    if cfg.connect_dim:
      prev_spec = jax.ShapeDtypeStruct((batch, cfg.connect_dim), jnp.float32)
      fn = lambda x, prev, model=model, p=p: model.apply(
          {"params": p}, x, prev, return_features=True
      )
      export_to(fn, (image_spec, prev_spec), filename)
    else:
      fn = lambda x, model=model, p=p: model.apply({"params": p}, x, return_features=True)
      export_to(fn, (image_spec,), filename)
    member_entries.append({**manifest.member_entry(m), "file": filename})

  def prefix_fn(x):
    logits, _ = models.apply_members(configs, params, x)
    return jnp.stack(ensemble.cumulative(logits), axis=1)  # [b, k, K]

  exported = export_to(prefix_fn, (image_spec,), PREFIX_FILE)
  teacher_entry = None
  if teacher is not None:
    t_model = models.create_model(teacher.config.replace(scan_method=scan_method))
    t_params = jax.tree.map(jax.device_put, teacher.params)
    export_to(
        lambda x: t_model.apply({"params": t_params}, x, return_features=True),
        (image_spec,),
        TEACHER_FILE,
    )
    teacher_entry = {**manifest.member_entry(teacher), "file": TEACHER_FILE}
  sidecar = build_sidecar(
      members,
      member_entries,
      artifact="stablehlo",
      preprocessing=preprocessing,
      teacher_flops=teacher_flops,
      prefix_accuracy=prefix_accuracy,
      source=source,
      combination=combination,
      teacher_entry=teacher_entry,
  )
  sidecar.update(
      prefix_file=PREFIX_FILE,
      prefix_output=(
          "float32 [b, k, K]: cumulative logits F_1..F_k (F_j = f_1 + ... + f_j; "
          "each member's ensemble weight is folded into its head)"
      ),
      scan_method=scan_method,
      platforms=list(exported.platforms),
      jax_version=jax.__version__,
  )
  return write_sidecar(out_dir, sidecar)


def export_run(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    prefix: int | None = None,
    student: int | None = None,
    teacher: bool = False,
    max_flops: float | None = None,
    max_flops_pct: float | None = None,
    scan_method: str = DEFAULT_EXPORT_SCAN_METHOD,
    platforms: Sequence[str] | None = None,
    artifact: str = "stablehlo",
    onnx_options: Mapping[str, Any] | None = None,
) -> tuple[pathlib.Path, list[Member]]:
  """Exports a selection of a run's models; with a FLOPs budget, the largest prefix that fits.

  ``artifact="onnx"`` writes ONNX files instead of StableHLO
  (:func:`mamba_pkd.edge.onnx_export.export_onnx`, keyword arguments
  ``onnx_options``; needs the ``edge`` extra); ``scan_method`` and
  ``platforms`` are for StableHLO only.

  Returns:
    (sidecar path, exported members).

  Raises:
    ValueError / BudgetError: bad selection or budget (checked before any work
      beyond reading the workdir).
  """
  from mamba_pkd import runs  # pylint: disable=g-import-not-at-top  (Flax, Orbax: writing only)

  _check_scan_method(scan_method)
  if artifact not in ARTIFACTS:
    raise ValueError(f"format={artifact!r} must be one of {ARTIFACTS}")
  budget = max_flops is not None or max_flops_pct is not None
  if budget and (prefix is not None or student is not None or teacher):
    raise ValueError(
        "a FLOPs budget picks the prefix itself: do not combine max_flops/"
        "max_flops_pct with prefix, student or teacher"
    )
  combination = manifest.read_manifest(workdir).combination
  rules = combination.cascades.values() if combination is not None else ()
  needs_teacher = any(r and r["teacher_exit"] for r in rules)
  run = runs.load_run(workdir, with_teacher=teacher or needs_teacher)
  if budget:
    everything = runs.select_members(run)
    prefix, _ = ensemble.largest_prefix_within(
        ensemble.prefix_costs(
            [m.flops for m in everything], [m.size for m in everything], run.teacher_flops
        ),
        max_flops=max_flops,
        max_flops_pct=max_flops_pct,
    )
  members = runs.select_members(run, prefix=prefix, student=student, teacher=teacher)
  accuracy = run.prefix_accuracy if members[0].name == "student_1" else []
  whole = [m.name for m in members] == [m.name for m in run.students]
  common = dict(
      preprocessing=run.preprocessing,
      teacher_flops=run.teacher_flops,
      prefix_accuracy=accuracy,
      source={"workdir": str(run.workdir), "dataset": run.dataset, "mode": run.mode},
      combination=combination if whole else None,
      teacher=run.teacher if whole and needs_teacher else None,
  )
  if artifact == "onnx":
    from mamba_pkd.edge import onnx_export  # pylint: disable=g-import-not-at-top  (edge extra)

    return onnx_export.export_onnx(members, out_dir, **common, **dict(onnx_options or {})), members
  path = export_members(members, out_dir, scan_method=scan_method, platforms=platforms, **common)
  return path, members


# ----------------------------------------------------------------------------
# Loading bundles (jax and numpy only).
# ----------------------------------------------------------------------------


class ExportedEnsemble(ensemble.Ensemble):
  """A bundle written by :func:`export_members`, loaded with ``jax.export.deserialize``.

  Call it like a function: ``logits = ensemble(images)`` with uint8 [N, H, W, C]
  pixels or float pixels in [0, 1]; ``ensemble(images, num_members=2)`` for a
  shorter prefix. ``meta`` is the sidecar.
  """

  def __init__(self, path: str | pathlib.Path, *, batch_size: int = DEFAULT_BATCH_SIZE):
    path = pathlib.Path(path)
    directory = path.parent if path.name == SIDECAR else path
    meta = read_sidecar(directory, "stablehlo")
    self.meta = meta
    self.directory = directory
    self.preprocessing = Preprocessing.from_json(meta["preprocessing"])
    self.members = [manifest.member_from_entry(m) for m in meta["members"]]
    self.teacher_flops = int(meta["teacher_flops"])
    self.prefix_accuracy = list(meta.get("prefix_accuracy") or [None] * len(self.members))
    self.batch_size = batch_size
    self.description = f"export {directory}"
    import jax  # pylint: disable=g-import-not-at-top  (this module loads without jax)

    self._exported = [self._deserialize(m["file"]) for m in meta["members"]]
    self._fused = jax.jit(self._deserialize(meta["prefix_file"]).call)  # x -> [b, k, K]
    self._member_fns = {}
    self._prefix_fns = {}
    if meta.get("combination"):
      self.combination = Combination.from_json(meta["combination"])
    if meta.get("teacher"):
      teacher_call = jax.jit(self._deserialize(meta["teacher"]["file"]).call)
      self.teacher_fn = lambda x: self._run_padded(teacher_call, [x])[0]

  def _deserialize(self, filename: str):
    file = self.directory / filename
    if not file.is_file():
      raise ValueError(
          f"{file} is missing; the bundle in {self.directory} is incomplete (export it again)"
      )
    import jax  # pylint: disable=g-import-not-at-top

    return jax.export.deserialize(bytearray(file.read_bytes()))

  def _forward(self, j, x, prev):
    """Member j's exported call (the ``ensemble.chain`` forward)."""
    if self.members[j].connect_dim:
      return self._exported[j].call(x, prev)
    return self._exported[j].call(x)

  def _member_fn(self, j):
    import jax  # pylint: disable=g-import-not-at-top

    if j not in self._member_fns:
      self._member_fns[j] = jax.jit(lambda x, prev=None: self._forward(j, x, prev))
    return self._member_fns[j]

  def _prefix_fn(self, k):
    import jax  # pylint: disable=g-import-not-at-top

    if k not in self._prefix_fns:
      if k == self.num_members:
        fused = self._fused
        self._prefix_fns[k] = lambda x: fused(x)[:, -1]
      else:
        self._prefix_fns[k] = jax.jit(
            lambda x: ensemble.prefix_logits(ensemble.chain(self._forward, k, x)[0])
        )
    return self._prefix_fns[k]

  def prefix_logits(self, images: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """All cumulative logits from ``prefix.stablehlo``: float32 [N, k, K]."""
    x = self.preprocessing.normalize(images, normalized=normalized)
    return self._run_padded(self._fused, [x])[0]


def load_export(
    path: str | pathlib.Path, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> ExportedEnsemble:
  """Loads a bundle: ``load_export(dir)(images) -> logits [N, K]`` (float32).

  ``images``: uint8 [N, H, W, C] pixels, or float pixels in [0, 1]; pass
  ``normalized=True`` for inputs already normalised like the training data.

  Raises:
    ValueError: not a bundle directory, or a file of the bundle is missing.
  """
  return ExportedEnsemble(path, batch_size=batch_size)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mamba_pkd.export",
      description="Export a student, an ensemble prefix or the teacher of a finished run "
      "(jax.export StableHLO or ONNX, symbolic batch) with its preprocessing constants.",
  )
  parser.add_argument(
      "--format",
      default="stablehlo",
      choices=ARTIFACTS,
      help="stablehlo (jax.export; load with jax) or onnx (mamba_pkd.edge; run with "
      "onnxruntime and numpy alone, `predict --runtime=onnx`; needs the edge extra)",
  )
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--out", required=True, help="bundle directory to write")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--prefix", type=int, help="export students 1..K (ensemble prefix)")
  which.add_argument("--student", type=int, help="export student J alone")
  which.add_argument("--teacher", action="store_true", help="export the teacher")
  which.add_argument("--max_flops", help="largest prefix within these FLOPs (2e6, 150k, 25%%)")
  which.add_argument("--max_flops_pct", type=float, help="largest prefix within this %% of teacher")
  parser.add_argument(
      "--scan_method",
      default=DEFAULT_EXPORT_SCAN_METHOD,
      choices=EXPORT_SCAN_METHODS,
      help="scan inside the exported functions",
  )
  parser.add_argument("--platforms", default="", help="lowering platforms, e.g. cpu,cuda")
  parser.add_argument(
      "--scan_form",
      default="auto",
      choices=("auto", "dual", "recurrent"),
      help="onnx: the selective scan's graph form (mamba_pkd.edge.onnx_lower)",
  )
  parser.add_argument(
      "--int8",
      action="store_true",
      help="onnx: also write int8 files (onnxruntime dynamic quantisation, *.int8.onnx)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  from mamba_pkd import metrics  # pylint: disable=g-import-not-at-top  (absl: command line only)

  args = build_parser().parse_args(argv)
  metrics.quiet_library_logs(logging.ERROR)
  try:
    max_flops, max_flops_pct = (None, args.max_flops_pct)
    if args.max_flops is not None:
      max_flops, max_flops_pct = ensemble.parse_flops(args.max_flops)
    platforms = [p for p in args.platforms.split(",") if p] or None
    path, members = export_run(
        args.workdir,
        args.out,
        prefix=args.prefix,
        student=args.student,
        teacher=args.teacher,
        max_flops=max_flops,
        max_flops_pct=max_flops_pct,
        scan_method=args.scan_method,
        platforms=platforms,
        artifact=args.format,
        onnx_options={"scan_form": args.scan_form, "int8": args.int8},
    )
  except (ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  meta = json.loads(path.read_text(encoding="utf-8"))
  acc = meta["prefix_accuracy"][-1] if meta["prefix_accuracy"] else None
  names = "+".join(m.size for m in members)
  print(f"exported {len(members)} member(s) ({names}) to {path.parent}")
  print(
      f"  {meta['flops']:,} FLOPs/image = {meta['pct_teacher_flops']:.2f}% of the teacher's "
      f"{meta['teacher_flops']:,}"
      + (f"; test accuracy in the run {100 * acc:.2f}%" if acc is not None else "")
  )
  teacher_file = meta["teacher"]["file"] if meta.get("teacher") else None
  if meta.get("artifact") == "onnx":
    onnx_meta = meta["onnx"]
    files = [m["file"] for m in meta["members"]] + onnx_meta["prefix_files"]
    files += onnx_meta.get("int8_files") or []
    where = f"ONNX opset {onnx_meta['opset']}, checked with onnx.checker"
  else:
    files = [PREFIX_FILE] + [m["file"] for m in meta["members"]]
    where = f"platforms {meta['platforms']}"
  print(
      f"  files: {SIDECAR}, "
      + ", ".join(files)
      + (f", {teacher_file} (a cascade's last exit)" if teacher_file else "")
      + f" ({where})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
