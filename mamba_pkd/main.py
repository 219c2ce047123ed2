r"""Entry point: progressive knowledge distillation into Mamba students.

  python -m mamba_pkd.main --config=configs/default.py --workdir=runs/default
  python -m mamba_pkd.main --config=configs/default.py --workdir=runs/x \
      --config.pkd.max_students=5 --config.student.epochs=20
  python -m mamba_pkd.main --config=configs/default.py --ladder   # print the size ladder

Re-running the same command resumes: finished stages are skipped, an
interrupted stage continues from its latest checkpoint.
"""

from __future__ import annotations

import inspect
import logging as std_logging
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mamba_pkd import provenance
from mamba_pkd import workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_bool("ladder", False, "Print the model ladder (params, FLOPs, % of teacher) and exit.")
flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (enables jax.distributed)."
)
flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_integer(
    "cpu_devices",
    -1,
    "On CPU, split the host's cores into this many XLA devices for the pmap-ed steps "
    "(-1: as many as there are cores, reduced until every batch size divides; 1: one "
    "device). Ignored when XLA_FLAGS already sets xla_force_host_platform_device_count.",
)
flags.DEFINE_bool(
    "distributed_auto", False, "Multi-host: let jax.distributed.initialize() detect the cluster."
)
flags.DEFINE_bool(
    "retrain_changed",
    False,
    "Over an existing --workdir whose stages were trained with a different config: retrain the "
    "changed stages and those after them (default: stop with an error naming the changes).",
)


def ladder_table(config) -> str:
  """Markdown tables of the ladder sizes for the config's dataset shape: the Mamba sizes,
  then the CNN and MLP students matched to their FLOPs (:func:`ladders.family_sizes`).

  Needs only the images' shape and class count (:func:`mamba_pkd.data.dataset_shape`), so it
  works for any ``--config.dataset``, downloaded or not, and any ``--config.model.ladder``
  (``auto`` included).
  """
  from mamba_pkd import data as data_lib  # pylint: disable=g-import-not-at-top
  from mamba_pkd import flops, ladders  # pylint: disable=g-import-not-at-top

  image_shape, num_classes = data_lib.dataset_shape(
      config.dataset, data_dir=config.data_dir or None, seed=config.seed
  )
  sizes = ladders.ladder_configs(
      config.model.ladder,
      image_shape=image_shape,
      num_classes=num_classes,
      bidirectional=config.model.bidirectional,
  )
  teacher_flops = flops.count_flops(sizes["teacher"])
  lines = [
      "| size | d_model | layers | d_state | patch | tokens | params | FLOPs/image | "
      "% teacher |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, c in sizes.items():
    f = flops.count_flops(c)
    lines.append(
        f"| {name} | {c.d_model} | {c.n_layers} | {c.d_state} | {c.patch_size} | "
        f"{c.num_tokens} | "
        f"{flops.count_params(c):,} | {f:,} | {100 * f / teacher_flops:.2f} |"
    )
  lines += [
      "",
      "| family size | layers | params | FLOPs/image | % teacher | / Mamba rung |",
      "|---|---|---:|---:|---:|---:|",
  ]
  for name, c in ladders.family_sizes(sizes).items():
    f, rung = flops.count_flops(c), flops.count_flops(sizes[ladders.split_size_name(name)[1]])
    layers = (
        f"conv{c.kernel}x{c.kernel} {c.channels[0]}, conv {c.channels[1]}, dense {c.hidden}"
        if c.family == "cnn"
        else "dense " + ", ".join(map(str, c.hidden))
    )
    lines.append(
        f"| {name} | {layers} | {flops.count_params(c):,} | {f:,} | "
        f"{100 * f / teacher_flops:.2f} | {f / rung:.3f} |"
    )
  return "\n".join(lines)


def _quiet_library_logs() -> None:
  """Keeps Orbax's INFO chatter out of the progress output (warnings still show)."""

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  logging.get_absl_handler().addFilter(keep)


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/default.py")
  from mamba_pkd import parallel  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  parallel.set_host_device_count(
      FLAGS.cpu_devices,
      batch_sizes=(config.teacher.batch_size, config.student.batch_size, config.eval_batch_size),
  )
  if FLAGS.coordinator_address or FLAGS.distributed_auto:
    parallel.initialize_distributed(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        auto=FLAGS.distributed_auto,
    )
  if FLAGS.ladder:
    try:
      print(ladder_table(FLAGS.config))
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 2
    return 0
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default")
  distributed = bool(FLAGS.coordinator_address or FLAGS.distributed_auto)
  workdir = pathlib.Path(FLAGS.workdir)
  existed = workdir.exists()
  lock, refusal = None, ""
  if not distributed or jax_process_index() == 0:  # multi-host: process 0 holds it
    try:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    except workdir_lock.WorkdirLockedError as e:
      refusal = str(e)
    except OSError as e:
      refusal = (
          f"workdir {str(workdir)!r} is not writable ({e.strerror}); pass a directory you can "
          "write to with --workdir"
      )
  if distributed:
    refusal = _from_process_0(refusal)  # every process stops, or none
  if refusal:
    print(f"error: {refusal}", file=sys.stderr, flush=True)
    return 2
  # kill <pid> releases the lock (in the handler, whatever the run is doing)
  workdir_lock.install_sigterm_handler(lock.release if lock is not None else None)
  code = 1
  history = None
  try:
    if lock is not None:  # every run's full config, next to the checkpoints it made
      history = provenance.append_config_history(workdir, config)
    code = run_job(config, FLAGS.workdir)
    return code
  finally:
    if lock is not None:
      if code == 2 and history is not None and history.ckpt_unchanged():
        history.undo()  # a run refused before training leaves the workdir as it was
      lock.release()
      if code == 2 and not existed:
        _remove_if_empty(workdir)


def _remove_if_empty(directory: pathlib.Path) -> None:
  try:
    directory.rmdir()
  except OSError:
    pass


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index()


def _from_process_0(text: str, size: int = 1024) -> str:
  """Process 0's ``text`` on every process (up to ``size`` UTF-8 bytes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = np.frombuffer(text.encode()[:size].ljust(size), np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  return bytes(shared.astype(np.uint8)).decode(errors="replace").rstrip()


def train_kwargs(train_and_evaluate, *, retrain_changed: bool) -> dict:
  """Keyword arguments for ``train_and_evaluate`` from flags, those its signature accepts.

  Raises:
    app.UsageError: ``--retrain_changed`` was given but ``train_and_evaluate`` has no such
      parameter (this version of pkd does not check stage fingerprints yet).
  """
  accepted = inspect.signature(train_and_evaluate).parameters
  if "retrain_changed" in accepted:
    return {"retrain_changed": bool(retrain_changed)}
  if retrain_changed:
    raise app.UsageError(
        "--retrain_changed is not supported by this version of mamba_pkd.pkd (its "
        "train_and_evaluate has no retrain_changed parameter)"
    )
  return {}


def run_job(config, workdir: str) -> int:
  """Runs the job; returns the exit code (errors users can fix: one line on stderr)."""
  from mamba_pkd import checkpoints, pkd  # pylint: disable=g-import-not-at-top

  try:
    pkd.train_and_evaluate(
        config,
        workdir,
        **train_kwargs(pkd.train_and_evaluate, retrain_changed=FLAGS.retrain_changed),
    )
  except (ValueError, FileNotFoundError, checkpoints.CheckpointWriteError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)  # one line, no traceback, no log prefix
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from mamba_pkd import train  # pylint: disable=g-import-not-at-top

    if isinstance(e, train.NonFiniteLossError):
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 3
    raise
  return 0


# XLA's CPU client allocates each step's temporaries (the teacher's ~120 MB per device and
# step on mnist5k) with glibc's malloc, which serves a block that large with a fresh mmap and
# returns it with munmap: every step touched ~60,000 new 4 KiB pages (15.1 million page
# faults in 185 teacher steps, ~10% of a profile's samples in the kernel's fault handling and
# page clearing). With the tunable below, malloc asks the kernel for transparent huge pages
# (madvise): 0.6 million faults for the same steps; the arithmetic is unchanged (the same
# parameters, bit for bit). docs/performance.md and experiments/bench_malloc.py measure it.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
REEXEC_ENV = "MAMBA_PKD_MALLOC_REEXEC"  # set (to anything) in the environment: never re-exec


def is_glibc() -> bool:
  """Whether this process runs on glibc (asked of the C library, nothing read from disk)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION") is not None
  except (AttributeError, ValueError, OSError):  # not a POSIX system / name unknown
    return False


def _reexec_with_malloc_tunable() -> None:
  """Restarts this process once with :data:`MALLOC_TUNABLE` in ``GLIBC_TUNABLES``.

  glibc reads its tunables when a process starts, so they cannot be set from inside it.
  Nothing happens off Linux/glibc, when the tunable (or any ``glibc.malloc.hugetlb``) is
  already set, or when ``$MAMBA_PKD_MALLOC_REEXEC`` is set (the restarted process has it).
  The process keeps its id, arguments, environment and open files.
  """
  if REEXEC_ENV in os.environ or not is_glibc():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)
  env[REEXEC_ENV] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run():
  _reexec_with_malloc_tunable()
  app.run(main)


if __name__ == "__main__":
  run()
