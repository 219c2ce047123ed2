r"""Paper experiment 1: full MNIST (TFDS, 60,000 train / 10,000 test), ensemble PKD.

NOT RUN HERE: the development machine has 2 CPU cores and no internet, so this
config was never run to completion by us; the wall-time and memory figures
below are estimates (see "Expected"), not results.

Prepare the data once (needs internet and TensorFlow; reading it later does not):

  pip install tensorflow tensorflow-datasets array_record
  python -c "import tensorflow_datasets as tfds; tfds.data_source('mnist', data_dir='$HOME/tensorflow_datasets')"

Launch (all local devices: the train/eval steps are pmap-ed over
jax.local_devices(); the global batch 512 must divide by their count):

  python -m mamba_pkd.main --config=configs/mnist.py --workdir=$PWD/runs/mnist \
      --config.data_dir=$HOME/tensorflow_datasets

or `python experiments/reproduce_paper.py run mnist --workdir=runs/mnist`, which
runs the same command and then prints our numbers beside the paper's.

Settings: the "mnist" ladder (teacher d_model 64 x 4 blocks on 4x4 patches,
49 tokens; students s1..s8 from ~1% to ~48% of its FLOPs; the exact table:
`python -m mamba_pkd.main --config=configs/mnist.py --ladder`), 5,000 training
images held out for the weak-learner test, teacher 20 epochs with +-2 px
shifts, each student 20 epochs on cached teacher logits, up to 7 students.
These are our settings, not hyperparameters copied from the paper (they
follow its setup: a teacher, then students from ~1% of its FLOPs upward).

Expected (ESTIMATED, not a result): `python experiments/reproduce_paper.py
estimate mnist` on one NVIDIA H200 (jax 0.11.2, scan "auto" -> pallas) trained
this config's teacher and its s1 and s8 students for 2 epochs (60 steps) on
synthetic 28x28x1 data. With bidirectional models (the default): teacher 83
steps/s, s1 172 and s8 197 steps/s (short, noisy windows) at batch 512, ~26 s
of compile/checkpoint/prediction overhead per stage, peak device memory
1.0 GB (unidirectional: 88 / 259 / 183 steps/s, 0.8 GB). Extrapolated to the
full config (2,140 steps per stage, 1 teacher + 14 to 23 student/baseline
trainings): about 10-15 minutes on one H200-class GPU, mostly per-stage
overhead, plus reading the TFDS set; about 1 GB per device.

Paper: teacher 98%; weakest student 1% of the FLOPs at 72%; 7 students,
63% of the FLOPs, at 98%.
"""

import pathlib
import runpy


def _default_config():
  """configs/default.py's config (loaded by path: config files are not a package)."""
  return runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]()


def get_config():
  config = _default_config()
  config.dataset = "mnist"  # TFDS name; prepare it first (see the docstring)
  config.validation_size = 5000  # held out of the 60,000 for the weak-learner test
  config.eval_batch_size = 2000  # global prediction batch
  config.checkpoint_every = 500
  config.log_every = 100
  config.model.ladder = "mnist"
  config.model.scan_method = "auto"  # pallas on GPU; native on CPU where it compiles, else fused
  config.teacher.epochs = 20
  config.teacher.batch_size = 512  # global; divisible by 1, 2, 4, 8 devices
  config.teacher.learning_rate = 2e-3
  config.teacher.augment = "shift"
  config.student.epochs = 20
  config.student.batch_size = 512
  config.student.learning_rate = 5e-3
  config.student.augment = "shift"
  # view pool: 8 x 55,000 x 784 B = 345 MB; the frozen models run on it once
  config.student.cached_views = 8
  config.pkd.max_students = 7
  config.report.latency = True
  return config
