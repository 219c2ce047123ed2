r"""Paper experiment 2: CIFAR-10 (TFDS, 50,000 train / 10,000 test), ensemble PKD.

NOT RUN HERE: the development machine has 2 CPU cores and no internet, so this
config was never run to completion by us; the wall-time and memory figures
below are estimates (see "Expected"), not results.

Prepare the data once (needs internet and TensorFlow; reading it later does not):

  pip install tensorflow tensorflow-datasets array_record
  python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10', data_dir='$HOME/tensorflow_datasets')"

Launch (all local devices: the train/eval steps are pmap-ed over
jax.local_devices(); the global batch 512 must divide by their count):

  python -m mamba_pkd.main --config=configs/cifar10.py --workdir=$PWD/runs/cifar10 \
      --config.data_dir=$HOME/tensorflow_datasets

or `python experiments/reproduce_paper.py run cifar10 --workdir=runs/cifar10`.

Settings: the "cifar" ladder (teacher d_model 96 x 6 blocks on 4x4 patches,
64 tokens; students s1..s8 from ~1% to ~50% of its FLOPs; the exact table:
`python -m mamba_pkd.main --config=configs/cifar10.py --ladder`), 5,000
training images held out for the weak-learner test, teacher 100 epochs with
random crop (pad 4) and horizontal flip, each student 30 epochs on cached
teacher logits, up to 7 students. These are our settings, not hyperparameters
copied from the paper.

Expected (ESTIMATED, not a result): `python experiments/reproduce_paper.py
estimate cifar10` on one NVIDIA H200 (jax 0.11.2, scan "auto" -> pallas)
trained this config's teacher and its s1 and s8 students for 2 epochs (60
steps) on synthetic 32x32x3 data. With bidirectional models (the default):
teacher 45 steps/s, s1 141 and s8 89 steps/s at batch 512, ~21 s overhead per
stage, peak device memory 2.7 GB (unidirectional: 63 / 136 / 94 steps/s,
2.5 GB). Extrapolated to the full config (8,700 teacher steps, 2,610 per
student stage, 14 to 23 student/baseline trainings): about 13-23 minutes on
one H200-class GPU, plus reading the TFDS set; under 4 GB per device.

Paper: students 1 point under the teacher; the smallest student at 5% of the
FLOPs reaches 50%.
"""

import pathlib
import runpy


def _default_config():
  """configs/default.py's config (loaded by path: config files are not a package)."""
  return runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]()


def get_config():
  config = _default_config()
  config.dataset = "cifar10"  # TFDS name; prepare it first (see the docstring)
  config.validation_size = 5000  # held out of the 50,000 for the weak-learner test
  config.eval_batch_size = 2000  # global prediction batch
  config.checkpoint_every = 500
  config.log_every = 100
  config.model.ladder = "cifar"
  config.model.scan_method = "auto"  # pallas on GPU; native on CPU where it compiles, else fused
  config.teacher.epochs = 100
  config.teacher.batch_size = 512  # global; divisible by 1, 2, 4, 8 devices
  config.teacher.learning_rate = 1e-3
  config.teacher.weight_decay = 0.05
  config.teacher.augment = "crop_flip"  # random crop (pad 4) + horizontal flip
  config.student.epochs = 30
  config.student.batch_size = 512
  config.student.learning_rate = 3e-3
  config.student.augment = "crop_flip"
  # view pool: 4 x 45,000 x 3,072 B = 553 MB; the frozen models run on it once
  config.student.cached_views = 4
  config.pkd.max_students = 7
  config.report.latency = True
  return config
