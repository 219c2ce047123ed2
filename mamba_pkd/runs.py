"""A finished run's models, rebuilt from its manifest and checkpoints, run in this process.

:func:`load_run` reads ``<workdir>/ensemble.json`` (:mod:`mamba_pkd.manifest`)
and the final parameters of each stage (``ckpt/<stage>/final``); it never
reloads the dataset and never parses a log. :func:`select_members` picks a
prefix, one student or the teacher; :class:`InProcessEnsemble` runs them with
Flax (the :class:`mamba_pkd.ensemble.Ensemble` interface shared with exported
bundles).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Sequence

import jax

from mamba_pkd import checkpoints, ensemble, manifest
from mamba_pkd.ensemble import Member
from mamba_pkd.models import ModelConfig, apply_members, config_from_dict, create_model
from mamba_pkd.models import param_shapes
from mamba_pkd.preprocessing import Preprocessing

PyTree = Any


@dataclasses.dataclass
class RunModels:
  """The models of a finished run (see :func:`load_run`).

  Attributes:
    workdir: the run's directory.
    dataset: dataset name of the run.
    mode: ``"ensemble"`` (prefixes are classifiers) or ``"chain"``.
    preprocessing: input normalisation of the run's dataset.
    teacher: the teacher (params None when loaded with ``with_teacher=False``).
    students: the students in ensemble order, configs as ``ModelConfig`` and
      (ensemble mode) each weight folded into its head.
    prefix_accuracy: test accuracy of ``prefix_1..k`` (of each student in
      chain mode), one per student, from the manifest.
    combination: the manifest's ``combine.Combination`` (None: chain mode or
      a version-1 manifest).
  """

  workdir: pathlib.Path
  dataset: str
  mode: str
  preprocessing: Preprocessing
  teacher: Member
  students: list[Member]
  prefix_accuracy: list[float | None]
  combination: Any = None

  @property
  def teacher_flops(self) -> int:
    return self.teacher.flops


def load_stage_params(workdir: pathlib.Path, stage: str, config: ModelConfig) -> PyTree:
  """The final parameters of ``ckpt/<stage>`` (host arrays)."""
  directory = checkpoints.stage_dir(workdir, stage)
  if not (directory / checkpoints.FINAL_SUBDIR).is_dir():
    raise ValueError(
        f"stage {stage!r} has no final checkpoint ({directory}/final is missing); "
        "re-run mamba_pkd.main with the same --workdir to complete it"
    )
  template = param_shapes(config)
  with checkpoints.StageCheckpointer(directory, is_writer=False) as ckpt:
    return ckpt.load_final(template)[0]


def _loaded(workdir: pathlib.Path, member: Member, with_params: bool) -> Member:
  config = config_from_dict(member.config)  # Mamba, CNN or MLP (its "family" field)
  params = None
  if with_params:
    params = ensemble.fold_weight(load_stage_params(workdir, member.stage, config), member.weight)
  return dataclasses.replace(member, config=config, params=params)


def load_run(workdir: str | pathlib.Path, *, with_teacher: bool = True) -> RunModels:
  """Rebuilds the teacher and the students of a finished run.

  Args:
    workdir: a run directory written by ``python -m mamba_pkd.main``.
    with_teacher: also load the teacher's parameters (its config and FLOPs are
      always available).

  Raises:
    ValueError: no current manifest (the message says how to write it) or a
      stage without its final checkpoint.
  """
  workdir = pathlib.Path(workdir).absolute()  # Orbax wants absolute paths
  m = manifest.read_manifest(workdir)
  return RunModels(
      workdir=workdir,
      dataset=str(m.dataset.get("name", "")),
      mode=m.mode,
      preprocessing=m.preprocessing,
      teacher=_loaded(workdir, m.teacher, with_teacher),
      students=[_loaded(workdir, s, True) for s in m.students],
      prefix_accuracy=m.prefix_accuracy,
      combination=m.combination,
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
    With none given: every student (the whole ensemble).

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
    if member.connect_dim:
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


@functools.lru_cache(maxsize=None)
def member_program(config: ModelConfig) -> Callable:
  """``(params, x, prev) -> (logits, features)`` of one member config, jitted once per
  process and shared by every ensemble in it, params an argument (the report builds an
  ensemble per cascade budget over the same members)."""
  model = create_model(config)
  return jax.jit(lambda p, x, prev=None: model.apply({"params": p}, x, prev, return_features=True))


@functools.lru_cache(maxsize=None)
def prefix_program(configs: tuple[ModelConfig, ...]) -> Callable:
  """``(params, x) -> F_k``, the summed (chained) forward of ``configs``, jitted once per
  process: the report's rows of one size (a student, its prefix of one, its baseline) and
  every ensemble share it."""
  return jax.jit(lambda p, x: ensemble.prefix_logits(apply_members(configs, p, x)[0]))


class InProcessEnsemble(ensemble.Ensemble):
  """Members with configs and params, run with Flax in this process."""

  def __init__(
      self,
      members: Sequence[Member],
      *,
      preprocessing: Preprocessing,
      teacher_flops: int,
      prefix_accuracy: Sequence[float | None] = (),
      batch_size: int = ensemble.DEFAULT_BATCH_SIZE,
      description: str = "",
  ):
    self.members = list(members)
    self.preprocessing = preprocessing
    self.teacher_flops = int(teacher_flops)
    n = len(self.members)
    self.prefix_accuracy = (list(prefix_accuracy) + [None] * n)[:n]
    self.batch_size = batch_size
    self.description = description
    self._params = [jax.tree.map(jax.device_put, m.params) for m in self.members]
    self._member_fns = {}
    self._prefix_fns = {}

  def _member_fn(self, j):
    if j not in self._member_fns:
      program, params = member_program(self.members[j].config), self._params[j]
      self._member_fns[j] = lambda x, prev=None: program(params, x, prev)
    return self._member_fns[j]

  def _prefix_fn(self, k):
    if k not in self._prefix_fns:
      program = prefix_program(tuple(m.config for m in self.members[:k]))
      params = self._params[:k]
      self._prefix_fns[k] = lambda x: program(params, x)
    return self._prefix_fns[k]


def ensemble_from_run(
    run: RunModels,
    members: Sequence[Member] | None = None,
    *,
    batch_size: int = ensemble.DEFAULT_BATCH_SIZE,
) -> InProcessEnsemble:
  """An :class:`InProcessEnsemble` of ``members`` (default: all students)."""
  members = select_members(run) if members is None else list(members)
  accuracy = run.prefix_accuracy if members and members[0].name == "student_1" else []
  out = InProcessEnsemble(
      members,
      preprocessing=run.preprocessing,
      teacher_flops=run.teacher_flops,
      prefix_accuracy=accuracy,
      batch_size=batch_size,
      description=f"workdir {run.workdir} (in-process)",
  )
  if [m.name for m in members] == [m.name for m in run.students]:
    out.combination = run.combination  # its rules are for the whole ensemble
  if run.teacher.params is not None:
    teacher = InProcessEnsemble(
        [run.teacher], preprocessing=run.preprocessing, teacher_flops=run.teacher_flops
    )
    out.teacher_fn = lambda x: teacher.logits(x, normalized=True)
  return out
