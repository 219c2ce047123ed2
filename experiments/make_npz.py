r"""Writes a real (not synthetic) small image dataset as the project's ``npz:`` format.

  python experiments/make_npz.py digits --out=data/digits.npz [--seed=0] [--test_fraction=0.2]
  python -m mamba_pkd.main --config=configs/default.py --workdir=runs/digits \
      --config.dataset=npz:data/digits.npz --config.model.ladder=auto

Datasets (all offline, shipped inside an installed wheel):

* ``digits``: scikit-learn's ``load_digits()`` (installed as a dependency of
  mlxtend; the 1,797 8x8 grayscale handwritten digits of the UCI "Optical
  Recognition of Handwritten Digits" test set, 10 classes, read from
  ``sklearn/datasets/data/digits.csv.gz``: no download). Pixels are counts
  0..16, written as uint8 ``round(v * 255 / 16)``.

No 32x32 RGB dataset (CIFAR-10/100, SVHN) ships inside a wheel installed here
or is cached on this machine (TFDS has only their download scripts); see the
report of project issue 13.

The file holds ``x_train, y_train, x_test, y_test`` (uint8 NHWC images, int64
labels) and ``num_classes``; the test split is stratified: every class gives
``round(test_fraction * count)`` of its images, chosen by ``--seed``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: uint8 images [1797, 8, 8, 1] (0..255) and int64 labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


DATASETS = {"digits": load_digits}


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, test) row indices; each class gives ``round(test_fraction * count)`` rows
  (at least 1 when the class has 2 or more) to the test split, drawn by ``seed``."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    k = int(round(test_fraction * len(rows)))
    if len(rows) >= 2:
      k = min(max(k, 1), len(rows) - 1)
    test.append(rng.permutation(rows)[:k])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def make_npz(name: str, out: str | pathlib.Path, *, seed: int = 0, test_fraction: float = 0.2):
  """Writes dataset ``name`` to ``out``; returns the arrays written."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
  images, labels = DATASETS[name]()
  train, test = stratified_split(labels, test_fraction, seed)
  arrays = {
      "x_train": images[train],
      "y_train": labels[train],
      "x_test": images[test],
      "y_test": labels[test],
      "num_classes": np.int64(labels.max() + 1),
  }
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  return arrays


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", choices=sorted(DATASETS))
  parser.add_argument("--out", required=True, help="path of the .npz to write")
  parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
  parser.add_argument("--test_fraction", type=float, default=0.2)
  args = parser.parse_args(argv)
  try:
    arrays = make_npz(args.dataset, args.out, seed=args.seed, test_fraction=args.test_fraction)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
      f"wrote {args.out}: {len(arrays['y_train'])} train, {len(arrays['y_test'])} test, "
      f"images {arrays['x_train'].shape[1:]}, {int(arrays['num_classes'])} classes"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
