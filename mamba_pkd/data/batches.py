"""Batches: fast, deterministic NumPy batches for training and eval, per host and device.

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
so do the augmentation draws (indexed by position in the epoch, see
``augment.py``); each host takes its own contiguous slice of every global
batch, so N hosts together see exactly the batches of one host.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from mamba_pkd.data.augment import augment_images, epoch_augmentation
from mamba_pkd.data.dataset import Dataset, check_int
from mamba_pkd.preprocessing import normalize  # the one normalisation (inference uses it too)


def shard(array: np.ndarray, num_devices: int) -> np.ndarray:
  """Reshapes ``[N, ...]`` to ``[num_devices, N // num_devices, ...]``.

  Raises:
    ValueError: ``N`` is not divisible by ``num_devices``.
  """
  check_int(num_devices, "num_devices", 1)
  if array.shape[0] % num_devices:
    raise ValueError(
        f"cannot shard a leading dimension of {array.shape[0]} over num_devices={num_devices}: "
        "it must be divisible"
    )
  return array.reshape((num_devices, -1) + array.shape[1:])


def steps_per_epoch(num_train: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches in one pass over ``num_train`` examples at global ``batch_size``.

  ``drop_remainder=True``: full batches only (training); ``False``: the last
  partial batch too, padded (``ceil(num_train / batch_size)``, evaluation).
  """
  check_int(batch_size, "batch_size", 1)
  if drop_remainder and num_train < batch_size:
    raise ValueError(
        f"batch_size={batch_size} is larger than the {num_train} training examples: an "
        "epoch would have no full batch; lower batch_size or use drop_remainder=False"
    )
  return num_train // batch_size if drop_remainder else -(-num_train // batch_size)


def _check_batch_layout(
    batch_size: int, num_devices: int, process_index: int, process_count: int
) -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over hosts and devices."""
  check_int(batch_size, "batch_size", 1)
  check_int(num_devices, "num_devices", 1)
  check_int(process_count, "process_count", 1)
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


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of one training epoch: int64 ``[num_examples]``, a function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


def _assemble_batch(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    valid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    num_devices: int,
    augment: str,
    draws: Mapping[str, np.ndarray],
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


def _batches(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    order: np.ndarray | None,
    draws: Mapping[str, np.ndarray],
    augment: str,
    mean: np.ndarray,
    std: np.ndarray,
    batch_size: int,
    num_steps: int,
    num_devices: int,
    process_index: int,
    process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This host's slice of ``num_steps`` global batches over the positions of a pass.

  Position ``p`` of the pass is row ``order[p]`` (row ``p`` if ``order`` is
  None) with the draws ``draws[key][p]``; positions past the last example are
  padding (``mask`` 0, ``index`` -1).
  """
  n = images_uint8.shape[0]
  per_host = batch_size // process_count
  start = process_index * per_host
  for step in range(num_steps):
    positions = step * batch_size + start + np.arange(per_host)  # positions in the pass
    valid = positions < n
    positions = np.minimum(positions, n - 1)
    step_draws = {key: value[positions] for key, value in draws.items()}
    rows = positions if order is None else order[positions]
    yield _assemble_batch(
        images_uint8, labels, rows, valid, mean, std, num_devices, augment, step_draws
    )


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
  _check_batch_layout(batch_size, num_devices, process_index, process_count)
  check_int(seed, "seed", 0)
  check_int(epoch, "epoch", 0)
  n = dataset.num_train
  # Arguments are checked here, when called, not at the first next() of the generator.
  return _batches(
      dataset.x_train,
      dataset.y_train,
      order=epoch_permutation(n, seed, epoch),  # [N] rows of x_train
      draws=epoch_augmentation(n, seed, epoch, augment),  # {} for "none"; checks the name
      augment=augment,
      mean=dataset.mean,
      std=dataset.std,
      batch_size=batch_size,
      num_steps=steps_per_epoch(n, batch_size, drop_remainder),
      num_devices=num_devices,
      process_index=process_index,
      process_count=process_count,
  )


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
  _check_batch_layout(batch_size, num_devices, process_index, process_count)
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
  return _batches(
      images_uint8,
      labels,
      order=None,
      draws={},
      augment="none",
      mean=mean,
      std=std,
      batch_size=batch_size,
      num_steps=steps_per_epoch(n, batch_size, drop_remainder=False),
      num_devices=num_devices,
      process_index=process_index,
      process_count=process_count,
  )
