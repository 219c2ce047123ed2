r"""Entry point: progressive knowledge distillation into Mamba students.

  python -m mamba_pkd.main --config=configs/default.py --workdir=runs/default
  python -m mamba_pkd.main --config=configs/default.py --workdir=runs/x \
      --config.pkd.max_students=5 --config.student.epochs=20
  python -m mamba_pkd.main --config=configs/default.py --ladder   # print the size ladder

Re-running the same command resumes: finished stages are skipped, an
interrupted stage continues from its latest checkpoint.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


def ladder_table(config) -> str:
  """Markdown table of the ladder sizes for the config's dataset shape."""
  from mamba_pkd import data as data_lib  # pylint: disable=g-import-not-at-top
  from mamba_pkd import flops, models  # pylint: disable=g-import-not-at-top

  ds = data_lib.load_dataset(config.dataset, data_dir=config.data_dir or None, seed=config.seed)
  sizes = models.ladder_configs(
      config.model.ladder,
      image_shape=ds.image_shape,
      num_classes=ds.num_classes,
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
    print(ladder_table(FLAGS.config))
    return 0
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default")
  from mamba_pkd import pkd  # pylint: disable=g-import-not-at-top

  try:
    pkd.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)  # one line, no traceback, no log prefix
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from mamba_pkd import train  # pylint: disable=g-import-not-at-top

    if isinstance(e, train.NonFiniteLossError):
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 3
    raise
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
