"""Shared test settings: a persistent XLA compilation cache for this process and
every subprocess a test starts (the suite compiles the same small models often)."""

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

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def smoke_env(devices: int = 1) -> dict:
  """Environment for a subprocess of `main`: CPU only, exactly ``devices`` host devices."""
  import os as _os  # pylint: disable=g-import-not-at-top,reimported

  env = dict(_os.environ, JAX_PLATFORMS="cpu")
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
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

  path = tmp_path_factory.getbasetemp() / "smoke_data" / "smoke.npz"
  if not path.is_file():
    config = runpy.run_path(str(REPO / "configs" / "smoke.py"))["get_config"]()
    ds = data.load_dataset(config.dataset, seed=config.seed)
    path.parent.mkdir(exist_ok=True)
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
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  if parallel is None:
    parallel = int(os.environ.get("MAMBA_PKD_TEST_JOBS", "2"))
  reference = tmp_path_factory.getbasetemp() / "smoke_reference_1_device"
  todo = [(pathlib.Path(w), d, tuple(f)) for w, d, f in jobs]
  make_reference = not (reference / "results.json").is_file()
  if make_reference:
    shutil.rmtree(reference, ignore_errors=True)
    todo.insert(0, (reference, 1, (smoke_data_flag(tmp_path_factory),)))
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    outs = list(pool.map(lambda job: run_smoke(job[0], job[1], *job[2]), todo))
  if make_reference:
    out = outs.pop(0)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "1 local cpu device(s), process 0 of 1" in out.stderr  # forcing worked
    for name, text in (("stdout", out.stdout), ("stderr", out.stderr)):
      reference.with_name(f"{reference.name}.{name}").write_text(text)
  return outs


def shared_reference_run(tmp_path_factory) -> pathlib.Path:
  """The smoke run on 1 device and :func:`smoke_data`, made once per test session and only
  read after (a test that changes a run copies it first, ``shutil.copytree``).

  Its stdout and stderr are kept beside it (:func:`reference_output`). Used by
  tests/test_pkd.py (report, manifest, restore, export), tests/test_resume.py and
  tests/test_multihost.py as their common reference; :func:`smoke_runs` makes it side by
  side with other runs.
  """
  smoke_runs(tmp_path_factory)
  return tmp_path_factory.getbasetemp() / "smoke_reference_1_device"


def reference_output(workdir: pathlib.Path) -> tuple[str, str]:
  """(stdout, stderr) of the shared reference run in ``workdir``."""
  return tuple(workdir.with_name(f"{workdir.name}.{n}").read_text() for n in ("stdout", "stderr"))


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


def flat(batch):
  """[D, b, ...] -> [D * b, ...] for every key of a batch."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
