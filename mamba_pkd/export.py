r"""Export students and ensemble prefixes with ``jax.export`` (StableHLO, symbolic batch).

A PKD run leaves an ensemble ``F_k(x) = f_1(x) + ... + f_k(x)`` whose every
prefix is a classifier (anytime inference). This module

1. rebuilds the run's models from its workdir (:func:`load_run`: ``config.json``
   gives the ladder family, ``results.json``'s ``meta["decisions"]`` the accepted
   candidate stages in order, ``ckpt/<stage>/final`` their parameters);
2. exports a selection of them (a prefix, one student, or the teacher) into a
   bundle directory (:func:`export_members`, :func:`export_run`);
3. loads a bundle back as a callable (:func:`load_export`) that takes uint8 or
   float images and needs neither the workdir nor Flax.

Bundle layout (one directory)::

    export.json          sidecar: preprocessing constants (mean, std, image
                         shape, class count), members (size, FLOPs, params,
                         config), teacher FLOPs, the run's test accuracy per prefix
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

Command line::

  python -m mamba_pkd.export --workdir=runs/default --out=runs/default/export \
      --max_flops_pct=25     # the largest prefix within 25% of the teacher's FLOPs
  python -m mamba_pkd.export --workdir=runs/default --out=/tmp/s1 --student=1
  python -m mamba_pkd.export --workdir=runs/default --out=/tmp/t --teacher
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mamba_pkd import checkpoints, flops, train
from mamba_pkd import data as data_lib
from mamba_pkd.models import ModelConfig, create_model, init_params, ladder_configs, scale_head

PyTree = Any

FORMAT = "mamba_pkd.export"
FORMAT_VERSION = 1
SIDECAR = "export.json"
PREFIX_FILE = "prefix.stablehlo"
EXPORT_SCAN_METHODS = ("parallel", "sequential", "chunked")
DEFAULT_EXPORT_SCAN_METHOD = "parallel"
DEFAULT_BATCH_SIZE = 256  # largest batch one compiled call takes; bigger inputs are chunked
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class BudgetError(ValueError):
  """No ensemble prefix fits the requested FLOPs or latency budget."""


# ----------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What turns pixels into the model's input: ``x = (pixels / 255 - mean) / std``.

  Attributes:
    image_shape: (H, W, C).
    num_classes: K, the number of logits.
    mean: per-channel mean of ``x_train / 255``, length C.
    std: per-channel standard deviation of ``x_train / 255``, length C.
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))
    channels = self.image_shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(
          f"mean and std need {channels} values (one per channel of "
          f"image_shape={self.image_shape}), got {self.mean} and {self.std}"
      )

  def check_images(self, images: np.ndarray, what: str = "images") -> np.ndarray:
    """Returns ``images`` as an array after checking it is [N, H, W, C]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"{what} must have shape [N, {', '.join(map(str, self.image_shape))}] "
          f"(N images of the model's input shape), got {tuple(images.shape)}"
      )
    return images

  def normalize(self, images: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """The model's input, float32 [N, H, W, C].

    Args:
      images: [N, H, W, C] uint8 pixels in [0, 255], or float pixels in [0, 1]
        (``uint8 / 255``); with ``normalized=True`` float inputs are taken as
        already normalised and returned as float32.
      normalized: see ``images``.

    Raises:
      ValueError: wrong shape, an unsupported dtype, or float pixels outside [0, 1].
    """
    images = self.check_images(images)
    if images.dtype == np.uint8:
      return data_lib.normalize(images, np.asarray(self.mean), np.asarray(self.std))
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(
          f"images must be uint8 pixels (0..255) or float pixels in [0, 1], got "
          f"dtype {images.dtype}; convert with images.astype(np.uint8) if they "
          "are 0..255 integers"
      )
    if normalized:
      return images.astype(np.float32)
    low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if low < -1e-6 or high > 1 + 1e-6:
      raise ValueError(
          f"float images must be pixels in [0, 1] (uint8 / 255), got values in "
          f"[{low:.4g}, {high:.4g}]; pass uint8 pixels, divide by 255, or pass "
          "normalized=True for inputs already normalised like the training data"
      )
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32)

  def to_json(self) -> dict:
    return {
        "image_shape": list(self.image_shape),
        "num_classes": self.num_classes,
        "mean": list(self.mean),
        "std": list(self.std),
        "formula": "x = (uint8_pixels / 255 - mean) / std, float32, NHWC",
    }


# ----------------------------------------------------------------------------
# Members and the run they come from.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
  """One trained model of a run.

  Attributes:
    name: ``"teacher"`` or ``"student_<k>"`` (k = position in the ensemble).
    stage: the checkpoint stage it was loaded from (``ckpt/<stage>``).
    size: ladder size name (``"s3"``, ``"teacher"``).
    config: its ModelConfig (``connect_dim > 0``: reads the previous member's
      features).
    params: parameter pytree (host arrays); a student's ensemble weight is
      already folded into its head.
    prefix_scale: the overall scale ``c`` that calibrates the logits of the
      prefix ending with this member (``softmax(c * F_k)``; the run's
      held-out fit to the teacher, ``pkd.calibrated_fit``); 1 where the run
      did not calibrate. Only softmax-based uses (early exit) need it.
  """

  name: str
  stage: str
  size: str
  config: ModelConfig
  params: PyTree
  prefix_scale: float = 1.0

  @property
  def flops(self) -> int:
    return flops.count_flops(self.config)

  @property
  def num_params(self) -> int:
    return flops.count_params(self.config)


@dataclasses.dataclass
class RunModels:
  """The models of a finished run, rebuilt from its workdir (see :func:`load_run`).

  Attributes:
    workdir: the run's directory.
    dataset: dataset name of the run.
    mode: ``"ensemble"`` (prefixes are classifiers) or ``"chain"``.
    preprocessing: input normalisation of the run's dataset.
    teacher: the teacher (params None when loaded with ``with_teacher=False``).
    students: accepted students in ensemble order (chain mode: the chain's
      students, largest first).
    prefix_accuracy: test accuracy of ``prefix_1..k`` from ``results.json``
      (``None`` where the run has no such row), one per student.
  """

  workdir: pathlib.Path
  dataset: str
  mode: str
  preprocessing: Preprocessing
  teacher: Member
  students: list[Member]
  prefix_accuracy: list[float | None]

  @property
  def teacher_flops(self) -> int:
    return self.teacher.flops


def _read_json(path: pathlib.Path, what: str) -> dict:
  if not path.is_file():
    raise ValueError(f"{path} does not exist: {what}")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); {what}") from None


def _get(tree: Mapping, dotted: str, path: pathlib.Path):
  node = tree
  for key in dotted.split("."):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f"{path} has no field {dotted!r}; was it written by "
          "mamba_pkd.main (pkd.train_and_evaluate)?"
      )
    node = node[key]
  return node


def _load_stage(workdir: pathlib.Path, stage: str, config: ModelConfig) -> tuple[PyTree, dict]:
  directory = checkpoints.stage_dir(workdir, stage)
  if not (directory / checkpoints.FINAL_SUBDIR).is_dir():
    raise ValueError(
        f"stage {stage!r} has no final checkpoint ({directory}/final is missing); "
        "the run did not finish this stage: re-run mamba_pkd.main with the same "
        "--workdir to complete it"
    )
  template = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  with checkpoints.StageCheckpointer(directory, is_writer=False) as ckpt:
    return ckpt.load_final(template)


def _preprocessing_of_run(config: Mapping, meta: Mapping, path: pathlib.Path) -> Preprocessing:
  """From ``meta["preprocessing"]`` when the run stored it, else by loading the dataset."""
  stored = meta.get("preprocessing")
  if isinstance(stored, Mapping) and {"mean", "std", "image_shape", "num_classes"} <= set(stored):
    return Preprocessing(
        stored["image_shape"], stored["num_classes"], stored["mean"], stored["std"]
    )
  # The run's results.json does not carry the constants: recompute them exactly
  # as the run did (same dataset, same seed; the stats depend on x_train only).
  dataset = data_lib.load_dataset(
      _get(config, "dataset", path),
      data_dir=config.get("data_dir") or None,
      seed=int(config.get("seed", 0)),
  )
  return Preprocessing(dataset.image_shape, dataset.num_classes, dataset.mean, dataset.std)


def load_run(workdir: str | pathlib.Path, *, with_teacher: bool = True) -> RunModels:
  """Rebuilds the teacher and the accepted students of a finished run.

  Args:
    workdir: a run directory written by ``python -m mamba_pkd.main`` (holds
      ``config.json``, ``results.json`` and ``ckpt/``).
    with_teacher: also load the teacher's parameters (its config and FLOPs are
      always available).

  Returns:
    A :class:`RunModels`.

  Raises:
    ValueError: not a finished run's directory, or a stage missing (the
      message names the file or stage).
  """
  workdir = pathlib.Path(workdir).absolute()  # Orbax wants absolute paths
  if not workdir.is_dir():
    raise ValueError(
        f"workdir {str(workdir)!r} does not exist; pass the --workdir of a "
        "finished `python -m mamba_pkd.main` run"
    )
  config_path, results_path = workdir / "config.json", workdir / "results.json"
  config = _read_json(config_path, "pass the --workdir of a mamba_pkd.main run")
  results = _read_json(
      results_path,
      "the run has not finished (results.json is written at "
      "the end): re-run mamba_pkd.main with the same --workdir",
  )
  meta = results.get("meta", {})
  family = _get(config, "model.ladder", config_path)
  mode = _get(config, "pkd.mode", config_path)
  connect = bool(_get(config, "pkd.connect", config_path))
  preprocessing = _preprocessing_of_run(config, meta, config_path)
  sizes = ladder_configs(
      family,
      image_shape=preprocessing.image_shape,
      num_classes=preprocessing.num_classes,
      scan_method=_get(config, "model.scan_method", config_path),
      bidirectional=bool(_get(config, "model.bidirectional", config_path)),
  )

  teacher_params = _load_stage(workdir, "teacher", sizes["teacher"])[0] if with_teacher else None
  teacher = Member("teacher", "teacher", "teacher", sizes["teacher"], teacher_params)

  students: list[Member] = []
  decisions = _get(results, "meta.decisions", results_path)
  if mode == "ensemble":
    for entry in decisions:
      if not entry.get("accepted"):
        continue
      size, stage = entry["size"], entry["candidate"]
      cfg = sizes[size]
      if connect and students:
        cfg = cfg.replace(connect_dim=students[-1].config.d_model)
      params, info = _load_stage(workdir, stage, cfg)
      if info.get("size", size) != size:
        raise ValueError(
            f"stage {stage!r} was trained as size {info.get('size')!r} but "
            f"results.json says {size!r}; the workdir is inconsistent"
        )
      # The stage saved f_k; the ensemble holds eta_k f_k (see pkd.Decision.weight).
      params = scale_head(params, float(entry.get("weight", 1.0)))
      students.append(
          Member(
              f"student_{len(students) + 1}",
              stage,
              size,
              cfg,
              params,
              prefix_scale=float(entry.get("scale", 1.0)),
          )
      )
  elif mode == "chain":
    chain = next((e["chain"] for e in decisions if "chain" in e), [])
    for k, size in enumerate(chain, start=1):
      params, _ = _load_stage(workdir, f"chain_{k}_{size}", sizes[size])
      students.append(Member(f"student_{k}", f"chain_{k}_{size}", size, sizes[size], params))
  else:
    raise ValueError(f"{config_path}: pkd.mode={mode!r} is not 'ensemble' or 'chain'")

  rows = {row.get("name"): row for row in results.get("rows", [])}
  accuracy = [rows.get(f"prefix_1..{k}", {}).get("accuracy") for k in range(1, len(students) + 1)]
  return RunModels(
      workdir=workdir,
      dataset=str(meta.get("dataset", config.get("dataset"))),
      mode=mode,
      preprocessing=preprocessing,
      teacher=teacher,
      students=students,
      prefix_accuracy=accuracy,
  )


def select_members(
    run: RunModels, *, prefix: int | None = None, student: int | None = None, teacher: bool = False
) -> list[Member]:
  """The members an export or a prediction uses.

  Args:
    run: the run's models.
    prefix: k, the ensemble prefix ``student_1..k`` (ensemble mode).
    student: j, student j alone (must not read another student's features).
    teacher: the teacher alone.
    With none given: every accepted student (the whole ensemble).

  Raises:
    ValueError: more than one selector, an index out of range (the valid
      range is named), a prefix of a chain-mode run, or a connected student alone.
  """
  given = [
      name
      for name, v in (("prefix", prefix), ("student", student), ("teacher", teacher))
      if v not in (None, False)
  ]
  if len(given) > 1:
    raise ValueError(f"choose one of prefix, student, teacher; got {given}")
  n = len(run.students)
  if teacher:
    if run.teacher.params is None:
      raise ValueError("the teacher's parameters were not loaded (load_run(with_teacher=True))")
    return [run.teacher]
  if student is not None:
    if not isinstance(student, int) or not 1 <= student <= n:
      raise ValueError(f"student={student!r} is out of range: the run has {n} students (1..{n})")
    member = run.students[student - 1]
    if member.config.connect_dim:
      raise ValueError(
          f"student {student} reads student {student - 1}'s features "
          "(pkd.connect=True), so it is not a classifier alone; export the "
          f"prefix 1..{student} instead (prefix={student})"
      )
    return [member]
  if n == 0:
    raise ValueError(f"the run in {run.workdir} accepted no student; export the teacher instead")
  if run.mode != "ensemble":
    if prefix is not None or n > 1:
      raise ValueError(
          "a chain-mode run has no ensemble prefixes (its students are separate "
          f"classifiers); choose one with student=1..{n} or the teacher"
      )
    return list(run.students)
  k = n if prefix is None else prefix
  if not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(
        f"prefix={prefix!r} is out of range: the ensemble has {n} students, "
        f"valid prefixes 1..{n}"
    )
  return list(run.students[:k])


# ----------------------------------------------------------------------------
# Budgets (pure).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefixCost:
  """Cost of the prefix ``student_1..k``."""

  k: int
  sizes: tuple[str, ...]
  flops: int
  pct_teacher_flops: float

  def describe(self) -> str:
    return (
        f"prefix 1..{self.k} ({'+'.join(self.sizes)}): {self.flops:,} FLOPs/image, "
        f"{self.pct_teacher_flops:.2f}% of the teacher"
    )


def prefix_costs(
    member_flops: Sequence[int], member_sizes: Sequence[str], teacher_flops: int
) -> list[PrefixCost]:
  """Cumulative FLOPs of every prefix, ``k = 1..len(member_flops)``."""
  out, total = [], 0
  for k, (f, _) in enumerate(zip(member_flops, member_sizes), start=1):
    total += int(f)
    out.append(PrefixCost(k, tuple(member_sizes[:k]), total, 100.0 * total / teacher_flops))
  return out


def parse_flops(text: str | float | int) -> tuple[float | None, float | None]:
  """``"2.5e6"``, ``"120k"``, ``"3M"`` -> (absolute, None); ``"25%"`` -> (None, 25.0).

  Raises:
    ValueError: not a positive number with an optional k/M/G suffix or ``%``.
  """
  if isinstance(text, (int, float)):
    value, pct = float(text), False
  else:
    s = str(text).strip()
    pct = s.endswith("%")
    s = s[:-1] if pct else s
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}.get(s[-1:], 1.0)
    s = s[:-1] if scale != 1.0 else s
    try:
      value = float(s) * scale
    except ValueError:
      value = float("nan")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"max_flops={text!r} must be a positive number of FLOPs per image "
        "(e.g. 2.5e6, 120k, 3M) or a percentage of the teacher's (e.g. 25%)"
    )
  return (None, value) if pct else (value, None)


def largest_prefix_within(
    costs: Sequence[PrefixCost],
    *,
    max_flops: float | None = None,
    max_flops_pct: float | None = None,
    max_latency_ms: float | None = None,
    latency_ms: Callable[[int], float] | None = None,
) -> tuple[int, dict[int, float]]:
  """The largest k whose prefix fits every given budget.

  FLOPs budgets filter first (static). Latency is then measured by
  ``latency_ms(k)`` for k = 1, 2, ... up to the FLOPs limit, stopping at the
  first prefix over ``max_latency_ms`` (latency grows with k: each prefix runs
  all the members of the previous one).

  Args:
    costs: from :func:`prefix_costs`, k = 1..n in order.
    max_flops: FLOPs per image, or None.
    max_flops_pct: percent of the teacher's FLOPs, or None.
    max_latency_ms: milliseconds per call, or None.
    latency_ms: ``k -> measured ms`` (required with ``max_latency_ms``).

  Returns:
    ``(k, measured)`` with ``measured`` the latencies taken, by k.

  Raises:
    BudgetError: even the cheapest prefix does not fit (the message gives its cost).
    ValueError: a budget that is not a positive number.
  """
  for name, value in (
      ("max_flops", max_flops),
      ("max_flops_pct", max_flops_pct),
      ("max_latency_ms", max_latency_ms),
  ):
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{name} must be a positive number, got {value!r}")
  if not costs:
    raise ValueError("there is no prefix to choose from (the ensemble is empty)")
  fits = [
      c
      for c in costs
      if (max_flops is None or c.flops <= max_flops)
      and (max_flops_pct is None or c.pct_teacher_flops <= max_flops_pct)
  ]
  if not fits:
    asked = " and ".join(
        s
        for s in (
            f"--max_flops={max_flops:,.0f}" if max_flops is not None else "",
            f"--max_flops_pct={max_flops_pct:g}" if max_flops_pct is not None else "",
        )
        if s
    )
    raise BudgetError(f"no ensemble prefix fits {asked}: the cheapest, {costs[0].describe()}")
  k_best = fits[-1].k
  measured: dict[int, float] = {}
  if max_latency_ms is not None:
    if latency_ms is None:
      raise ValueError("max_latency_ms needs a latency_ms(k) measurement function")
    k_lat = 0
    for cost in fits:
      measured[cost.k] = float(latency_ms(cost.k))
      if measured[cost.k] > max_latency_ms:
        break
      k_lat = cost.k
    if k_lat == 0:
      raise BudgetError(
          f"no ensemble prefix fits --max_latency_ms={max_latency_ms:g}: the "
          f"cheapest, {costs[0].describe()}, takes {measured[1]:.3g} ms per call "
          "on this machine"
      )
    k_best = k_lat
  return k_best, measured


# ----------------------------------------------------------------------------
# Ensembles: one interface over in-process models and exported bundles.
# ----------------------------------------------------------------------------


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch for n rows: the next power of two, at most ``batch_size``."""
  return min(batch_size, 1 << max(0, (n - 1).bit_length()))


class Ensemble:
  """An ordered list of members whose summed logits are the prediction.

  Subclasses provide ``_member_fn(j)`` (jitted ``(x, prev) -> (logits,
  features)``) and ``_prefix_fn(k)`` (jitted ``x -> F_k``). Inputs are padded
  to power-of-two batches (at most ``batch_size``) so that only a few shapes
  are ever compiled.

  Attributes:
    preprocessing: the input normalisation.
    members: per member a dict with ``name``, ``size``, ``flops``, ``params``,
      ``d_model``, ``connect_dim``, ``prefix_scale`` (see :class:`Member`).
    teacher_flops: the teacher's FLOPs per image (for percentages).
    prefix_accuracy: the run's test accuracy of each prefix (or None).
    batch_size: largest batch of one compiled call.
  """

  preprocessing: Preprocessing
  members: list[dict]
  teacher_flops: int
  prefix_accuracy: list[float | None]
  batch_size: int = DEFAULT_BATCH_SIZE
  description: str = ""

  @property
  def num_members(self) -> int:
    return len(self.members)

  def costs(self) -> list[PrefixCost]:
    return prefix_costs(
        [m["flops"] for m in self.members], [m["size"] for m in self.members], self.teacher_flops
    )

  def resolve_num_members(self, k: int | None) -> int:
    """``k`` (None: all members) checked to be in 1..num_members."""
    n = self.num_members
    k = n if k is None else k
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
      raise ValueError(f"num_members={k!r} must be in 1..{n}")
    return int(k)

  def _run_padded(self, fn: Callable, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``fn`` over row chunks of ``arrays`` padded to bucket sizes; outputs concatenated."""
    n = len(arrays[0])
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start : start + self.batch_size] for a in arrays]
      rows = len(chunk[0])
      pad = _bucket(rows, self.batch_size) - rows
      if pad:
        chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      result = fn(*chunk)
      result = result if isinstance(result, tuple) else (result,)
      outs.append([np.asarray(r)[:rows] for r in result])
    return [np.concatenate(parts) for parts in zip(*outs)]

  def member_forward(
      self, j: int, x: np.ndarray, prev_features: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Member ``j`` (0-based) on normalised inputs.

    Args:
      j: member index, 0 <= j < num_members.
      x: float32 [N, H, W, C], normalised.
      prev_features: float32 [N, d_{j-1}], member j-1's features; needed when
        member j is connected (``connect_dim > 0``), ignored otherwise.

    Returns:
      (logits float32 [N, K], features float32 [N, d_j]).
    """
    connect = self.members[j]["connect_dim"]
    if connect:
      if prev_features is None or prev_features.shape != (len(x), connect):
        raise ValueError(f"member {j + 1} is connected: pass prev_features [N, {connect}]")
      logits, feats = self._run_padded(self._member_fn(j), [x, prev_features.astype(np.float32)])
    else:
      logits, feats = self._run_padded(self._member_fn(j), [x])
    return logits, feats

  def logits(
      self, images: np.ndarray, *, num_members: int | None = None, normalized: bool = False
  ) -> np.ndarray:
    """``F_k(x)``: the summed logits of the first ``num_members`` members.

    Args:
      images: [N, H, W, C] uint8 pixels or float pixels in [0, 1] (see
        :meth:`Preprocessing.normalize`; ``normalized=True`` for model inputs).
      num_members: k (default: all).
      normalized: inputs are already normalised.

    Returns:
      float32 [N, K].
    """
    k = self.resolve_num_members(num_members)
    x = self.preprocessing.normalize(images, normalized=normalized)
    return self._run_padded(self._prefix_fn(k), [x])[0]

  __call__ = logits

  def prefix_forward(self, k: int) -> Callable:
    """The jitted ``x f32[b, H, W, C] -> F_k f32[b, K]`` (for timing)."""
    return self._prefix_fn(self.resolve_num_members(k))

  def _member_fn(self, j: int) -> Callable:
    raise NotImplementedError

  def _prefix_fn(self, k: int) -> Callable:
    raise NotImplementedError


def _member_dict(m: Member) -> dict:
  return {
      "name": m.name,
      "stage": m.stage,
      "size": m.size,
      "flops": m.flops,
      "params": m.num_params,
      "d_model": m.config.d_model,
      "connect_dim": m.config.connect_dim,
      "prefix_scale": m.prefix_scale,
  }


class InProcessEnsemble(Ensemble):
  """Members from a workdir, run with Flax in this process."""

  def __init__(
      self,
      members: Sequence[Member],
      *,
      preprocessing: Preprocessing,
      teacher_flops: int,
      prefix_accuracy: Sequence[float | None] = (),
      batch_size: int = DEFAULT_BATCH_SIZE,
      description: str = "",
  ):
    self._members = list(members)
    self.members = [_member_dict(m) for m in self._members]
    self.preprocessing = preprocessing
    self.teacher_flops = int(teacher_flops)
    self.prefix_accuracy = list(prefix_accuracy)[: len(members)] + [None] * max(
        0, len(members) - len(prefix_accuracy)
    )
    self.batch_size = batch_size
    self.description = description
    self._cache: dict = {}

  def _member_fn(self, j):
    key = ("member", j)
    if key not in self._cache:
      m = self._members[j]
      model = create_model(m.config)
      params = jax.tree.map(jnp.asarray, m.params)
      apply = jax.jit(
          lambda p, x, prev=None: model.apply({"params": p}, x, prev, return_features=True)
      )
      self._cache[key] = lambda x, prev=None: apply(params, x, prev)
    return self._cache[key]

  def _prefix_fn(self, k):
    key = ("prefix", k)
    if key not in self._cache:
      configs = tuple(m.config for m in self._members[:k])
      params = [jax.tree.map(jnp.asarray, m.params) for m in self._members[:k]]
      forward = jax.jit(lambda p, x: _summed(configs, p, x))
      self._cache[key] = lambda x: forward(params, x)
    return self._cache[key]


def _summed(configs: Sequence[ModelConfig], params: Sequence[PyTree], x) -> jax.Array:
  """``F_k(x) = sum_j f_j(x)`` of a chain of members (connections followed). [b, K]."""
  logits, _ = train.apply_students(configs, params, x)
  return sum(logits[1:], logits[0])


def ensemble_from_run(
    run: RunModels, members: Sequence[Member] | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> InProcessEnsemble:
  """An :class:`InProcessEnsemble` of ``members`` (default: all accepted students)."""
  members = select_members(run) if members is None else list(members)
  accuracy = run.prefix_accuracy if members and members[0].name == "student_1" else []
  return InProcessEnsemble(
      members,
      preprocessing=run.preprocessing,
      teacher_flops=run.teacher_flops,
      prefix_accuracy=accuracy,
      batch_size=batch_size,
      description=f"workdir {run.workdir} (in-process)",
  )


# ----------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------


def _check_scan_method(scan_method: str) -> None:
  if scan_method not in EXPORT_SCAN_METHODS:
    raise ValueError(
        f"scan_method={scan_method!r} cannot be exported with a symbolic batch; "
        f"choose one of {EXPORT_SCAN_METHODS}"
    )


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
) -> pathlib.Path:
  """Serialises ``members`` (a prefix, one student or the teacher) into a bundle.

  Args:
    members: in ensemble order; a connected member must follow the member whose
      features it reads.
    out_dir: bundle directory (created; existing bundle files are replaced).
    preprocessing: the run's input normalisation (stored in the sidecar).
    teacher_flops: the teacher's FLOPs per image (for percentages).
    prefix_accuracy: the run's test accuracy of each prefix, if known.
    scan_method: scan used inside the exported functions (EXPORT_SCAN_METHODS).
    platforms: lowering platforms, e.g. ``("cpu", "cuda")``; default: this
      machine's backend.
    source: extra provenance stored in the sidecar (workdir, dataset, mode).

  Returns:
    The path of the sidecar ``export.json``.

  Raises:
    ValueError: no members, a connected first member, an unexportable scan method.
  """
  members = list(members)
  if not members:
    raise ValueError("members is empty: nothing to export")
  if members[0].config.connect_dim:
    raise ValueError(
        f"{members[0].name} reads the previous student's features: export a "
        "prefix that starts at student 1"
    )
  _check_scan_method(scan_method)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  configs = tuple(m.config.replace(scan_method=scan_method) for m in members)
  params = [jax.tree.map(jnp.asarray, m.params) for m in members]
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
    model = create_model(cfg)
    filename = f"member_{j}.stablehlo"
    if cfg.connect_dim:
      prev_spec = jax.ShapeDtypeStruct((batch, cfg.connect_dim), jnp.float32)
      export_to(
          lambda x, prev, model=model, p=p: model.apply(
              {"params": p}, x, prev, return_features=True
          ),
          (image_spec, prev_spec),
          filename,
      )
    else:
      export_to(
          lambda x, model=model, p=p: model.apply({"params": p}, x, return_features=True),
          (image_spec,),
          filename,
      )
    config_dict = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
    }
    member_entries.append({**_member_dict(m), "file": filename, "config": config_dict})

  def prefix_fn(x):
    logits, _ = train.apply_students(configs, params, x)
    return jnp.stack(list(jnp.cumsum(jnp.stack(logits), axis=0)), axis=1)  # [b, k, K]

  exported = export_to(prefix_fn, (image_spec,), PREFIX_FILE)
  total = sum(m.flops for m in members)
  accuracy = list(prefix_accuracy)[: len(members)]
  accuracy += [None] * (len(members) - len(accuracy))
  sidecar = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "preprocessing": preprocessing.to_json(),
      "members": member_entries,
      "prefix_file": PREFIX_FILE,
      "prefix_output": (
          "float32 [b, k, K]: cumulative logits F_1..F_k (F_j = f_1 + ... + f_j; "
          "each member's ensemble weight is folded into its head)"
      ),
      "member_output": "(logits float32 [b, K], features float32 [b, d_model])",
      "input": "float32 [b, H, W, C] = (uint8 / 255 - mean) / std; b symbolic",
      "teacher_flops": int(teacher_flops),
      "flops": int(total),
      "pct_teacher_flops": 100.0 * total / teacher_flops,
      "prefix_accuracy": accuracy,
      "scan_method": scan_method,
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "source": dict(source or {}),
  }
  path = out_dir / SIDECAR
  path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return path


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
) -> tuple[pathlib.Path, list[Member]]:
  """Exports a selection of a run's models; with a FLOPs budget, the largest prefix that fits.

  Returns:
    (sidecar path, exported members).

  Raises:
    ValueError / BudgetError: bad selection or budget (checked before any work
      beyond reading the workdir).
  """
  _check_scan_method(scan_method)
  budget = max_flops is not None or max_flops_pct is not None
  if budget and (prefix is not None or student is not None or teacher):
    raise ValueError(
        "a FLOPs budget picks the prefix itself: do not combine max_flops/"
        "max_flops_pct with prefix, student or teacher"
    )
  run = load_run(workdir, with_teacher=teacher)
  if budget:
    everything = select_members(run)
    k, _ = largest_prefix_within(
        prefix_costs(
            [m.flops for m in everything], [m.size for m in everything], run.teacher_flops
        ),
        max_flops=max_flops,
        max_flops_pct=max_flops_pct,
    )
    prefix = k
  members = select_members(run, prefix=prefix, student=student, teacher=teacher)
  accuracy = run.prefix_accuracy if members[0].name == "student_1" else []
  path = export_members(
      members,
      out_dir,
      preprocessing=run.preprocessing,
      teacher_flops=run.teacher_flops,
      prefix_accuracy=accuracy,
      scan_method=scan_method,
      platforms=platforms,
      source={"workdir": str(run.workdir), "dataset": run.dataset, "mode": run.mode},
  )
  return path, members


# ----------------------------------------------------------------------------
# Load.
# ----------------------------------------------------------------------------


class ExportedEnsemble(Ensemble):
  """A bundle written by :func:`export_members`, loaded with ``jax.export.deserialize``.

  Call it like a function: ``logits = ensemble(images)`` with uint8 [N, H, W, C]
  pixels or float pixels in [0, 1]; ``ensemble(images, num_members=2)`` for a
  shorter prefix. ``meta`` is the sidecar.
  """

  def __init__(self, path: str | pathlib.Path, *, batch_size: int = DEFAULT_BATCH_SIZE):
    path = pathlib.Path(path)
    directory = path.parent if path.name == SIDECAR else path
    meta = _read_json(
        directory / SIDECAR, "pass a directory written by mamba_pkd.export (it holds export.json)"
    )
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
      raise ValueError(
          f"{directory / SIDECAR} is not a {FORMAT} v{FORMAT_VERSION} sidecar "
          f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
      )
    self.meta = meta
    self.directory = directory
    pre = meta["preprocessing"]
    self.preprocessing = Preprocessing(
        pre["image_shape"], pre["num_classes"], pre["mean"], pre["std"]
    )
    keys = ("name", "stage", "size", "flops", "params", "d_model", "connect_dim")
    self.members = [
        dict({k: m[k] for k in keys}, prefix_scale=float(m.get("prefix_scale", 1.0)))
        for m in meta["members"]
    ]  # bundles written before prefix_scale: 1
    self.teacher_flops = int(meta["teacher_flops"])
    self.prefix_accuracy = list(meta.get("prefix_accuracy") or [None] * len(self.members))
    self.batch_size = batch_size
    self.description = f"export {directory}"
    self._exported = {}
    for m in meta["members"]:
      self._exported[m["name"]] = self._deserialize(m["file"])
    self._prefix = self._deserialize(meta["prefix_file"])
    self._fused = jax.jit(self._prefix.call)  # x -> cumulative logits [b, k, K]
    self._cache: dict = {}

  def _deserialize(self, filename: str):
    file = self.directory / filename
    if not file.is_file():
      raise ValueError(
          f"{file} is missing; the bundle in {self.directory} is incomplete " "(export it again)"
      )
    return jax.export.deserialize(bytearray(file.read_bytes()))

  def _member_fn(self, j):
    key = ("member", j)
    if key not in self._cache:
      exported = self._exported[self.members[j]["name"]]
      if self.members[j]["connect_dim"]:
        self._cache[key] = jax.jit(exported.call)
      else:
        self._cache[key] = jax.jit(lambda x, prev=None: exported.call(x))
    return self._cache[key]

  def _prefix_fn(self, k):
    key = ("prefix", k)
    if key not in self._cache:
      if k == self.num_members:
        fused = self._fused
        self._cache[key] = lambda x: fused(x)[:, -1]
      else:
        calls = [self._exported[m["name"]] for m in self.members[:k]]
        connected = [m["connect_dim"] > 0 for m in self.members[:k]]

        def forward(x):
          total, prev = None, None
          for call, connect in zip(calls, connected):
            logits, prev = call.call(x, prev) if connect else call.call(x)
            total = logits if total is None else total + logits
          return total

        self._cache[key] = jax.jit(forward)
    return self._cache[key]

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
      "(jax.export, StableHLO, symbolic batch) with its preprocessing constants.",
  )
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--out", required=True, help="bundle directory to write")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--prefix", type=int, help="export students 1..K (ensemble prefix)")
  which.add_argument("--student", type=int, help="export student J alone")
  which.add_argument("--teacher", action="store_true", help="export the teacher")
  which.add_argument(
      "--max_flops",
      help="largest prefix within this many FLOPs per image "
      "(e.g. 2e6, 150k, or 25%% of the teacher)",
  )
  which.add_argument(
      "--max_flops_pct",
      type=float,
      help="largest prefix within this percentage of the teacher's FLOPs",
  )
  parser.add_argument(
      "--scan_method",
      default=DEFAULT_EXPORT_SCAN_METHOD,
      choices=EXPORT_SCAN_METHODS,
      help="scan inside the exported functions",
  )
  parser.add_argument(
      "--platforms",
      default="",
      help="comma-separated lowering platforms, e.g. cpu,cuda (default: this " "machine's)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    max_flops, max_flops_pct = (None, args.max_flops_pct)
    if args.max_flops is not None:
      max_flops, max_flops_pct = parse_flops(args.max_flops)
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
    )
  except ValueError as e:
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
  print(
      f"  files: {SIDECAR}, {PREFIX_FILE}, "
      + ", ".join(m["file"] for m in meta["members"])
      + f" (platforms {meta['platforms']})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
