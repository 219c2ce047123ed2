"""One run per workdir: a lock file holding the owner's pid, host and start time.

``<workdir>/run.lock`` is created with ``O_CREAT | O_EXCL`` (atomic: of two
runs started together exactly one creates it) and holds one JSON line::

    {"pid": 1234, "host": "node-3", "since": "2026-12-02T05:50:01Z", "token": "..."}

A second run on the same workdir gets :class:`WorkdirLockedError` at once, its
message one line naming the holder. A lock whose pid no longer exists on this
host (the run was killed with SIGKILL, the machine rebooted) is taken over
with a WARNING. A lock written on another host cannot be checked from here and
is never taken over: the message says to delete the file if that run is gone.

The lock is released (the file removed, only if it is still ours) by
:meth:`WorkdirLock.release`, which the context manager calls on normal exit and
on exceptions; :func:`install_sigterm_handler` turns SIGTERM into ``SystemExit``
so that ``finally`` blocks, and so the release, run on ``kill <pid>`` too.

Multi-host runs: only process 0 takes the lock (the caller decides).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import secrets
import signal
import socket
import time
from typing import Any, Callable

from absl import logging

LOCK_NAME = "run.lock"
_GUARD_SUFFIX = ".takeover"
# A takeover guard older than this was left by a process killed mid-takeover.
_GUARD_STALE_S = 30.0
# How long to wait for a lock file that exists but is still empty (being written).
_READ_WAIT_S = 2.0


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; the message is one line naming it."""


def _now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists on this host."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def read_holder(path: pathlib.Path, wait_s: float = _READ_WAIT_S) -> dict[str, Any] | None:
  """The lock file's record, or None if it vanished; waits briefly while it is empty.

  Returns ``{}`` when the file exists but holds no valid record after ``wait_s``.
  """
  deadline = time.monotonic() + wait_s
  while True:
    try:
      text = path.read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      if isinstance(record, dict) and isinstance(record.get("pid"), int):
        return record
    except ValueError:
      pass
    if time.monotonic() >= deadline:
      return {}
    time.sleep(0.05)


def describe(record: dict[str, Any]) -> str:
  """``pid 1234 on host node-3, since 2026-...Z`` (or what is known of it)."""
  if not record:
    return "an unreadable lock record"
  return (
      f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
      f"since {record.get('since', '?')}"
  )


class WorkdirLock:
  """The lock of one workdir; use as a context manager or acquire()/release()."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": _now_iso(),
        "token": secrets.token_hex(8),
    }
    self.held = False

  # -- public ------------------------------------------------------------------

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, taking over a dead holder's on this host.

    Raises:
      WorkdirLockedError: a live run (or one on another host) holds it.
      OSError: the workdir cannot be created or written.
    """
    self.workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
      if self._create():
        self.held = True
        return self
      holder = read_holder(self.path)
      if holder is None:
        continue  # released in between: try again
      if self._is_dead_here(holder):
        self._take_over(holder)
        continue
      raise WorkdirLockedError(self._held_message(holder))
    holder = read_holder(self.path) or {}
    raise WorkdirLockedError(self._held_message(holder))

  def release(self) -> None:
    """Removes the lock file if it is still ours; idempotent."""
    if not self.held:
      return
    self.held = False
    holder = read_holder(self.path, wait_s=0.0)
    if holder and holder.get("token") == self.record["token"]:
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
    else:
      logging.warning("Workdir lock %s is no longer ours (%s); left as is.", self.path, holder)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()

  # -- internals -----------------------------------------------------------------

  def _create(self) -> bool:
    """Creates the lock file with our record; False if it already exists."""
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(self.record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    return True

  def _is_dead_here(self, holder: dict[str, Any]) -> bool:
    return (
        bool(holder)
        and holder.get("host") == self.record["host"]
        and not pid_alive(int(holder["pid"]))
    )

  def _take_over(self, dead: dict[str, Any]) -> None:
    """Removes a dead holder's lock; one taker at a time (a guard file with O_EXCL)."""
    guard = self.path.with_name(self.path.name + _GUARD_SUFFIX)
    try:
      fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      try:
        if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
          guard.unlink()
      except FileNotFoundError:
        pass
      time.sleep(0.1)  # another run is taking over; the caller re-reads the lock
      return
    os.close(fd)
    try:
      current = read_holder(self.path, wait_s=0.0)
      if current and current.get("token") == dead.get("token") and self._is_dead_here(current):
        self.path.unlink()
        logging.warning(
            "Taking over the lock of workdir %s from a run that is gone (%s).",
            self.workdir,
            describe(dead),
        )
    finally:
      guard.unlink()

  def _held_message(self, holder: dict[str, Any]) -> str:
    other_host = holder and holder.get("host") != self.record["host"]
    hint = (
        f"; if that run is gone (it ran on another host, so this host cannot check), "
        f"delete {self.path}"
        if other_host or not holder
        else f"; wait for it to finish (or stop it), or use another --workdir"
    )
    return f"workdir {self.workdir} is in use by another run ({describe(holder)}){hint}"


def install_sigterm_handler(release: Callable[[], None] | None = None) -> None:
  """On SIGTERM: call ``release`` (the lock's), then die of SIGTERM as if no handler existed.

  Releasing inside the handler does not depend on the signal reaching a ``finally``
  block: a ``SystemExit`` raised from a handler can land inside library code that
  swallows it (seen once in the test suite: the run then finished with exit code 0).
  Checkpoints are written atomically, so dying here loses at most the current step.
  Only replaces the default action (a handler someone else installed is kept); does
  nothing outside the main thread.
  """
  try:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

      def handler(signum, frame):  # pylint: disable=unused-argument
        if release is not None:
          release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

      signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    pass


__all__ = [
    "LOCK_NAME",
    "WorkdirLock",
    "WorkdirLockedError",
    "describe",
    "install_sigterm_handler",
    "pid_alive",
    "read_holder",
]
