"""Scaling out: 1, 2 and 4 devices, and two processes through `jax.distributed`.

Every run is the real entry point, ``python -m mamba_pkd.main
--config=configs/smoke.py``, in a subprocess, on the smoke arrays saved as an
npz file (conftest's ``smoke_data``; the 1-device run is conftest's shared
reference run); the global batch is the same in all of them (32), so the runs
must agree:

* 2 devices in one process and 2 processes with 1 device each give the SAME
  ``results.json`` bytes: the only difference is who averages the gradients,
  and the mean of two float32 numbers does not depend on the order.
* 1, 2 and 4 devices agree to ``RTOL`` (relative, on every float of
  ``results.json``; accuracies and every decision exactly): ``pmean`` over
  more devices sums the per-device gradient means in another order, which
  changes float32 rounding (measured: <= 2e-5 relative after a smoke run).
  The 4-device run stops after student 1 and trains no baselines
  (``FOUR_DEVICE_FLAGS``: 4 host devices on 2 cores are the suite's slowest run):
  its teacher and student 1 (every logged metric, their report rows and the
  decision that accepted student 1) must agree with the 1-device run's.

The two-process run starts from a copy of the 2-device run's workdir with its last stage
removed (trained again from a fresh init, across both processes) and the stage before it cut
back to an earlier checkpoint (as if both processes had been killed after that step): every
process restores the stages before, resumes the cut one from that step and trains the last,
and the run must write the 2-device run's ``results.json`` bytes and metrics. (One
two-process run instead of a fresh one plus a resumed one: each process compiles every
program it runs, and the teacher's are the costliest.)
"""

import json
import math
import pathlib
import re
import shutil
import socket
import subprocess

import pytest

from conftest import metric_records, shared_reference_run, smoke_cmd, smoke_data_flag, smoke_env
from conftest import smoke_runs

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-4  # floats in results.json, 1 vs 2 vs 4 devices (see the module docstring)
TIMEOUT_S = 900
_NUMBER = re.compile(r"-?\d+\.\d+")
FOUR_DEVICE_FLAGS = ("--config.pkd.max_students=1", "--config.baselines=False")
FOUR_DEVICE_ROWS = ("teacher", "student_1", "prefix_1..1", "pixel_baseline")


def _check_single_process_run(out: subprocess.CompletedProcess, devices: int) -> None:
  assert out.returncode == 0, out.stderr[-5000:]
  assert f"{devices} local cpu device(s), process 0 of 1" in out.stderr  # forcing worked


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_process_run(workdir: pathlib.Path, logs: pathlib.Path, data_flag: str) -> list[str]:
  """Starts processes 0 and 1 of one run; returns their logs (stdout + stderr)."""
  port = _free_port()
  procs, files = [], []
  try:
    for i in range(2):
      files.append(open(logs / f"process_{i}.log", "w"))
      procs.append(
          subprocess.Popen(
              smoke_cmd(
                  workdir,
                  data_flag,
                  f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2",
                  f"--process_id={i}",
              ),
              cwd=REPO,
              env=smoke_env(1),
              stdout=files[-1],
              stderr=subprocess.STDOUT,
          )
      )
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  texts = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  for i, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{text[-5000:]}"
  return texts


def _results(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "results.json").read_text())


def assert_results_close(got, want, rtol: float = RTOL, where: str = "results") -> None:
  """Same structure; floats to ``rtol``; ints, bools, None and strings exactly,
  except numbers printed inside strings (to 4 decimals), which may differ by 1e-4."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and sorted(got) == sorted(want), (where, got, want)
    for key in want:
      assert_results_close(got[key], want[key], rtol, f"{where}.{key}")
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (where, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      assert_results_close(g, w, rtol, f"{where}[{i}]")
  elif isinstance(want, float) and not isinstance(got, bool):
    assert isinstance(got, (int, float)), (where, got, want)
    assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-7), (where, got, want)
  elif isinstance(want, str):
    assert isinstance(got, str), (where, got, want)
    assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), (where, got, want)
    for g, w in zip(_NUMBER.findall(got), _NUMBER.findall(want)):
      assert abs(float(g) - float(w)) <= 1.01e-4, (where, got, want)
  else:
    assert got == want and type(got) is type(want), (where, got, want)


def _stage_names(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "ckpt").iterdir())


# -- the runs, each made once per module ------------------------------------


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory) -> dict[int, pathlib.Path]:
  """Workdirs of the runs on 1, 2 and 4 devices in one process, made side by side (each
  compiles its own programs: the device count is part of them)."""
  workdirs = {n: tmp_path_factory.mktemp(f"{n}_devices") for n in (2, 4)}
  flag = smoke_data_flag(tmp_path_factory)
  extra = {2: (), 4: FOUR_DEVICE_FLAGS}
  outs = smoke_runs(tmp_path_factory, [(workdirs[n], n, (flag, *extra[n])) for n in (2, 4)])
  for n, out in zip((2, 4), outs):
    _check_single_process_run(out, n)
  return {1: shared_reference_run(tmp_path_factory), **workdirs}


@pytest.fixture(scope="module")
def one_device(single_process_runs):
  return single_process_runs[1]


@pytest.fixture(scope="module")
def two_devices(single_process_runs):
  return single_process_runs[2]


@pytest.fixture(scope="module")
def two_processes(single_process_runs, tmp_path_factory):
  """(workdir, logs, (complete, resumed, retrained, previous, total)) of the two-process run
  over a copy of the 2-device workdir: the last stage trained removed, the one before cut
  back to its second newest checkpoint step, their metrics records and the report removed."""
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  shutil.copytree(single_process_runs[2], workdir)
  records = (workdir / "metrics.jsonl").read_text().splitlines()
  order = list(dict.fromkeys(json.loads(r)["stage"] for r in records))  # in training order
  *complete, resumed, retrained = order
  shutil.rmtree(workdir / "ckpt" / retrained)
  cut = workdir / "ckpt" / resumed
  *_, previous, total = sorted(int(p.name) for p in (cut / "steps").iterdir() if p.name.isdigit())
  shutil.rmtree(cut / "final")  # as if both processes were killed after step `previous`
  shutil.rmtree(cut / "steps" / str(total))
  kept = [
      r
      for r in records
      if json.loads(r)["stage"] in complete
      or (json.loads(r)["stage"] == resumed and json.loads(r)["step"] <= previous)
  ]
  (workdir / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
  for name in ("results.json", "results.md", "predictions.npz"):
    (workdir / name).unlink()
  logs = _two_process_run(
      workdir, tmp_path_factory.mktemp("two_processes_logs"), smoke_data_flag(tmp_path_factory)
  )
  return workdir, logs, (complete, resumed, retrained, previous, total)


# -- tests ------------------------------------------------------------------------


def test_assert_results_close_can_fail():
  want = {"a": [0.5, {"b": 1}], "s": "fit 0.0160 -> 0.0096", "ok": True}
  assert_results_close(json.loads(json.dumps(want)), want)
  for bad in (
      {"a": [0.5001, {"b": 1}], "s": want["s"], "ok": True},
      {"a": [0.5, {"b": 2}], "s": want["s"], "ok": True},
      {"a": [0.5, {"b": 1}], "s": "fit 0.0160 -> 0.0098", "ok": True},
      {"a": [0.5, {"b": 1}], "s": want["s"], "ok": False},
  ):
    with pytest.raises(AssertionError):
      assert_results_close(bad, want)


def test_one_two_and_four_devices_give_the_same_results(single_process_runs):
  one_device, two_devices, four_devices = (single_process_runs[n] for n in (1, 2, 4))
  want = _results(one_device)
  assert want["meta"]["decisions"] and len(want["rows"]) >= 3
  assert_results_close(_results(two_devices), want)
  assert _stage_names(two_devices) == _stage_names(one_device)
  # 4 devices: the teacher and student 1 (FOUR_DEVICE_FLAGS stops the run there).
  four = _results(four_devices)
  rows = {r["name"]: r for r in four["rows"]}
  want_rows = {r["name"]: r for r in want["rows"]}
  for name in FOUR_DEVICE_ROWS:
    assert_results_close(rows[name], want_rows[name], where=name)
  assert_results_close(four["meta"]["decisions"][0], want["meta"]["decisions"][0])
  assert four["meta"]["decisions"][0]["accepted"]
  stages = _stage_names(four_devices)
  assert stages == ["student_1_s1_try1", "teacher"]
  got_metrics = metric_records(four_devices)
  want_metrics = [r for r in metric_records(one_device) if r["stage"] in stages]
  assert {r["stage"] for r in got_metrics} == set(stages)
  assert_results_close(got_metrics, want_metrics, where="metrics")


@pytest.mark.slow  # two processes that each compile what they run: a minute on 2 cores
def test_two_processes_equal_one_process_and_only_process_0_writes(
    two_processes, one_device, two_devices
):
  workdir, logs, (_, resumed, retrained, _, _) = two_processes
  for i, log in enumerate(logs):
    assert f"process {i} of 2, 2 global" in log, log[-3000:]
    assert "| teacher |" in log  # every process prints the table
  # Same global batch of 32 split 16 + 16: bit-identical to 2 devices in one process.
  assert (workdir / "results.json").read_bytes() == (two_devices / "results.json").read_bytes()
  assert_results_close(_results(workdir), _results(one_device))
  # Only process 0 wrote: checkpoints, metrics (each record once), report.
  assert "Saved step" in logs[0] and "Saved step" not in logs[1]
  assert "report written" in logs[0] and "report written" not in logs[1]
  assert metric_records(workdir) == metric_records(two_devices)  # every record, once, in order
  assert {r["stage"] for r in metric_records(workdir)} >= {resumed, retrained}
  assert not [p for p in workdir.rglob("*") if "process_1" in p.name]
  assert _stage_names(workdir) == _stage_names(two_devices)


@pytest.mark.slow  # shares the run above
def test_two_processes_restore_resume_and_retrain_stages(two_processes):
  _, logs, (complete, resumed, retrained, previous, total) = two_processes
  assert complete and "teacher" in complete
  for log in logs:
    for stage in complete:
      assert f"stage {stage}: already complete, not retrained" in log, log[-3000:]
    assert f"stage {resumed}: resuming from step {previous} of {total}" in log, log[-3000:]
    assert f"stage {retrained}: " in log and f"stage {retrained}: already complete" not in log
    assert f"stage {retrained}: resuming" not in log
