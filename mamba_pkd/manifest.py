"""The run manifest: the contract between a training run and everything that reads it.

``<workdir>/ensemble.json`` is written by the run, through :func:`write_manifest`
only, at the end of ``pkd.train_and_evaluate``; :func:`read_manifest` is its
only reader (export, predict, the run loader in :mod:`mamba_pkd.runs`,
notebooks). Readers never reload the dataset and never parse logs.

Schema (``"version": 2``)::

    {"format": "mamba_pkd.run_manifest", "version": 2,
     "mode": "ensemble" | "chain",
     "dataset": {"name", "seed", "num_train", "num_heldout", "num_test"},
     "preprocessing": {"image_shape", "num_classes", "mean", "std", "formula"},
     "teacher": MEMBER,
     "students": [MEMBER, ...],    # ensemble order: prefix k = students[:k]
     "baselines": [MEMBER, ...],   # the same sizes trained alone with CE
     "stop": "why the ladder ended",
     "combination": COMBINATION or null}   # new in version 2 (null: chain mode, no students)

    MEMBER = {"name", "stage", "size", "config" (models.ModelConfig fields),
              "flops", "params", "d_model", "connect_dim",
              "weight" (eta, NOT folded into the checkpoint: ckpt/<stage>/final holds f),
              "prefix_scale", "test_accuracy" (of the prefix ending here for a
              student in ensemble mode, of the model alone otherwise; or null)}

    COMBINATION = {                 # fitted on held-out data after training (mamba_pkd.anytime)
      "prefixes": [{"k", "weights" (k floats, sum k, relative to the folded members),
                    "temperature", "source" ("fit" | "previous" | "member_<j>" |
                    "fit-><one of those>@<t>", combine.fit_prefixes),
                    "heldout_nll"}, ...],       # G_k = sum_j weights[j] f_j / temperature
      "teacher_temperature",
      "cascades": {"<budget>%": {"budget_pct", "threshold", "teacher_exit",
                                 "heldout_accuracy", "heldout_pct_teacher_flops"} or null},
      "logits": "how G_k is formed"}

Version 1 manifests (before the combination) are still read, with ``combination`` None.

JSON and NumPy only: reading a manifest needs neither JAX nor Flax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from mamba_pkd.combine import Combination
from mamba_pkd.ensemble import Member
from mamba_pkd.preprocessing import Preprocessing

FILENAME = "ensemble.json"
FORMAT = "mamba_pkd.run_manifest"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no combination
MODES = ("ensemble", "chain")


class ManifestError(ValueError):
  """A workdir without a (current) manifest, or a manifest that does not parse."""


@dataclasses.dataclass
class Manifest:
  """A parsed manifest. Members carry ``config`` as a dict of ModelConfig fields."""

  workdir: pathlib.Path
  mode: str
  dataset: dict
  preprocessing: Preprocessing
  teacher: Member
  students: list[Member]
  baselines: list[Member]
  stop: str
  test_accuracy: dict[str, float | None]  # by member name
  combination: Combination | None = None  # per-prefix weights, temperatures, exit rules

  @property
  def teacher_flops(self) -> int:
    return self.teacher.flops

  @property
  def prefix_accuracy(self) -> list[float | None]:
    """Test accuracy of prefix 1..k per student (ensemble mode), else of each student."""
    return [self.test_accuracy.get(m.name) for m in self.students]


def config_record(config: Any) -> dict:
  """A model config as plain JSON fields (the manifest's ``config``, the stage
  fingerprints' ``model``): every field, tuples as lists, except ``token_features``
  while it is off, so that records written before the field existed still match."""
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}
  if record.get("token_features", None) is False:
    del record["token_features"]
  return record


def member_entry(member: Member, test_accuracy: float | None = None) -> dict:
  """The manifest's record of one member (its config must be set)."""
  if member.config is None:
    raise ValueError(f"member {member.name!r} has no config to record")
  return {
      "name": member.name,
      "stage": member.stage,
      "size": member.size,
      "config": config_record(member.config),
      "flops": int(member.flops),
      "params": int(member.num_params),
      "d_model": int(member.d_model),
      "connect_dim": int(member.connect_dim),
      "weight": float(member.weight),
      "prefix_scale": float(member.prefix_scale),
      "test_accuracy": None if test_accuracy is None else float(test_accuracy),
  }


def write_manifest(
    workdir: str | os.PathLike,
    *,
    mode: str,
    dataset: Mapping[str, Any],
    preprocessing: Preprocessing,
    teacher: Member,
    students: Sequence[Member],
    baselines: Sequence[Member] = (),
    stop: str = "",
    test_accuracy: Mapping[str, float] | None = None,
    combination: Combination | None = None,
) -> pathlib.Path:
  """Writes ``<workdir>/ensemble.json`` atomically (a temporary file, then a rename)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  acc = dict(test_accuracy or {})
  content = {
      "format": FORMAT,
      "version": VERSION,
      "mode": mode,
      "dataset": dict(dataset),
      "preprocessing": preprocessing.to_json(),
      "teacher": member_entry(teacher, acc.get(teacher.name)),
      "students": [member_entry(m, acc.get(m.name)) for m in students],
      "baselines": [member_entry(m, acc.get(m.name)) for m in baselines],
      "stop": stop,
      "combination": None if combination is None else combination.to_json(),
  }
  path = pathlib.Path(workdir) / FILENAME
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  os.replace(tmp, path)
  return path


def member_from_entry(entry: Mapping[str, Any]) -> Member:
  """The :class:`Member` of a :func:`member_entry` record (``config`` stays a dict)."""
  return Member(
      name=entry["name"],
      stage=entry["stage"],
      size=entry["size"],
      flops=int(entry["flops"]),
      num_params=int(entry["params"]),
      d_model=int(entry["d_model"]),
      connect_dim=int(entry["connect_dim"]),
      weight=float(entry.get("weight", 1.0)),
      prefix_scale=float(entry.get("prefix_scale", 1.0)),
      config=dict(entry["config"]),
  )


def read_manifest(workdir: str | os.PathLike) -> Manifest:
  """Parses ``<workdir>/ensemble.json``.

  Raises:
    ManifestError: no manifest (a run that has not finished, or one written
      before manifests existed), another schema version, or a malformed file;
      the message says how to regenerate it.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / FILENAME
  regenerate = (
      "re-run `python -m mamba_pkd.main --config=<the run's config> "
      f"--workdir={workdir}`: finished stages are restored, not retrained, and the "
      "manifest is written at the end"
  )
  if not path.is_file():
    if not workdir.is_dir():
      raise ManifestError(
          f"workdir {str(workdir)!r} does not exist; pass the --workdir of a "
          "finished `python -m mamba_pkd.main` run"
      )
    if (workdir / "results.json").is_file():
      raise ManifestError(
          f"{path} does not exist: the run was made by an older version of mamba_pkd, "
          f"before run manifests; {regenerate}"
      )
    raise ManifestError(f"{path} does not exist (the run has not finished); {regenerate}")
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path} is not valid JSON ({e}); {regenerate}") from None
  if content.get("format") != FORMAT or content.get("version") not in READABLE_VERSIONS:
    raise ManifestError(
        f"{path} is format {content.get('format')!r} version {content.get('version')!r}, "
        f"this code reads {FORMAT!r} version {VERSION}; {regenerate}"
    )
  try:
    teacher = member_from_entry(content["teacher"])
    students = [member_from_entry(e) for e in content["students"]]
    baselines = [member_from_entry(e) for e in content["baselines"]]
    entries = [content["teacher"], *content["students"], *content["baselines"]]
    return Manifest(
        workdir=workdir,
        mode=content["mode"],
        dataset=dict(content["dataset"]),
        preprocessing=Preprocessing.from_json(content["preprocessing"]),
        teacher=teacher,
        students=students,
        baselines=baselines,
        stop=str(content.get("stop", "")),
        test_accuracy={e["name"]: e.get("test_accuracy") for e in entries},
        combination=(
            Combination.from_json(content["combination"])
            if content.get("combination") is not None
            else None
        ),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise ManifestError(f"{path} is malformed ({type(e).__name__}: {e}); {regenerate}") from None
