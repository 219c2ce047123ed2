"""experiments/make_npz.py: scikit-learn's digits written as an npz: dataset, stratified split."""

import pathlib
import runpy

import numpy as np

from mamba_pkd import data as data_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
make_npz = runpy.run_path(str(REPO / "experiments" / "make_npz.py"))


def test_stratified_split_by_hand():
  labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
  train, test = make_npz["stratified_split"](labels, 0.2, seed=3)
  assert np.bincount(labels[test]).tolist() == [2, 1, 1]  # round(2.0), round(1.0), at least 1
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(17))
  again = make_npz["stratified_split"](labels, 0.2, seed=3)
  other = make_npz["stratified_split"](labels, 0.2, seed=4)
  assert np.array_equal(again[1], test)
  assert not np.array_equal(other[1], test)


def test_digits_npz_loads_as_a_dataset(tmp_path):
  path = tmp_path / "digits.npz"
  assert make_npz["main"](["digits", f"--out={path}", "--seed=0"]) == 0
  ds = data_lib.load_dataset(f"npz:{path}")
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.num_train + ds.num_test == 1797
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  counts = np.bincount(digits.target)
  assert np.bincount(ds.y_test).tolist() == [round(0.2 * c) for c in counts]
  # The pixels are the 0..16 counts scaled to 0..255: every test image is a digits image.
  with np.load(path) as f:
    x_test = f["x_test"]
  assert x_test.dtype == np.uint8 and x_test.max() == 255
  originals = {np.rint(im * 255 / 16).astype(np.uint8).tobytes() for im in digits.images}
  assert all(im[..., 0].tobytes() in originals for im in x_test)
