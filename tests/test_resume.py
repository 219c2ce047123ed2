"""Surviving faults: SIGKILL + rerun, a corrupted checkpoint, NaN losses.

The killed-and-rerun run also shows that the same command gives the same bytes and the same
logged metrics: its teacher is trained from scratch, and what it and the rerun log matches
the reference's records.

Every run is ``python -m mamba_pkd.main --config=configs/smoke.py`` in a
subprocess on one CPU device; the reference is conftest's shared run (on the
smoke arrays saved as an npz file), and the runs compared with it read the
same file. On CPU the same command gives the same bytes:
the order of an epoch and every draw depend only on (seed, epoch, step), XLA's
CPU reductions are deterministic, and a resumed stage restores the exact
optimizer state and skips the batches already seen, so kill + rerun must
equal an uninterrupted run bit for bit (``results.json`` compared as bytes,
no tolerance).

The killed run adds ``--config.checkpoint_every=1`` (a checkpoint after every
step, so that a 12-step student stage can be killed after two of them with
steps still to go). How often a run checkpoints changes what is saved, never
what is computed, so its results must still be the plain run's bytes.
"""

import math
import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import metric_records, run_smoke, shared_reference_run, smoke_cmd, smoke_data_flag
from conftest import smoke_env
from conftest import smoke_runs

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
STUDENT_STEPS = 12  # smoke: 2 epochs x 6 batches of 32
EVERY_STEP = ("--config.checkpoint_every=1",)


def _run(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  return run_smoke(workdir, 1, *flags, timeout=TIMEOUT_S)


def _steps(stage_dir: pathlib.Path) -> list[int]:
  """Finished checkpoint steps of a stage (Orbax renames a step dir when it is complete)."""
  steps = stage_dir / "steps"
  return sorted(int(p.name) for p in steps.iterdir() if p.name.isdigit()) if steps.is_dir() else []


def _is_complete(stage_dir: pathlib.Path) -> bool:
  return (stage_dir / "final" / "0").is_dir()


def _truncate_data_files(step_dir: pathlib.Path) -> int:
  """Cuts every OCDBT data file (in a ``d/`` directory) of a step to half its size."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)
  return len(files)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run; every test here compares with it."""
  return shared_reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def data_flag(tmp_path_factory):
  """The reference's dataset flag (its npz file)."""
  return smoke_data_flag(tmp_path_factory)


# lr 1e30 after a 6-step linear warm-up from 0: step 1 makes no change, the update of
# step 2 blows the parameters up, and the loss of step 3 is NaN.
NON_FINITE = (
    "--config.teacher.learning_rate=1e30",
    "--config.teacher.warmup_fraction=0.5",
    "--config.checkpoint_every=1",
    "--config.log_every=1",
)


@pytest.fixture(scope="module")
def non_finite_run(tmp_path_factory):
  """(workdir, CompletedProcess) of the run with the non-finite loss (it compiles its own
  teacher step: the learning rate is part of it)."""
  workdir = tmp_path_factory.mktemp("non_finite")
  (out,) = smoke_runs(tmp_path_factory, [(workdir, 1, NON_FINITE)])
  return workdir, out


def test_sigkill_mid_student_stage_then_rerun_equals_uninterrupted(reference, data_flag, tmp_path):
  log = tmp_path / "killed.log"
  workdir = tmp_path / "run"
  with open(log, "w") as f:
    proc = subprocess.Popen(
        smoke_cmd(workdir, data_flag, *EVERY_STEP),
        cwd=REPO,
        env=smoke_env(1),
        stdout=f,
        stderr=subprocess.STDOUT,
    )
    try:
      deadline = time.monotonic() + TIMEOUT_S
      stage = None
      while stage is None:  # wait for two finished checkpoints of the first student stage
        assert proc.poll() is None, "finished before a student checkpoint:\n" + log.read_text()
        assert time.monotonic() < deadline
        stages = sorted((workdir / "ckpt").glob("student_1_*"))
        if stages and len(_steps(stages[0])) >= 2:
          stage = stages[0]
        else:
          time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not _is_complete(stage), "killed too late: the stage had finished"
  assert _is_complete(workdir / "ckpt" / "teacher")
  assert not (workdir / "results.json").exists()

  # Corrupt the newest checkpoint: the rerun must report it and use the previous one.
  *_, previous, newest = _steps(stage)
  assert _truncate_data_files(stage / "steps" / str(newest)) > 0

  # The same command again, at the default checkpoint cadence: how often a run saves is in
  # no stage's fingerprint, so the finished teacher and the killed stage are picked up.
  out = _run(workdir, data_flag)
  assert out.returncode == 0, out.stderr[-5000:]
  err = out.stderr
  assert "stage teacher: already complete, not retrained" in err
  assert re.search(
      rf"W.*Checkpoint step {newest} in \S*{stage.name}/steps is unreadable, "
      "falling back to the previous step",
      err,
  ), err[-5000:]
  assert f"stage {stage.name}: resuming from step {previous} of {STUDENT_STEPS}" in err, err[-5000:]
  assert [p.name.split("-")[0] for p in (stage / "corrupted").iterdir()] == [str(newest)]
  assert (workdir / "results.json").read_bytes() == (reference / "results.json").read_bytes()
  # Every logged loss, accuracy and gradient norm equals the uninterrupted run's: the stages
  # only the rerun trained record for record; the teacher, which the killed run logged at every
  # step (a run logs at each checkpoint), as the float32 mean of each of the reference's
  # logging windows (how the trainer averages a window).
  want, got = metric_records(reference), metric_records(workdir)
  teacher = [r for r in got if r["stage"] == "teacher"]
  assert [r["step"] for r in teacher] == list(range(1, len(teacher) + 1))
  start = 0
  for record in (r for r in want if r["stage"] == "teacher"):
    window, start = teacher[start : record["step"]], record["step"]
    for key in set(record) - {"stage", "step"}:
      assert record[key] == float(np.mean(np.float32([r[key] for r in window]))), (record, key)
  others = ("teacher", stage.name)
  assert [r for r in got if r["stage"] not in others] == [
      r for r in want if r["stage"] not in others
  ]
  assert {r["stage"] for r in want} - set(others)


def test_non_finite_loss_stops_names_stage_and_steps_keeps_last_good_checkpoint(non_finite_run):
  workdir, out = non_finite_run  # NON_FINITE
  assert out.returncode == 3, out.stderr[-5000:]
  assert "Traceback" not in out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-5000:]
  m = re.fullmatch(
      r"error: stage teacher: non-finite loss or gradient between steps (\d+) and "
      r"(\d+) \(metrics .*\); the last good checkpoint \(step (\d+)\) is kept\. "
      r"Lower the learning rate or check the input data\.",
      errors[0],
  )
  assert m, errors[0]
  good, bad, kept = map(int, m.groups())
  assert 0 < good == kept < bad
  teacher = workdir / "ckpt" / "teacher"
  assert _steps(teacher)[-1] == good and not _is_complete(teacher)
  records = metric_records(workdir)
  assert records[-1]["step"] == good
  assert all(math.isfinite(v) for r in records for k, v in r.items() if k != "stage")
  assert not (workdir / "results.json").exists()
