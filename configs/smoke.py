r"""Smoke run for tests: synthetic 16x16 data, tiny ladder, seconds on a CPU.

  python -m mamba_pkd.main --config=configs/smoke.py --workdir=/tmp/smoke

The data is SYNTHETIC (noisy class templates), never MNIST.
"""

import pathlib
import runpy


def _default_config():
  """configs/default.py's config (loaded by path: config files are not a package)."""
  return runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]()


def get_config():
  config = _default_config()
  config.dataset = "synthetic:num_train=256,num_test=100,height=16,width=16,num_classes=4"
  config.validation_size = 64
  config.eval_batch_size = 64
  config.checkpoint_every = 6  # 2 step checkpoints a 12-step stage: a resume point and the end
  config.log_every = 6
  config.model.ladder = "tiny"
  config.model.scan_method = "sequential"
  config.teacher.epochs = 2
  config.teacher.batch_size = 32
  config.teacher.augment = "none"
  config.student.epochs = 2
  config.student.batch_size = 32
  config.teacher.min_steps = 0  # the epochs alone: 12 steps a stage
  config.student.min_steps = 0
  config.pkd.ladder = ("s1", "s2", "s3")
  config.pkd.max_students = 2
  config.pkd.reseeds = 0
  config.pkd.max_accuracy_drop = 1.0
  config.pkd.margin_se = 0.0  # 64 held-out rows: the tests pin decisions on the plain fit drop
  config.report.latency = False
  config.report.cascade_budgets_pct = (5.0, 10.0, 15.0, 25.0)  # tiny ladder: s1 is 7.5%
  config.report.cascade_bootstrap = 50
  config.baselines = True
  return config
