"""Shared test settings: a persistent XLA compilation cache for this process and
every subprocess a test starts (the suite compiles the same small models often), and
XLA's CPU backend set to compile fast: optimisation level 0 and the older (non-MLIR)
fusion emitters.

The suite's programs are tiny (a 16x16 smoke job, scans of a few tokens): most of its time
is compiling them, and LLVM's optimisation passes are most of a compile (measured: the
scan, layer, Pallas, FLOPs and train tests took 238 s of CPU cold at the default level,
133 s at level 0). The older fusion emitters halve the rest (tests/test_scan.py, cold,
one process: 34.0 s of XLA backend compile for 201 programs with XLA's default emitters,
16.5 s with ``--xla_cpu_use_fusion_emitters=false``; the whole suite from a clean clone,
cold, side by side within the hour: 239 s and 431 s of user CPU, against 314 s and 574 s
with the default emitters) while running the fused scan 2-4x slower, which the suite's
small programs do not notice and a training run would: these settings are for the tests
only. They change how XLA's kernels are generated, not what they compute: every
numerical test compares with an independent reference within its tolerance, and runs are
compared with runs of the same suite.
``MAMBA_PKD_TEST_XLA_OPT=default`` runs the suite with XLA's defaults (what a user's run
compiles with).
"""

import functools
import os
import pathlib
import sys
import tempfile

_CACHE = pathlib.Path(
    os.environ.get(
        "MAMBA_PKD_TEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "mamba_pkd_jax_cache"
    )
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Two test workers (pytest-xdist, setup.cfg) and their subprocesses share an accelerator
# where there is one: none may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# NumPy's BLAS on one thread: the workers and their subprocesses already keep every core
# busy, and OpenBLAS threads spinning beside XLA's made a 0.04 s scikit-learn fit take 1.2 s.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
# (flag, jaxlib versions known to accept it): XLA aborts a process on an unknown flag, so
# on another jaxlib the flag is tried once in a subprocess (~1.5 s) before it is added; the
# result travels to the xdist workers and every subprocess in XLA_FLAGS.
_FAST_COMPILE_FLAGS = (
    ("--xla_backend_optimization_level=0", None),  # None: every supported jaxlib
    ("--xla_cpu_use_fusion_emitters=false", ("0.10.",)),
)


def _jaxlib_version() -> str:
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def _xla_accepts(flag: str) -> bool:
  """Whether a process with ``flag`` in XLA_FLAGS starts JAX's CPU backend."""
  import subprocess  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


if os.environ.get("MAMBA_PKD_TEST_XLA_OPT", "0") != "default":
  for _flag, _versions in _FAST_COMPILE_FLAGS:
    _name, _current = _flag.split("=")[0], os.environ.get("XLA_FLAGS", "")
    _rejected = os.environ.get("MAMBA_PKD_TEST_XLA_REJECTED", "").split()
    if _name in _current or _name in _rejected:
      continue
    _known = _versions is None or _jaxlib_version().startswith(_versions)
    if not _known and not _xla_accepts(_flag):
      os.environ["MAMBA_PKD_TEST_XLA_REJECTED"] = " ".join(_rejected + [_name])
      continue
    os.environ["XLA_FLAGS"] = f"{_current} {_flag}".strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def _cpu_env_without(prefixes: tuple[str, ...]) -> dict:
  """This process's environment, CPU only, without the XLA flags starting with ``prefixes``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(prefixes)
  )
  return env


def user_xla_env() -> dict:
  """Environment for a subprocess without the suite's fast-compile XLA flags
  (:data:`_FAST_COMPILE_FLAGS`): it compiles as a user's run does."""
  return _cpu_env_without(tuple(flag.split("=")[0] for flag, _ in _FAST_COMPILE_FLAGS))


def smoke_env(devices: int = 1) -> dict:
  """Environment for a subprocess of `main`: CPU only, exactly ``devices`` host devices."""
  flag = "--xla_force_host_platform_device_count"
  env = _cpu_env_without((flag,))
  env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {flag}={devices}".strip()
  return env


def smoke_cmd(workdir: pathlib.Path, *flags: str) -> list[str]:
  """`python -m mamba_pkd.main` on configs/smoke.py with ``workdir`` and extra flags."""
  return [
      sys.executable,
      "-m",
      "mamba_pkd.main",
      "--config=configs/smoke.py",
      f"--workdir={workdir}",
      *flags,
  ]


def shared_dir(tmp_path_factory) -> pathlib.Path:
  """A directory shared by every process of this test session.

  Under pytest-xdist each worker has its own base temporary directory
  (``.../pytest-N/popen-gwK``); their parent is the session's. Without xdist, the base.
  Files made here once per session (:func:`smoke_data`, :func:`shared_reference_run`) are
  made under a :class:`FileLock`.
  """
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class FileLock:
  """An exclusive lock on a file (created if missing), across processes (``flock``)."""

  def __init__(self, path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(path, "a")  # pylint: disable=consider-using-with

  def acquire(self, blocking: bool = True) -> bool:
    """Takes the lock; False at once if ``blocking=False`` and another process holds it."""
    import fcntl  # pylint: disable=g-import-not-at-top

    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      return False
    return True

  def release(self) -> None:
    self._file.close()  # closing the file drops the lock

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def smoke_data(tmp_path_factory) -> pathlib.Path:
  """configs/smoke.py's synthetic arrays saved as an npz file, once per test session.

  A run on ``npz:<this file>`` computes exactly what the synthetic run computes (same
  arrays, same split, same normalisation); only the dataset's name differs (in
  results.json's meta and results.md). Runs that are compared with the shared
  reference run pass :func:`smoke_data_flag` too.
  """
  import runpy  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from mamba_pkd import data  # pylint: disable=g-import-not-at-top

  path = shared_dir(tmp_path_factory) / "smoke_data" / "smoke.npz"
  with FileLock(path.with_suffix(".lock")):
    if not path.is_file():
      config = runpy.run_path(str(REPO / "configs" / "smoke.py"))["get_config"]()
      ds = data.load_dataset(config.dataset, seed=config.seed)
      tmp = path.with_suffix(".tmp.npz")
      np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
      tmp.rename(path)
  return path


def smoke_data_flag(tmp_path_factory) -> str:
  """The flag that runs the smoke job on :func:`smoke_data`."""
  return f"--config.dataset=npz:{smoke_data(tmp_path_factory)}"


def run_smoke(workdir: pathlib.Path, devices: int = 1, *flags: str, timeout: int = 900):
  """`main` on configs/smoke.py in a subprocess (``devices`` CPU devices); its CompletedProcess."""
  import subprocess  # pylint: disable=g-import-not-at-top

  return subprocess.run(
      smoke_cmd(workdir, *flags),
      cwd=REPO,
      env=smoke_env(devices),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def smoke_runs(tmp_path_factory, jobs=(), parallel: int | None = None) -> list:
  """Runs smoke jobs ``(workdir, devices, flags)`` side by side, ``parallel`` at a time
  (default: $MAMBA_PKD_TEST_JOBS, else 2: the machine has 2 cores; 1 runs them one after
  the other), together with the shared reference run if it is not made yet. Returns the
  jobs' CompletedProcess, in order.

  Run side by side only jobs that compile different programs (other device counts, other
  settings): two jobs of the same programs would both compile them instead of the second
  reading the first's entries in the XLA compilation cache.

  Under pytest-xdist the reference run is made by the first worker that asks for it; a
  worker that finds it in the making runs its own jobs first, then waits for it.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  if parallel is None:
    parallel = int(os.environ.get("MAMBA_PKD_TEST_JOBS", "2"))
  reference = _reference_dir(tmp_path_factory)
  todo = [(pathlib.Path(w), d, tuple(f)) for w, d, f in jobs]
  lock = FileLock(reference.with_suffix(".lock"))
  mine = lock.acquire(blocking=False)
  make_reference = mine and not (reference / "results.json").is_file()
  if mine and not make_reference:
    lock.release()
  if make_reference:  # first in the pool; the lock is held until it is made
    todo.insert(0, (reference, 1, (smoke_data_flag(tmp_path_factory),)))
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    futures = [pool.submit(run_smoke, w, d, *f) for w, d, f in todo]
    if make_reference:
      try:
        _keep_reference(reference, futures.pop(0).result())
      finally:
        lock.release()
    outs = [f.result() for f in futures]
  if not mine:  # another worker was making it
    with FileLock(reference.with_suffix(".lock")):
      if not (reference / "results.json").is_file():  # it failed there: make it here
        _keep_reference(reference, run_smoke(reference, 1, smoke_data_flag(tmp_path_factory)))
  return outs


def _reference_dir(tmp_path_factory) -> pathlib.Path:
  return shared_dir(tmp_path_factory) / "smoke_reference_1_device"


def _keep_reference(reference: pathlib.Path, out) -> None:
  """Checks the reference run's process and keeps its output beside the workdir."""
  assert out.returncode == 0, out.stderr[-5000:]
  assert "1 local cpu device(s), process 0 of 1" in out.stderr  # forcing worked
  for name, text in (("stdout", out.stdout), ("stderr", out.stderr)):
    reference.with_name(f"{reference.name}.{name}").write_text(text)


def shared_reference_run(tmp_path_factory) -> pathlib.Path:
  """The smoke run on 1 device and :func:`smoke_data`, made once per test session and only
  read after (a test that changes a run copies it first, ``shutil.copytree``).

  Its stdout and stderr are kept beside it (:func:`reference_output`). Used by
  tests/test_pkd.py (report, manifest, export), tests/test_workdir_lock.py (its command
  again on a copy: every stage restored, the same report bytes), tests/test_resume.py,
  tests/test_changed_config.py, tests/test_cnn_mlp.py and tests/test_multihost.py as their
  common reference, and by tests/test_notebooks.py for its compiled programs;
  :func:`smoke_runs` makes it side by side with other runs.
  """
  smoke_runs(tmp_path_factory)
  return _reference_dir(tmp_path_factory)


def reference_output(workdir: pathlib.Path) -> tuple[str, str]:
  """(stdout, stderr) of the shared reference run in ``workdir``."""
  return tuple(workdir.with_name(f"{workdir.name}.{n}").read_text() for n in ("stdout", "stderr"))


def metric_records(workdir: pathlib.Path) -> list[dict]:
  """A run's metrics.jsonl without the timing field (steps/s is not deterministic)."""
  import json  # pylint: disable=g-import-not-at-top

  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k != "steps_per_sec"} for l in lines]


def small_dataset(n_train=50, n_test=23, shape=(6, 5, 2), num_classes=4, seed=0):
  """Random uint8 images with random labels, through the public constructor.

  Used by tests/test_batches.py and tests/test_augment.py.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mamba_pkd import data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  return data.create_dataset(
      "test",
      rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
      rng.integers(0, num_classes, n_train),
      rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
      rng.integers(0, num_classes, n_test),
      num_classes,
  )


def jit_apply(config):
  """``models.create_model(config).apply`` as one jitted program, made once per config.

  For hand-written references: applied eagerly, every op of the model is an XLA program of
  its own, compiled the first time its shapes are seen (~1 s of CPU for a tiny model).
  """
  return _jit_apply(config)


def _jit_apply_uncached(config):
  import jax  # pylint: disable=g-import-not-at-top

  from mamba_pkd import models  # pylint: disable=g-import-not-at-top

  return jax.jit(models.create_model(config).apply, static_argnames=("return_features",))


_jit_apply = functools.lru_cache(maxsize=None)(_jit_apply_uncached)


def flat(batch):
  """[D, b, ...] -> [D * b, ...] for every key of a batch."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


# Test modules that start `main` in subprocesses (tens of seconds each), most expensive
# first: the two pytest-xdist workers (setup.cfg, `--dist loadfile --no-loadscope-reorder`)
# take modules in this order, so the long ones start early instead of finishing last.
# test_scan (in-process, compile-bound) comes second: the second worker runs it while the
# first makes the shared reference run, which test_notebooks and the others after it wait
# for (their stages then read its programs from the compilation cache).
HEAVY_MODULES_FIRST = (
    "test_multihost.py",
    "test_scan.py",
    "test_notebooks.py",
    "test_pkd.py",
    "test_resume.py",
    "test_changed_config.py",
    "test_workdir_lock.py",
    "test_edge.py",
    "test_export.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items):
  """Puts :data:`HEAVY_MODULES_FIRST` first, keeping every module's own test order."""
  rank = {name: i for i, name in enumerate(HEAVY_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
