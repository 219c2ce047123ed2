"""main.py: --retrain_changed plumbing, a failed checkpoint write as one line, SIGTERM."""

import json
import pathlib
import signal
import subprocess
import time

from absl import app
import pytest

from conftest import smoke_cmd, smoke_env
from mamba_pkd import checkpoints, main, pkd

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_retrain_changed_is_passed_only_where_accepted():
  def old(config, workdir):
    del config, workdir

  def new(config, workdir, retrain_changed=False):
    del config, workdir, retrain_changed

  assert main.train_kwargs(old, retrain_changed=False) == {}
  assert main.train_kwargs(new, retrain_changed=True) == {"retrain_changed": True}
  assert main.train_kwargs(new, retrain_changed=False) == {"retrain_changed": False}
  with pytest.raises(app.UsageError, match="--retrain_changed is not supported"):
    main.train_kwargs(old, retrain_changed=True)


def test_checkpoint_write_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
  message = (
      "stage student_1: could not write checkpoint step 8 in /w/ckpt/student_1/steps: "
      "ENOSPC: No space left on device; the previous checkpoint (step 4) is intact."
  )

  def full_disk(config, workdir):
    raise checkpoints.CheckpointWriteError(message, 28)

  monkeypatch.setattr(pkd, "train_and_evaluate", full_disk)
  main.FLAGS.mark_as_parsed()
  assert main.run_job(None, "/w") == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def test_sigterm_releases_the_lock(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      smoke_cmd(workdir),
      cwd=REPO,
      env=smoke_env(1),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    deadline = time.monotonic() + 120
    # The history line is written after the SIGTERM handler is installed.
    while not (workdir / "config_history.jsonl").exists():
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.02)
    assert json.loads((workdir / "run.lock").read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGTERM  # died of the signal, after releasing the lock
  assert not (workdir / "run.lock").exists()
