"""Bad inputs, tried the way a new user would: a bad flag, file or workdir.

Every case must be refused before the run trains or predicts anything (probes
stand in for ``train.train_stage`` and ``evaluate.predict_dataset``, the first
expensive calls of a run, and record any call; none may happen), with an error
that names the bad value and what would be valid, leaving the files already in
the workdir byte-for-byte as they were.

Every case is checked in-process: ``pkd.train_and_evaluate`` on the config that
``main`` would parse from the same flags (absl + ``config_flags``), which must
raise ``ValueError`` or ``FileNotFoundError`` (the two that ``main`` turns into
exit code 2). A few cases (``CLI_CASES``: one per kind of check) also run
through ``python -m mamba_pkd.main``, for the command-line contract: exit code
2, exactly one ``error: ...`` line on stderr, no traceback, nothing on stdout,
and nothing compiled by XLA before the error (``JAX_LOG_COMPILES=1`` makes JAX
log every compilation as ``Compiling ...``; none may appear). The table of
cases and messages is in ``docs/scale_and_faults.md``; ``pytest -s`` prints it
(wall times of the command-line cases are printed, not asserted: they depend on
the machine's load).
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import smoke_env

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE_EXIT = 97  # exit code of a run stopped by a probe
CONTROL = "control: a valid run"
# The first expensive calls of a run: (module of mamba_pkd, function) replaced by probes.
PROBES = (("train", "train_stage"), ("evaluate", "predict_dataset"))
# `python -m mamba_pkd.main`, with the PROBES replaced: a call appends its name to the file
# $MAMBA_PKD_PROBE_EVENTS and ends the process.
PROBED_MAIN = f"""
import importlib, os, runpy, sys


def record(event):
  with open(os.environ["MAMBA_PKD_PROBE_EVENTS"], "a") as f:
    f.write(event + "\\n")


def probe(name):
  def refuse(*args, **kwargs):
    record(name)
    raise SystemExit({PROBE_EXIT})

  return refuse


for module, name in {PROBES!r}:
  module = importlib.import_module("mamba_pkd." + module)
  assert callable(getattr(module, name)), (module, name)  # a renamed function fails here
  setattr(module, name, probe(name))
record("probes installed")
sys.argv[0] = "mamba_pkd.main"
runpy.run_module("mamba_pkd.main", run_name="__main__", alter_sys=True)
"""


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad run: flag overrides, and what its error message must contain."""

  name: str
  flags: tuple[str, ...]
  expect: tuple[str, ...]
  devices: int = 1
  workdir: str | None = None  # None: a fresh workdir with a sentinel and a results.json


CASE_NAMES = (
    "unknown dataset name",
    "unknown model size in pkd.ladder",
    "alpha above 1",
    "temperature 0",
    "empty ladder",
    "max_students=0",
    "workdir not writable",
    "npz: x_test image size differs",
    "npz: label count differs",
    "npz: label out of range",
    "npz: NaN pixel",
    "npz: missing key",
    "TFDS dataset not downloadable (offline)",
    "batch size not divisible by 4 devices",
    "eval batch not divisible by 4 devices",
)
# Also run through `python -m mamba_pkd.main`: one case per kind of check (settings, dataset
# name, workdir, TFDS with its remedy lines, device count; the npz files are read by the
# same loader as the dataset name, the other settings by the same validation).
CLI_CASES = (
    "alpha above 1",
    "unknown dataset name",
    "workdir not writable",
    "TFDS dataset not downloadable (offline)",
    "batch size not divisible by 4 devices",
)


def _write_npz_files(root: pathlib.Path) -> dict[str, str]:
  """Small npz datasets, each broken in one way (8x8 grey images, 3 classes)."""
  rng = np.random.default_rng(0)

  def arrays():
    return dict(
        x_train=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
        y_train=np.arange(64) % 3,
        x_test=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
        y_test=np.arange(16) % 3,
    )

  broken = {}
  a = arrays()
  a["x_test"] = a["x_test"][:, :4]  # [16, 4, 8, 1]: other image size than x_train
  broken["shape"] = a
  a = arrays()
  a["y_train"] = a["y_train"][:50]  # 50 labels for 64 images
  broken["count"] = a
  a = arrays()
  a["num_classes"] = np.int64(3)
  a["y_test"][3] = 7  # label 7 with 3 classes
  broken["labels"] = a
  a = arrays()
  x = a["x_train"].astype(np.float32)
  x[5, 2, 3, 0] = np.nan
  a["x_train"] = x
  broken["nan"] = a
  a = arrays()
  del a["y_test"]
  broken["missing"] = a
  paths = {}
  for name, a in broken.items():
    paths[name] = str(root / f"{name}.npz")
    np.savez(paths[name], **a)
  return paths


def _cases(root: pathlib.Path) -> list[Case]:
  npz = _write_npz_files(root)
  empty_tfds = root / "empty_tfds_dir"
  empty_tfds.mkdir()
  if os.geteuid() == 0:  # root ignores permission bits: use a path below a regular file
    (root / "a_file").write_text("not a directory\n")
    unwritable = str(root / "a_file" / "run")
  else:
    unwritable = None  # made read-only by _prepare_workdir
  return [
      Case(
          "unknown dataset name",
          ("--config.dataset=mnistt",),
          ("unknown dataset name 'mnistt'", "'mnist5k'", "'npz:/path/file.npz'"),
      ),
      Case(
          "unknown model size in pkd.ladder",
          ("--config.pkd.ladder=('s1','s9')",),
          ("unknown size(s) ['s9']", "valid sizes of ladder 'tiny'", "'s4'"),
      ),
      Case("alpha above 1", ("--config.pkd.alpha=1.5",), ("pkd.alpha", "[0, 1]", "1.5")),
      Case("temperature 0", ("--config.pkd.temperature=0",), ("pkd.temperature", "> 0", "0.0")),
      Case("empty ladder", ("--config.pkd.ladder=()",), ("pkd.ladder is empty", "'s1'")),
      Case(
          "max_students=0", ("--config.pkd.max_students=0",), ("pkd.max_students", ">= 1", "got 0")
      ),
      Case(
          "workdir not writable", (), ("workdir", "not writable", "--workdir"), workdir=unwritable
      ),
      Case(
          "npz: x_test image size differs",
          (f"--config.dataset=npz:{npz['shape']}",),
          ("x_train images are (8, 8, 1)", "x_test images are (4, 8, 1)"),
      ),
      Case(
          "npz: label count differs",
          (f"--config.dataset=npz:{npz['count']}",),
          ("y_train has 50 labels", "x_train has 64 images"),
      ),
      Case(
          "npz: label out of range",
          (f"--config.dataset=npz:{npz['labels']}",),
          ("y_test has label 7", "num_classes=3", "[0, num_classes)"),
      ),
      Case(
          "npz: NaN pixel",
          (f"--config.dataset=npz:{npz['nan']}",),
          ("x_train has 1 NaN or Inf pixel",),
      ),
      Case(
          "npz: missing key",
          (f"--config.dataset=npz:{npz['missing']}",),
          ("missing key(s) ['y_test']", "['x_train', 'y_train', 'x_test', 'y_test']"),
      ),
      Case(
          "TFDS dataset not downloadable (offline)",
          ("--config.dataset=mnist", f"--config.data_dir={empty_tfds}"),
          ("TFDS dataset 'mnist'", f"data_dir='{empty_tfds}'", "'mnist5k'"),
      ),
      Case(
          "batch size not divisible by 4 devices",
          ("--config.teacher.batch_size=30",),
          ("teacher.batch_size=30", "number of devices (4", "multiple of 4"),
          devices=4,
      ),
      Case(
          "eval batch not divisible by 4 devices",
          ("--config.eval_batch_size=66",),
          ("eval_batch_size=66", "number of devices (4", "multiple of 4"),
          devices=4,
      ),
  ]


def _prepare_workdir(case: Case, root: pathlib.Path) -> pathlib.Path:
  if case.workdir is not None:
    return pathlib.Path(case.workdir)
  workdir = root / ("wd_" + "".join(c if c.isalnum() else "_" for c in case.name))
  workdir.mkdir()
  (workdir / "sentinel.txt").write_text("a file the user already had\n")
  (workdir / "results.json").write_text('{"rows": [], "meta": {"from": "an earlier run"}}\n')
  if case.name == "workdir not writable":
    workdir.chmod(0o555)
  return workdir


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  if not workdir.is_dir():
    return {}
  return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def _run_case(
    case: Case, workdir: pathlib.Path, events: pathlib.Path
) -> tuple[subprocess.CompletedProcess, float, list[str]]:
  """Runs the probed main; returns its output, wall time and the probes' events."""
  env = dict(smoke_env(case.devices), JAX_LOG_COMPILES="1")
  env["MAMBA_PKD_PROBE_EVENTS"] = str(events)
  # main.run restarts the process once (glibc's malloc tunable, tests/test_main_malloc.py);
  # here that would run the probing wrapper, and log its installation, twice.
  env["MAMBA_PKD_MALLOC_REEXEC"] = "0"
  cmd = [
      sys.executable,
      "-c",
      PROBED_MAIN,
      "--config=configs/smoke.py",
      f"--workdir={workdir}",
      *case.flags,
  ]
  start = time.monotonic()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  seconds = time.monotonic() - start
  return out, seconds, events.read_text().splitlines() if events.exists() else []


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Case, pathlib.Path]]:
  """Every case by name, with the root its files and workdirs are made under."""
  root = tmp_path_factory.mktemp("bad_inputs")
  table = _cases(root)
  assert tuple(c.name for c in table) == CASE_NAMES
  return {c.name: (c, root) for c in table}


@pytest.fixture(scope="module")
def outcomes(cases, tmp_path_factory):
  """Runs the CLI_CASES through the CLI (two at a time: the machine has 2 cores)."""
  root = tmp_path_factory.mktemp("bad_inputs_cli")
  prepared = [(case, _prepare_workdir(case, root)) for case, _ in map(cases.get, CLI_CASES)]
  before = {case.name: _snapshot(wd) for case, wd in prepared}
  events = root / "probe_events"
  events.mkdir()
  jobs = [(case, wd, events / f"case_{i}.txt") for i, (case, wd) in enumerate(prepared)]
  # The control: a valid run, which must get as far as its first training call.
  jobs.append((Case(CONTROL, (), ()), root / "wd_control", events / "control.txt"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(lambda job: _run_case(*job), jobs))
  table = {}
  for (case, workdir, _), (out, seconds, recorded) in zip(jobs, results):
    table[case.name] = dict(
        case=case,
        out=out,
        seconds=seconds,
        events=recorded,
        before=before.get(case.name),
        after=_snapshot(workdir),
    )
  # The command-line rows of the table of docs/scale_and_faults.md (shown with `pytest -s`;
  # test_bad_input_fails_before_training_and_names_the_value prints the other rows).
  print("\n| case | flags | exit | s | message on stderr |\n|---|---|---:|---:|---|")
  for name in CLI_CASES:
    r = table[name]
    lines = [l for l in r["out"].stderr.splitlines() if l.startswith("error:")]
    line = lines[0] if lines else r["out"].stderr[-300:]
    flags = " ".join(r["case"].flags) or f"--workdir={r['case'].workdir}"
    print(
        f"| {name} | `{flags}` | {r['out'].returncode} | {r['seconds']:.1f} | "
        f"`{line}` |".replace(str(root), "<tmp>").replace(str(cases[name][1]), "<tmp>")
    )
  return table


def _parse_config(case: Case):
  """The config `main` parses from ``--config=configs/smoke.py`` and the case's flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = ["main", f"--config={REPO / 'configs' / 'smoke.py'}", *case.flags]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


@pytest.fixture
def probes(monkeypatch) -> list[str]:
  """The PROBES, in this process: a call records its name and raises ``_Probed``."""
  from mamba_pkd import evaluate, train  # pylint: disable=g-import-not-at-top

  modules = {"train": train, "evaluate": evaluate}
  events = []

  def probe(name):
    def refuse(*args, **kwargs):
      events.append(name)
      raise _Probed(name)

    return refuse

  for module, name in PROBES:
    assert callable(getattr(modules[module], name)), (module, name)
    monkeypatch.setattr(modules[module], name, probe(name))
  return events


class _Probed(Exception):
  """Raised by an in-process probe: the run got as far as a training or prediction call."""


def _devices(monkeypatch, n: int) -> None:
  """``n`` devices, as the batch checks (``parallel.check_batch_divisible``) count them."""
  import jax  # pylint: disable=g-import-not-at-top

  if n != jax.device_count():
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: n)
    monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: n)


def _error_in_process(case: Case, root: pathlib.Path, monkeypatch, probes) -> str:
  """``pkd.train_and_evaluate`` on the case; returns the message of the error it raised."""
  from mamba_pkd import pkd  # pylint: disable=g-import-not-at-top

  workdir = _prepare_workdir(case, root)
  before = _snapshot(workdir)
  _devices(monkeypatch, case.devices)
  with pytest.raises((ValueError, FileNotFoundError)) as error:  # main: exit code 2
    pkd.train_and_evaluate(_parse_config(case), workdir)
  assert probes == [], f"the run got as far as {probes}"
  assert _snapshot(workdir) == before, "files in the workdir changed"
  return str(error.value)


def test_probes_stop_a_valid_run_at_its_first_training_call(outcomes, tmp_path, probes):
  """The control: the probes are installed and do see a run that gets past its checks,
  in a subprocess of `main` and in this process."""
  r = outcomes[CONTROL]
  assert r["out"].returncode == PROBE_EXIT, (r["out"].returncode, r["out"].stderr[-3000:])
  assert r["events"] == ["probes installed", "train_stage"], r["events"]
  from mamba_pkd import pkd  # pylint: disable=g-import-not-at-top

  with pytest.raises(_Probed):
    pkd.train_and_evaluate(_parse_config(Case(CONTROL, (), ())), tmp_path)
  assert probes == ["train_stage"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_fails_before_training_and_names_the_value(
    cases, name, tmp_path, monkeypatch, probes
):
  case, root = cases[name]
  message = _error_in_process(case, tmp_path, monkeypatch, probes)
  for part in case.expect:
    assert part in message, (part, message)
  flags = " ".join(case.flags) or f"--workdir={case.workdir}"
  line = f"error: {message}".splitlines()[0]  # as `main` prints it
  print(
      f"| {name} | `{flags}` | 2 (in-process) | - | `{line}` |".replace(str(root), "<tmp>").replace(
          str(tmp_path), "<tmp>"
      )
  )


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_through_the_cli_is_one_clear_line(outcomes, name):
  r = outcomes[name]
  case, out = r["case"], r["out"]
  stderr = out.stderr
  assert out.returncode == 2, (out.returncode, stderr[-3000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  error_lines = [i for i, line in enumerate(stderr.splitlines()) if line.startswith("error:")]
  assert len(error_lines) == 1, stderr[-3000:]
  # The message: the error line and (TFDS only) the remedy lines printed after it.
  message = "\n".join(stderr.splitlines()[error_lines[0] :])
  for part in case.expect:
    assert part in message, (part, message)
  assert "Compiling " not in stderr, "XLA compiled something before the error:\n" + stderr[-3000:]
  # The behaviour the wall time used to stand for: stopped before any training or prediction.
  assert r["events"] == ["probes installed"], f"the run got as far as {r['events'][1:]}"
  assert r["after"] == r["before"], "files in the workdir changed"
  assert out.stdout == "", out.stdout[-2000:]
