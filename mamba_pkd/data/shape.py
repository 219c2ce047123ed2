"""The image shape and class count of a dataset name, without loading its images.

``python -m mamba_pkd.main --ladder`` needs nothing else: the ladder depends on
(H, W, C) and the number of classes only. ``npz:`` files are read through their
array headers (and the labels, for the class count); TFDS names through the
builder's metadata, which TFDS knows without the data being downloaded.
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np

MNIST5K = ((28, 28, 1), 10)


def _npz_header_shape(archive: zipfile.ZipFile, key: str) -> tuple[int, ...]:
  with archive.open(key + ".npy") as f:
    version = np.lib.format.read_magic(f)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, _ = reader(f)
  return tuple(int(s) for s in shape)


def npz_shape(path: str) -> tuple[tuple[int, int, int], int]:
  """``((H, W, C), num_classes)`` of an ``npz:`` file (``x_train`` read by header only).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an npz with ``x_train`` / ``y_train`` of the documented shapes.
  """
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise FileNotFoundError(f"npz dataset file {str(file)!r} does not exist")
  try:
    with zipfile.ZipFile(file) as archive:
      shape = _npz_header_shape(archive, "x_train")
  except (zipfile.BadZipFile, KeyError, ValueError) as e:
    raise ValueError(f"{file}: cannot read x_train's shape ({e}); is it an .npz with x_train?")
  if len(shape) == 3:
    shape = (*shape, 1)
  if len(shape) != 4:
    raise ValueError(f"{file}: x_train must be [N, H, W] or [N, H, W, C], got shape {shape}")
  with np.load(file, allow_pickle=False) as archive:
    if "num_classes" in archive.files:
      num_classes = int(archive["num_classes"])
    else:
      num_classes = int(np.max(archive["y_train"])) + 1
  return tuple(shape[1:]), max(num_classes, 2)


def tfds_shape(name: str, data_dir: str | None = None) -> tuple[tuple[int, int, int], int]:
  """``((H, W, C), num_classes)`` of a TFDS image-classification set from its metadata.

  Raises:
    ValueError: TFDS does not know the name, or the images have no fixed shape.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    info = tfds.builder(name, data_dir=data_dir or None).info
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(
        f"unknown dataset name {name!r}: not 'mnist5k', 'npz:/path/file.npz', 'synthetic[:...]' "
        f"or a TFDS name ({type(e).__name__}: {first_line})"
    ) from None
  image_key, label_key = info.supervised_keys or ("image", "label")
  shape = tuple(info.features[image_key].shape)
  if len(shape) != 3 or any(d is None for d in shape):
    raise ValueError(f"TFDS dataset {name!r} has images of shape {shape}, not a fixed [H, W, C]")
  return shape, int(info.features[label_key].num_classes)


def dataset_shape(
    name: str, *, data_dir: str | None = None, seed: int = 0
) -> tuple[tuple[int, int, int], int]:
  """``((H, W, C), num_classes)`` of any dataset name the pipeline accepts."""
  if name == "mnist5k":
    return MNIST5K
  if name.startswith("npz:"):
    return npz_shape(name[len("npz:") :])
  if name == "synthetic" or name.startswith("synthetic:"):
    from mamba_pkd.data.sources import load_dataset  # pylint: disable=g-import-not-at-top

    ds = load_dataset(name, seed=seed)  # small and made on the fly
    return tuple(ds.image_shape), int(ds.num_classes)
  if ":" in name.split("/")[0]:
    from mamba_pkd.data.sources import load_dataset  # pylint: disable=g-import-not-at-top

    load_dataset(name, data_dir=data_dir, seed=seed)  # raises the usual message
  return tfds_shape(name, data_dir)
