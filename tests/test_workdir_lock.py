"""One run per workdir: mamba_pkd.workdir_lock, and two smoke runs started together."""

import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import metric_records, shared_reference_run, smoke_cmd, smoke_data_flag, smoke_env
from mamba_pkd import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_lock(workdir: pathlib.Path, **record) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lock.LOCK_NAME
  path.write_text(json.dumps(record) + "\n")
  return path


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  assert not workdir_lock.pid_alive(proc.pid)
  return proc.pid


def test_lock_file_records_pid_host_and_start_and_release_removes_it(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path / "run").acquire()
  record = json.loads((tmp_path / "run" / "run.lock").read_text())
  assert record["pid"] == os.getpid()
  assert record["host"] == socket.gethostname()
  assert record["since"].endswith("Z") and record["since"][:4].isdigit()
  lock.release()
  assert not (tmp_path / "run" / "run.lock").exists()
  lock.release()  # idempotent
  with workdir_lock.WorkdirLock(tmp_path / "run"):  # free again
    assert (tmp_path / "run" / "run.lock").exists()
  assert not (tmp_path / "run" / "run.lock").exists()


def test_released_on_exception(tmp_path):
  with pytest.raises(KeyError):
    with workdir_lock.WorkdirLock(tmp_path):
      raise KeyError("boom")
  assert not (tmp_path / "run.lock").exists()


def test_held_by_a_live_process_is_one_line_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    path = _write_lock(
        tmp_path, pid=holder.pid, host=socket.gethostname(), since="2026-01-02T03:04:05Z", token="x"
    )
    with pytest.raises(workdir_lock.WorkdirLockedError) as info:
      workdir_lock.WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  message = str(info.value)
  assert "\n" not in message
  assert f"pid {holder.pid} on host {socket.gethostname()}, since 2026-01-02T03:04:05Z" in message
  assert str(tmp_path) in message and "--workdir" in message
  assert json.loads(path.read_text())["pid"] == holder.pid  # untouched


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} "):
      workdir_lock.WorkdirLock(tmp_path).acquire()
    assert (tmp_path / "run.lock").exists()  # the refused one removed nothing


def test_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  _write_lock(
      tmp_path, pid=dead, host=socket.gethostname(), since="2026-01-01T00:00:00Z", token="d"
  )
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"pid {dead} on host" in w and "Taking over" in w for w in warnings), warnings
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / "run.lock.takeover").exists()
  lock.release()
  assert not (tmp_path / "run.lock").exists()


def test_holder_on_another_host_is_never_taken_over(tmp_path):
  dead = _dead_pid()  # dead here, but the record says it ran elsewhere
  _write_lock(tmp_path, pid=dead, host="other-node", since="2026-01-01T00:00:00Z", token="o")
  with pytest.raises(workdir_lock.WorkdirLockedError) as info:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert f"pid {dead} on host other-node" in str(info.value)
  assert f"delete {tmp_path / 'run.lock'}" in str(info.value)


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  _write_lock(tmp_path, pid=1, host="elsewhere", since="x", token="someone-else")
  lock.release()
  assert json.loads((tmp_path / "run.lock").read_text())["token"] == "someone-else"


def test_two_smoke_runs_on_one_workdir(tmp_path_factory, tmp_path):
  """Started together on a copy of the shared reference run, with its command: the other
  exits with code 2 and one line naming the holder while the first is still running; the
  first restores every stage and rewrites the report, and its results.json and results.md
  equal the reference's bit for bit. (That training the same command again gives the same
  bytes and every logged metric is checked by test_resume.py's killed-and-rerun run.)"""
  reference = shared_reference_run(tmp_path_factory)
  workdir = tmp_path / "shared"
  shutil.copytree(reference, workdir)
  for name in ("results.json", "results.md"):
    (workdir / name).unlink()
  logs = [tmp_path / "a.log", tmp_path / "b.log"]
  files = [open(p, "w") for p in logs]
  command = smoke_cmd(workdir, smoke_data_flag(tmp_path_factory))  # the reference's
  procs = [
      subprocess.Popen(command, cwd=REPO, env=smoke_env(1), stdout=f, stderr=subprocess.STDOUT)
      for f in files
  ]
  starts = [time.monotonic()] * 2
  try:
    loser = None
    deadline = time.monotonic() + 120  # a failure guard only; the loser exits in seconds
    while loser is None and time.monotonic() < deadline:
      done = [i for i, p in enumerate(procs) if p.poll() is not None]
      if done:
        loser = done[0]
      else:
        time.sleep(0.05)
    assert loser is not None, "neither run exited: " + logs[0].read_text()[-3000:]
    winner = 1 - loser
    loser_seconds = time.monotonic() - starts[loser]
    still_running = procs[winner].poll() is None
    procs[winner].wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  print(f"the second run exited after {loser_seconds:.1f}s")
  assert still_running, "the second run did not exit before the first finished"
  assert procs[loser].returncode == 2, logs[loser].read_text()[-3000:]
  lines = [l for l in logs[loser].read_text().splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"error: workdir {workdir} is in use by another run (pid ")
  assert f"pid {procs[winner].pid} on host {socket.gethostname()}, since " in lines[0]
  assert procs[winner].returncode == 0, logs[winner].read_text()[-5000:]
  assert not (workdir / "run.lock").exists()  # released at exit

  log = logs[winner].read_text()
  assert log.count("already complete, not retrained") == len(list((reference / "ckpt").iterdir()))
  assert "compiling" not in log  # nothing trained
  for name in ("results.json", "results.md"):
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name
  assert metric_records(workdir) == metric_records(reference)  # no record added
