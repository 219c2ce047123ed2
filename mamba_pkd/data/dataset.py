"""The ``Dataset`` type: what every source hands back, and how arrays become one.

A ``Dataset`` holds read-only uint8 images ``[N, H, W, C]`` and int32 labels
of a train and a test split, with the per-channel mean and std of the train
images that batches are normalised with. ``create_dataset`` wraps arrays that
are already valid; ``validate_arrays`` checks arrays a user brought (npz files,
TFDS splits) and names the key and what is wrong with it before converting.
``check_int`` is the one integer-argument check of the package.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


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


def check_int(value, what: str, minimum: int) -> None:
  """Raises ValueError unless ``value`` is an integer (not a bool) ``>= minimum``.

  Args:
    value: the value to check.
    what: its name, for the message.
    minimum: the smallest valid value (0: "a non-negative integer", 1: "a
      positive integer").
  """
  if (
      isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer))
      or value < minimum
  ):
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    raise ValueError(f"{what} must be {kind}, got {value!r}")


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


def validate_arrays(
    name: str,
    arrays: Mapping[str, np.ndarray],
    num_classes=None,
    source: str = "arrays",
) -> Dataset:
  """Checks user arrays and converts them to a ``Dataset``.

  ``x`` may be ``[N, H, W]`` or ``[N, H, W, C]``, uint8 / integer in
  ``[0, 255]`` or float in ``[0, 1]`` or ``[0, 255]`` (float data whose
  maximum over both splits is <= 1 is read as ``[0, 1]``). ``y`` is an
  integer ``[N]`` in ``[0, num_classes)``.

  Args:
    name: the dataset's name.
    arrays: ``x_train, y_train, x_test, y_test`` as described above.
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
