"""Per-stage Orbax checkpoints: resume a stage where it stopped, never retrain a finished one.

A PKD run trains a sequence of stages (``"teacher"``, ``"student_1"``, ...,
``"baseline_2"``); each stage owns one directory, :func:`stage_dir`::

    <workdir>/ckpt/<stage>/
        steps/<step>/...        train state of the newest ``max_to_keep`` steps
        final/0/params/...      final parameters, written once by mark_complete
        final/0/info/...        small JSON (accuracy, flops, size, seed, ...)
        corrupted/<step>-<t>/   steps that failed to restore, moved aside (kept)

The train state is any pytree of host arrays (params, optax state, step
counter, raw ``uint32`` key data); the caller unreplicates it before
:meth:`StageCheckpointer.save` and passes a template of the same structure to
:meth:`StageCheckpointer.restore_latest`. Frozen models are never part of it.

Guarantees:

* **Synchronous and atomic.** Async checkpointing is off, so ``save`` has
  finished when it returns. Orbax writes a step into
  ``<step>.orbax-checkpoint-tmp*`` and renames it when complete; a process
  killed mid-save leaves only such a temporary directory, which is ignored
  (reported with a WARNING, deleted by the next writer).
* **Corruption falls back.** ``restore_latest`` tries the newest step; when it
  cannot be read (a truncated or deleted file inside it) it logs a WARNING
  naming the step and the error and tries the previous one. A bad step that
  is newer than the one restored is moved to ``corrupted/`` by the writer, so
  that the resumed run can save that step number again.
* **Template mismatch is an error, not corruption.** A readable checkpoint whose
  shapes or dtypes differ from the template raises ``ValueError`` (the usual
  cause is a changed config over an old ``--workdir``); when *no* step can be
  restored ``ValueError`` is raised too, naming every step and its error,
  rather than silently starting the stage again over the user's checkpoints.
* **A failed write is one line, and the previous step survives.** An OSError
  while writing (ENOSPC: the disk is full) raises :class:`CheckpointWriteError`
  naming the stage, the step, the directory and the errno text; older steps
  are not touched (Orbax deletes old steps only after a save succeeded), so
  rerunning the command resumes from the newest intact step.
* **Host NumPy in, host NumPy out.** Leaves are saved as NumPy arrays and
  restored as NumPy arrays with exactly the stored shape and dtype (no
  sharding is needed or used); the caller places them on devices.

Multi-host (``jax.distributed``): every process builds a ``StageCheckpointer``
over the same shared directory, with ``is_writer=(jax.process_index() == 0)``.
Each Orbax manager is told that the calling process is alone
(``MultiprocessingOptions(primary_host=me, active_processes={me})``): Orbax
then skips every cross-process barrier (a barrier over a one-process set is a
no-op), so a save on process 0 never waits for processes that do not call it,
and nothing can deadlock. Non-writers open the directory ``read_only`` and
write nothing. Ordering between processes is the caller's: after process 0's
``save``/``mark_complete`` the stage loop calls ``parallel.sync(name)`` (a
barrier on the coordination service of ``jax.distributed``) before the others
read, and after ``restore_latest`` it makes every process agree on the restored
step with ``parallel.agree`` (which also guards against a file that only some
hosts could read).
"""

from __future__ import annotations

import errno as errno_module
import json
import os
import pathlib
import re
import shutil
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

CKPT_SUBDIR = "ckpt"
STEPS_SUBDIR = "steps"
FINAL_SUBDIR = "final"
CORRUPTED_SUBDIR = "corrupted"
# Orbax names a step being written "<step>.orbax-checkpoint-tmp" (0.12) or
# "<step>.orbax-checkpoint-tmp-<timestamp>" (0.11); the marker covers both.
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
_FINAL_STEP = 0
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, ...); one-line message.

  Attributes:
    errno: the underlying ``OSError.errno`` (e.g. ``errno.ENOSPC``), or None.
  """

  def __init__(self, message: str, errno_value: int | None = None):
    super().__init__(message)
    self.errno = errno_value


def _os_error_in(error: BaseException) -> OSError | None:
  """The first ``OSError`` in ``error``'s cause/context chain (itself included)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error
    error = error.__cause__ or error.__context__
  return None


def stage_dir(workdir: str | os.PathLike, stage_name: str) -> pathlib.Path:
  """Returns ``<workdir>/ckpt/<stage_name>``, the checkpoint directory of a stage.

  Args:
    workdir: the run's working directory.
    stage_name: e.g. ``"teacher"``, ``"student_1"``, ``"baseline_2"``; letters,
      digits, ``_``, ``.`` and ``-``, starting with a letter or digit.

  Raises:
    ValueError: if ``stage_name`` is not such a name.
  """
  if not isinstance(stage_name, str) or not _STAGE_NAME.fullmatch(stage_name):
    raise ValueError(
        f"stage_name={stage_name!r} is not a valid stage name: use letters, "
        "digits, '_', '.' and '-', starting with a letter or digit "
        "(e.g. 'teacher', 'student_1')."
    )
  return pathlib.Path(workdir) / CKPT_SUBDIR / stage_name


def _preservation_options(max_to_keep: int) -> dict[str, Any]:
  """Manager options keeping the newest ``max_to_keep`` steps (version guard).

  ``preservation_policy=LatestN`` is the current API (``max_to_keep`` is
  deprecated in orbax-checkpoint 0.12); releases without it fall back to
  ``max_to_keep``.
  """
  managers = getattr(ocp, "checkpoint_managers", None)
  latest_n = getattr(managers, "LatestN", None)
  if latest_n is None:
    logging.info("orbax %s has no LatestN; using max_to_keep.", getattr(ocp, "__version__", "?"))
    return {"max_to_keep": max_to_keep}
  return {"preservation_policy": latest_n(n=max_to_keep)}


def _create_manager(
    directory: pathlib.Path, *, is_writer: bool, **options: Any
) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager in which this process acts alone."""
  me = jax.process_index()
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False,
          read_only=not is_writer,
          save_interval_steps=1 if is_writer else 0,  # Orbax warns otherwise
          create=False,  # made by the writer; Orbax refuses create + active_processes
          cleanup_tmp_directories=False,  # the writer's StageCheckpointer deletes them
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}
          ),
          **options,
      ),
  )


def _to_host(x: Any) -> np.ndarray:
  """A state leaf as a host NumPy array (raises on typed keys / sharded arrays)."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    raise ValueError(
        "state holds a typed PRNG key array; save its raw bits instead "
        "(jax.random.key_data(key), uint32) and rebuild it with "
        "jax.random.wrap_key_data after restoring."
    )
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(
        f"state holds a jax.Array of shape {x.shape} that is not fully "
        "addressable on this process; gather/unreplicate it to host NumPy "
        "before saving."
    )
  return np.asarray(x)


def _host_spec(x: Any) -> Any:
  """A template leaf: kept if it has ``shape``/``dtype``, else ``np.asarray``."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return x
  return np.asarray(x)


def _restore_args(template: PyTree) -> ocp.args.PyTreeRestore:
  """PyTreeRestore into host NumPy with the stored shapes/dtypes (no sharding)."""
  item = jax.tree.map(_host_spec, template)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return ocp.args.PyTreeRestore(item=item, restore_args=restore_args)


def _check_matches(restored: PyTree, template: PyTree, where: str) -> None:
  """Raises ValueError unless ``restored`` has the template's structure, shapes, dtypes."""
  template = jax.tree.map(_host_spec, template)
  if jax.tree.structure(restored) != jax.tree.structure(template):
    raise ValueError(
        f"checkpoint {where} has pytree structure {jax.tree.structure(restored)}"
        f", the template has {jax.tree.structure(template)}. The run's config "
        "probably changed: use a new --workdir or delete this checkpoint."
    )
  mismatches = []
  got_leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  for (path, got), want in zip(got_leaves, jax.tree.leaves(template)):
    if got.shape != tuple(want.shape) or got.dtype != want.dtype:
      mismatches.append(
          f"{jax.tree_util.keystr(path)}: stored {got.dtype}{list(got.shape)},"
          f" template {np.dtype(want.dtype)}{list(want.shape)}"
      )
  if mismatches:
    raise ValueError(
        f"checkpoint {where} does not match the template in "
        f"{len(mismatches)} leaves ({'; '.join(mismatches[:5])}). The run's "
        "config probably changed: use a new --workdir or delete this "
        "checkpoint."
    )


def _jsonable_info(info: Mapping[str, Any]) -> dict[str, Any]:
  """``info`` as plain JSON types (NumPy scalars/arrays converted); validates."""
  if not isinstance(info, Mapping) or not all(isinstance(k, str) for k in info):
    raise ValueError(
        f"info must be a dict with str keys, got {type(info).__name__}: " f"{info!r:.200}"
    )

  def default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)) or (
        isinstance(obj, jax.Array) and obj.is_fully_addressable
    ):
      return np.asarray(obj).tolist()
    raise TypeError(f"{type(obj).__name__} {obj!r:.100}")

  try:
    return json.loads(json.dumps(dict(info), default=default, allow_nan=True))
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"info must be JSON-serializable (str, int, float, bool, None, list, "
        f"dict, NumPy scalars/arrays); cannot serialize {e}"
    ) from e


def _check_step(step: Any) -> int:
  """``step`` as an int >= 0 (accepts NumPy/0-d integer arrays)."""
  try:
    value = int(step)
  except (TypeError, ValueError):
    value = None
  if value is None or value != step or value < 0 or isinstance(step, bool):
    raise ValueError(f"step={step!r} must be an integer >= 0.")
  return value


def _shorten(error: Exception, limit: int = 600) -> str:
  """``str(error)`` cut to ``limit`` characters (TensorStore embeds long specs)."""
  text = str(error)
  return text if len(text) <= limit else text[:limit] + " ..."


class StageCheckpointer:
  """Checkpoints of one training stage (see the module docstring).

  Usage, on every process of a run::

      ckpt = StageCheckpointer(stage_dir(workdir, "student_1"),
                               is_writer=jax.process_index() == 0)
      if ckpt.is_complete():
        params, info = ckpt.load_final(template_params)
      else:
        resumed = ckpt.restore_latest(template_state)
        ...  # train from resumed step; ckpt.save(step, host_state) now and then
        ckpt.mark_complete(host_params, {"accuracy": acc, "seed": seed})
      ckpt.close()
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      max_to_keep: int = 2,
      is_writer: bool = True,
  ):
    """Opens (the writer creates) the stage directory.

    Args:
      directory: the stage's directory, usually ``stage_dir(workdir, name)``.
      max_to_keep: how many newest train-state steps to keep, >= 1.
      is_writer: False on the non-zero processes of a multi-host run: they
        never write (``save``/``mark_complete`` are no-ops), only read.

    Raises:
      ValueError: if ``max_to_keep`` is not an int >= 1.
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or (max_to_keep < 1):
      raise ValueError(
          f"max_to_keep={max_to_keep!r} must be an int >= 1 (the number of " "newest steps kept)."
      )
    self.directory = pathlib.Path(directory).absolute()  # Orbax needs absolute paths
    self.is_writer = bool(is_writer)
    self._steps_dir = self.directory / STEPS_SUBDIR
    self._final_dir = self.directory / FINAL_SUBDIR
    for root in (self._steps_dir, self._final_dir):
      half_written = self._report_half_written(root)
      if self.is_writer:
        # Deleted here, before anything else: Orbax's own cleanup runs in a background
        # thread that its close() does not wait for.
        for path in half_written:
          shutil.rmtree(path, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    self._steps = _create_manager(
        self._steps_dir,
        is_writer=self.is_writer,
        **_preservation_options(max_to_keep),
    )
    self._final = _create_manager(self._final_dir, is_writer=self.is_writer)

  # -- train state ----------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest finished step on disk (not checked for corruption), or None."""
    self._steps.reload()  # another process may have written since
    return self._steps.latest_step()

  def save(self, step: int, state: PyTree) -> None:
    """Saves ``state`` as ``step``; finished and atomic on return (writer only).

    Saving the newest saved step again is skipped (logged): it happens when a
    resumed run reaches its save point at the step it resumed from.

    Args:
      step: training step, an int >= 0, larger than every saved step.
      state: pytree of host arrays (NumPy, or fully addressable jax.Arrays,
        which are copied to host); unreplicated; raw uint32 key data, not typed
        keys.

    Raises:
      ValueError: if ``step`` is not an int >= 0, is older than the newest
        saved step, or ``state`` holds typed keys / non-addressable arrays.
      CheckpointWriteError: the write failed with an OSError (e.g. ENOSPC, a
        full disk); one line naming the stage, step, directory and error. The
        half-written step is left in a temporary directory that the next
        writer deletes; earlier steps are untouched, so a rerun resumes.
    """
    step = _check_step(step)
    if not self.is_writer:
      return
    host_state = jax.tree.map(_to_host, state)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step == latest:
        logging.info("Step %d of %s is already saved; not saving it again.", step, self._steps_dir)
        return
      raise ValueError(
          f"step={step} is older than the newest saved step {latest} in "
          f"{self._steps_dir}; resume from restore_latest() before saving."
      )
    try:
      if not self._steps.save(step, args=ocp.args.PyTreeSave(host_state)):
        raise RuntimeError(f"Orbax declined to save step {step} in {self._steps_dir}.")
      self._steps.wait_until_finished()  # no-op when synchronous; kept as a guard
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_write_error(e, f"checkpoint step {step}", self._steps_dir, latest)
    logging.info("Saved step %d in %s.", step, self._steps_dir)

  def restore_latest(self, template: PyTree) -> tuple[int, PyTree] | None:
    """Restores the newest readable step, falling back past corrupted ones.

    Args:
      template: pytree with the train state's structure; leaves are arrays or
        ``jax.ShapeDtypeStruct`` giving the expected shapes and dtypes.

    Returns:
      ``(step, state)`` with ``state`` a pytree of host NumPy arrays shaped like
      ``template``, or None when the stage has no saved step.

    Raises:
      ValueError: if a readable step does not match the template's structure,
        shapes or dtypes, or if steps exist but none could be restored.
    """
    self._report_half_written(self._steps_dir)
    failures = []
    for step in sorted(self._steps_all(), reverse=True):
      try:
        restored = self._steps.restore(step, args=_restore_args(template))
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Orbax/TensorStore raise ValueError, OSError, JSONDecodeError, ...
        # for damaged files; any of them makes this step unusable.
        logging.warning(
            "Checkpoint step %d in %s is unreadable, falling back to the " "previous step: %s: %s",
            step,
            self._steps_dir,
            type(e).__name__,
            _shorten(e),
        )
        failures.append((step, e))
        continue
      _check_matches(restored, template, f"step {step} in {self._steps_dir}")
      self._set_aside([s for s, _ in failures])
      logging.info("Restored step %d from %s.", step, self._steps_dir)
      return step, restored
    if failures:
      errors = "; ".join(f"step {s}: {type(e).__name__}: {_shorten(e)}" for s, e in failures)
      raise ValueError(
          f"none of the checkpoints in {self._steps_dir} could be restored "
          f"into the given template ({errors}). If the run's config "
          "changed, use a new --workdir; if the files are damaged, delete "
          "that directory to retrain the stage."
      )
    return None

  # -- finished stage -------------------------------------------------------

  def mark_complete(self, params: PyTree, info: Mapping[str, Any]) -> None:
    """Saves the final ``params`` and ``info`` atomically; the stage is done.

    Args:
      params: pytree of host arrays, the stage's final parameters.
      info: JSON-serializable dict with str keys (NumPy scalars allowed), e.g.
        ``{"accuracy": 0.98, "flops": 1.2e6, "size": "tiny", "seed": 0}``.

    Raises:
      ValueError: if ``info`` is not JSON-serializable, ``params`` holds typed
        keys, or the stage is already complete (it is never rewritten).
    """
    info = _jsonable_info(info)
    if not self.is_writer:
      return
    host_params = jax.tree.map(_to_host, params)
    if self.is_complete():
      raise ValueError(
          f"stage {self.directory} is already complete; a completed stage is "
          "never retrained or rewritten (delete its directory to redo it)."
      )
    try:
      self._final.save(
          _FINAL_STEP,
          args=ocp.args.Composite(
              params=ocp.args.PyTreeSave(host_params),
              info=ocp.args.JsonSave(info),
          ),
      )
      self._final.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_write_error(e, "final parameters", self._final_dir, self.latest_step())
    logging.info("Stage %s complete: %s", self.directory, info)

  def is_complete(self) -> bool:
    """Whether :meth:`mark_complete` has finished for this stage."""
    self._final.reload()
    return self._final.latest_step() is not None

  def load_final(self, template_params: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Loads the final parameters and info of a completed stage.

    Args:
      template_params: pytree of arrays or ``jax.ShapeDtypeStruct`` with the
        parameters' structure, shapes and dtypes.

    Returns:
      ``(params, info)``: host NumPy arrays shaped like the template, and the
      info dict given to :meth:`mark_complete`.

    Raises:
      ValueError: if the stage is not complete, or its parameters do not match
        the template.
    """
    if not self.is_complete():
      raise ValueError(
          f"stage {self.directory} is not complete (no {self._final_dir}); "
          "train it first or check the stage name."
      )
    restored = self._final.restore(
        _FINAL_STEP,
        args=ocp.args.Composite(params=_restore_args(template_params), info=ocp.args.JsonRestore()),
    )
    _check_matches(restored["params"], template_params, f"final params in {self._final_dir}")
    return restored["params"], dict(restored["info"])

  def close(self) -> None:
    """Releases Orbax resources (threads); the object is unusable afterwards."""
    self._steps.close()
    self._final.close()

  def __enter__(self) -> StageCheckpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- internals --------------------------------------------------------------

  def _raise_write_error(
      self, error: Exception, what: str, directory: pathlib.Path, kept: int | None
  ) -> None:
    """Re-raises an OS-level failure of a save as one CheckpointWriteError line."""
    os_error = _os_error_in(error)
    if os_error is None:
      raise error
    reason = os.strerror(os_error.errno) if os_error.errno else str(os_error)
    errno_name = errno_module.errorcode.get(os_error.errno, "") if os_error.errno else ""
    previous = (
        f"the previous checkpoint (step {kept}) is intact"
        if kept is not None
        else "no earlier checkpoint of this stage exists"
    )
    raise CheckpointWriteError(
        f"stage {self.directory.name}: could not write {what} in {directory}: "
        f"{errno_name + ': ' if errno_name else ''}{reason}; {previous}. Free space (or fix "
        "the directory) and rerun the same command to resume.",
        os_error.errno,
    ) from error

  def _steps_all(self) -> list[int]:
    self._steps.reload()
    return list(self._steps.all_steps())

  def _report_half_written(self, root: pathlib.Path) -> list[pathlib.Path]:
    """Logs and returns each temporary (half-written) Orbax directory under ``root``."""
    if not root.is_dir():
      return []
    found = [path for path in sorted(root.iterdir()) if ORBAX_TMP_MARKER in path.name]
    for path in found:
      logging.warning(
          "Ignoring half-written checkpoint %s (a save that was interrupted)%s.",
          path,
          "; the writer deletes it" if self.is_writer else "",
      )
    return found

  def _set_aside(self, steps: list[int]) -> None:
    """Writer only: moves unreadable steps to ``corrupted/`` (never deletes)."""
    if not self.is_writer or not steps:
      return
    for step in steps:
      source = self._steps_dir / str(step)
      target = self.directory / CORRUPTED_SUBDIR / f"{step}-{time.time_ns()}"
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        logging.warning("Moved unreadable checkpoint step %d to %s.", step, target)
      except OSError as e:
        logging.warning("Could not move unreadable step %s aside: %s", source, e)
    self._steps.reload()
