"""What a stage was trained from: fingerprints, their differences, the config history.

A stage's **fingerprint** is a canonical JSON record of everything that decides
what the stage learns, and the SHA-256 of that record:

* ``data``: the dataset's name (for ``npz:`` also the file's SHA-256, so an
  edited file with the same name is a different dataset), the split seed and
  the train / held-out / test sizes;
* ``model``: the stage's model config (``ModelConfig`` fields);
* the config sections it was trained with, under their config names, so that a
  difference reads like the flag that caused it (``student.epochs``,
  ``pkd.alpha``): the optimizer, schedule, augmentation and epochs of
  ``teacher`` / ``student``, the loss and its parameters under ``pkd``;
* ``steps``: the number of training steps;
* ``frozen``: the **hashes** of the frozen models the stage learned from (the
  teacher, earlier students), so a change upstream changes every hash
  downstream.

Fields that do not change what is learned (``scan_method``, ``log_every``,
``checkpoint_every``, ``eval_batch_size``, ``report.*``) are left out by
:func:`config_sections`, so changing them never forces a retrain.

Wiring (``pkd``): before restoring or resuming a stage, compare the stored
fingerprint (:func:`read_fingerprint` of the stage's checkpoint directory) with
the current one through :func:`check_stage`; write the fingerprint with
:func:`write_fingerprint` when the stage starts training. ``main`` appends
every run's full config to ``<workdir>/config_history.jsonl``
(:func:`append_config_history`), so the configs that produced ``ckpt/`` are all
on record even though ``config.json`` holds only the latest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Iterable, Mapping

FINGERPRINT_FILE = "fingerprint.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
_ABSENT = "(absent)"

# Config fields that change how fast or how verbosely a stage runs, never what it learns.
NOT_LEARNED = frozenset(
    {
        "scan_method",
        "log_every",
        "checkpoint_every",
        "eval_batch_size",
        "data_dir",
        "report",
    }
)


class ChangedStageError(ValueError):
  """A finished or started stage was trained with a different config; one line."""

  def __init__(self, stage: str, differences: list[str]):
    self.stage = stage
    self.differences = list(differences)
    super().__init__(changed_stage_message(stage, differences))


# ---------------------------------------------------------------------------
# Canonical records and hashes.


def canonical(value: Any) -> Any:
  """``value`` as plain JSON types with sorted keys: tuples become lists, NumPy scalars
  Python numbers, dataclasses and ConfigDicts dicts; non-finite floats become strings.

  Raises:
    TypeError: a value with no JSON form (the message names its type).
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
  if isinstance(value, (list, tuple)):
    return [canonical(v) for v in value]
  if value is None or isinstance(value, (bool, str)):
    return value
  if hasattr(value, "item") and getattr(value, "shape", None) == ():  # NumPy / JAX scalar
    value = value.item()
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return value if math.isfinite(value) else repr(value)
  raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r:.100}")


def canonical_json(value: Any) -> str:
  """The one JSON text of ``canonical(value)`` (sorted keys, no spaces)."""
  return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stage_fingerprint(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The fingerprint of a stage: ``{"fields": <canonical record>, "hash": <sha256 hex>}``.

  Args:
    fields: what decides the stage's training, e.g. ``{"data": ..., "model": ...,
      "student": ..., "pkd": ..., "steps": ..., "frozen": {"teacher": fp}}``
      (see the module docstring and :func:`stage_fields`). A value under
      ``"frozen"`` may be a fingerprint (a dict with ``"hash"``) or a hash
      string; only the hash is recorded.

  Raises:
    TypeError: a field with no JSON form.
  """
  record = dict(fields)
  if "frozen" in record:
    record["frozen"] = {
        str(name): (fp["hash"] if isinstance(fp, Mapping) else str(fp))
        for name, fp in dict(record["frozen"]).items()
    }
  record = canonical(record)
  digest = hashlib.sha256(canonical_json(record).encode()).hexdigest()
  return {"fields": record, "hash": digest}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for key in tree:
      out.update(_flatten(tree[key], f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _show(value: Any) -> str:
  if value is _ABSENT:
    return _ABSENT
  if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
    return value[:12]  # a hash: its first 12 hex digits are enough to tell them apart
  return json.dumps(value) if isinstance(value, (str, list)) else str(value)


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """The differing fields as ``"dotted.name: old -> new"``, sorted by name.

  ``old`` and ``new`` are fingerprints (their ``"fields"`` are compared) or plain
  field mappings. A field only one side has shows ``(absent)`` on the other.
  Lists are compared whole (``pkd.ladder: ["s1", "s2"] -> ["s1"]``).
  """
  old_fields = _flatten(canonical(old.get("fields", old) if "hash" in old else old))
  new_fields = _flatten(canonical(new.get("fields", new) if "hash" in new else new))
  out = []
  for name in sorted(set(old_fields) | set(new_fields)):
    a, b = old_fields.get(name, _ABSENT), new_fields.get(name, _ABSENT)
    if a != b:
      out.append(f"{name}: {_show(a)} -> {_show(b)}")
  return out


def changed_stage_message(stage: str, differences: Iterable[str], limit: int = 8) -> str:
  """One line: the stage, what changed (up to ``limit`` fields) and the two ways out."""
  differences = list(differences)
  shown = ", ".join(differences[:limit])
  if len(differences) > limit:
    shown += f", and {len(differences) - limit} more"
  return (
      f"stage {stage} was trained with a different config ({shown}); use a new --workdir, "
      "or pass --retrain_changed to retrain the changed stages and those after them"
  )


def check_stage(
    stage: str,
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    retrain_changed: bool = False,
) -> bool:
  """Whether a stage's stored checkpoints may be used (True) or it must be retrained (False).

  Args:
    stage: the stage's name, for the message.
    stored: the fingerprint saved with the stage (None: none saved, e.g. a
      workdir from before fingerprints; it is trusted as before).
    current: this run's fingerprint of the stage.
    retrain_changed: the ``--retrain_changed`` flag.

  Returns:
    True when the fingerprints match (or none is stored); False when they differ
    and ``retrain_changed`` is set (the caller moves the stage's directory aside
    and trains it again: its hash changes, so every later stage differs too).

  Raises:
    ChangedStageError: they differ and ``retrain_changed`` is not set.
  """
  if stored is None or stored.get("hash") == current.get("hash"):
    return True
  if retrain_changed:
    return False
  raise ChangedStageError(stage, diff_fingerprints(stored, current) or ["hash differs"])


# ---------------------------------------------------------------------------
# Building the fields.


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
  """SHA-256 (hex) of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_bytes), b""):
      digest.update(chunk)
  return digest.hexdigest()


def data_identity(
    dataset: str, *, seed: int, num_train: int, num_heldout: int, num_test: int
) -> dict[str, Any]:
  """The ``data`` field: name, ``npz:`` file hash, split seed and sizes."""
  out = {
      "dataset": dataset,
      "seed": int(seed),
      "num_train": int(num_train),
      "num_heldout": int(num_heldout),
      "num_test": int(num_test),
  }
  if dataset.startswith("npz:"):
    out["sha256"] = file_sha256(pathlib.Path(dataset[len("npz:") :]).expanduser())
  return out


def config_sections(config: Any, *names: str) -> dict[str, Any]:
  """The named config sections (e.g. ``"student"``, ``"pkd"``) as canonical dicts,
  without the fields in :data:`NOT_LEARNED`."""
  out = {}
  for name in names:
    section = canonical(config[name])
    if isinstance(section, dict):
      section = {k: v for k, v in section.items() if k not in NOT_LEARNED}
    out[name] = section
  return out


def stage_fields(
    *,
    data: Mapping[str, Any],
    model: Any,
    sections: Mapping[str, Any],
    steps: int,
    seed: int,
    frozen: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The fields of :func:`stage_fingerprint` for one stage.

  Args:
    data: :func:`data_identity`.
    model: the stage's ``ModelConfig`` (``scan_method``/``scan_unroll`` dropped:
      they change speed, not the function).
    sections: :func:`config_sections` of what the stage was trained with, e.g.
      ``config_sections(config, "teacher")`` for the teacher,
      ``config_sections(config, "student", "pkd")`` for a student,
      ``config_sections(config, "student")`` for a CE baseline.
    steps: training steps of the stage.
    seed: the stage's initialisation / batch-order seed.
    frozen: ``{name: fingerprint or hash}`` of the frozen models it learned from.
  """
  model_fields = canonical(model)
  if isinstance(model_fields, dict):
    model_fields = {
        k: v for k, v in model_fields.items() if k not in ("scan_method", "scan_unroll")
    }
  return {
      "data": dict(data),
      "model": model_fields,
      **dict(sections),
      "steps": int(steps),
      "seed": int(seed),
      "frozen": dict(frozen or {}),
  }


# ---------------------------------------------------------------------------
# Files.


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_fingerprint(stage_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> pathlib.Path:
  """Writes ``<stage_dir>/fingerprint.json`` atomically; returns its path."""
  path = pathlib.Path(stage_dir) / FINGERPRINT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_atomically(path, json.dumps(canonical(fingerprint), indent=1, sort_keys=True) + "\n")
  return path


def read_fingerprint(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The stage's stored fingerprint, or None if it has none.

  Raises:
    ValueError: the file exists but is not a fingerprint (names the file).
  """
  path = pathlib.Path(stage_dir) / FINGERPRINT_FILE
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it to trust the stage as is") from e
  if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
    raise ValueError(f"{path} has no 'hash'; delete it to trust the stage as is")
  return record


def _listing(directory: pathlib.Path) -> list[str]:
  return sorted(str(p) for p in directory.rglob("*")) if directory.is_dir() else []


@dataclasses.dataclass
class HistoryEntry:
  """The line :func:`append_config_history` wrote, and how to take it back."""

  path: pathlib.Path
  size_before: int | None  # None: the file did not exist
  ckpt_before: list[str]

  def ckpt_unchanged(self) -> bool:
    """Whether ``<workdir>/ckpt`` holds the same paths as when the line was written."""
    return _listing(self.path.parent / "ckpt") == self.ckpt_before

  def undo(self) -> None:
    """Removes the line (for a run refused before it trained anything)."""
    if self.size_before is None:
      self.path.unlink(missing_ok=True)
    else:
      os.truncate(self.path, self.size_before)


def append_config_history(
    workdir: str | os.PathLike, config: Any, *, now: datetime.datetime | None = None
) -> HistoryEntry:
  """Appends ``{"time": ..., "config": ...}`` as one line to ``<workdir>/config_history.jsonl``.

  Called once per run start (process 0, holding the workdir lock). ``config`` is
  a ConfigDict or mapping; values without a JSON form are written as their
  ``repr``. Uses no git and nothing outside the workdir. ``main`` undoes the
  line when the run stops at a user error before any checkpoint was written.
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  line = json.dumps(
      {"time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "config": config},
      sort_keys=True,
      default=repr,
  )
  workdir = pathlib.Path(workdir)
  path = workdir / CONFIG_HISTORY_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  entry = HistoryEntry(
      path, path.stat().st_size if path.exists() else None, _listing(workdir / "ckpt")
  )
  with open(path, "a") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())
  return entry


def read_config_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``config_history.jsonl``, oldest first ([] if none)."""
  path = pathlib.Path(workdir) / CONFIG_HISTORY_FILE
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
