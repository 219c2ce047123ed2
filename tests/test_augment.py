"""Tests of mamba_pkd.data.augment: shift, crop_flip, affine, draws per epoch, view pools."""

import numpy as np
import pytest

from conftest import flat, small_dataset
from mamba_pkd import data


def pad_crop_flip_reference(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Per-image loop version of ``data.pad_crop_flip`` (slow): the test's oracle."""
  out = np.empty_like(images)
  h, w = images.shape[1:3]
  for i, image in enumerate(images):
    padded = np.zeros((h + 2 * pad, w + 2 * pad) + image.shape[2:], image.dtype)
    padded[pad : pad + h, pad : pad + w] = image
    crop = padded[offsets[i, 0] : offsets[i, 0] + h, offsets[i, 1] : offsets[i, 1] + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def test_crop_flip_hand_built():
  img = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
  flipped = data.pad_crop_flip(img, np.array([[4, 4]]), np.array([True]), pad=4)
  np.testing.assert_array_equal(
      flipped[0, :, :, 0], [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]]
  )
  same = data.pad_crop_flip(img, np.array([[4, 4]]), np.array([False]), pad=4)
  np.testing.assert_array_equal(same, img)
  # Corner (5, 3): content moves up one row and right one column, zeros come in.
  moved = data.pad_crop_flip(img, np.array([[5, 3]]), np.array([False]), pad=4)
  np.testing.assert_array_equal(
      moved[0, :, :, 0], [[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0]]
  )


def test_pad_crop_flip_matches_reference():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (16, 9, 7, 3), dtype=np.uint8)
  for pad in (0, 2, 4):
    offsets = rng.integers(0, 2 * pad + 1, (16, 2))
    flips = rng.random(16) < 0.5
    np.testing.assert_array_equal(
        data.pad_crop_flip(x, offsets, flips, pad),
        pad_crop_flip_reference(x, offsets, flips, pad),
    )


def test_shift_moves_single_pixel_by_at_most_two():
  n = 64
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 14, 13] = 255
  d = data.create_dataset("dot", x, np.arange(n) % 2, x[:2], np.arange(2), 2)
  moves = []
  for b in data.train_batches(d, batch_size=16, seed=0, epoch=0, augment="shift"):
    pixels = np.rint((flat(b)["image"][..., 0] * d.std[0] + d.mean[0]) * 255.0)  # back to [0, 255]
    assert ((pixels == 0) | (pixels == 255)).all()
    assert (pixels.reshape(16, -1).sum(axis=1) == 255).all()  # one lit pixel, mass kept
    rows, cols = np.nonzero(pixels == 255)[1:]
    moves += list(zip(rows - 14, cols - 13))
  moves = np.array(moves)
  assert np.abs(moves).max() == 2  # up to 2, and 2 is reached in 64 draws
  assert len({tuple(m) for m in moves}) > 10  # shifts differ between images


def test_train_augmentation_is_reproducible_from_params():
  d = small_dataset(shape=(8, 8, 3))
  b = next(data.train_batches(d, batch_size=10, seed=4, epoch=1, augment="crop_flip"))
  order = data.epoch_permutation(d.num_train, 4, 1)
  draws = data.epoch_augmentation(d.num_train, 4, 1, "crop_flip")
  offsets, flips = draws["offsets"], draws["flips"]
  ref = pad_crop_flip_reference(
      d.x_train[order[:10]], offsets[:10], flips[:10], data.CROP_PAD_PIXELS
  )
  np.testing.assert_allclose(flat(b)["image"], data.normalize(ref, d.mean, d.std))
  assert 0 < flips.mean() < 1 and offsets.max() == 8 and offsets.min() == 0
  # Fresh draws every epoch, the same draws for the same (seed, epoch).
  np.testing.assert_array_equal(
      data.epoch_augmentation(d.num_train, 4, 1, "crop_flip")["offsets"], offsets
  )
  assert not np.array_equal(
      data.epoch_augmentation(d.num_train, 4, 2, "crop_flip")["offsets"], offsets
  )


def test_augmented_views_first_is_original_others_are_shifts():
  n = 40
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 14, 13] = 255
  pool = data.augmented_views(x, 4, "shift", seed=3)
  assert pool.shape == (4, n, 28, 28, 1) and pool.dtype == np.uint8
  np.testing.assert_array_equal(pool[0], x)
  moves = set()
  for view in pool[1:]:
    assert (view.reshape(n, -1).sum(axis=1) == 255).all()  # the dot is kept, only moved
    rows, cols = np.nonzero(view[..., 0] == 255)[1:]
    moves |= set(zip(rows - 14, cols - 13))
  assert max(max(abs(r), abs(c)) for r, c in moves) == 2 and len(moves) > 10
  # A function of the seed only; another seed draws other views.
  np.testing.assert_array_equal(data.augmented_views(x, 4, "shift", seed=3), pool)
  assert not np.array_equal(data.augmented_views(x, 4, "shift", seed=4)[1:], pool[1:])


def test_affine_warp_exact_cases():
  rng = np.random.default_rng(5)
  x = rng.integers(0, 256, (3, 28, 28, 2), dtype=np.uint8)
  ones, zeros = np.ones(3), np.zeros(3)
  # Identity.
  np.testing.assert_array_equal(data.affine_warp(x, zeros, ones, np.zeros((3, 2))), x)
  # 90 degrees maps the pixel grid onto itself: np.rot90 (counter-clockwise as displayed).
  np.testing.assert_array_equal(
      data.affine_warp(x, np.full(3, 90.0), ones, np.zeros((3, 2))), np.rot90(x, axes=(1, 2))
  )
  # An integer shift equals pad-and-crop: content moves by (dy, dx) = (2, -1).
  shifted = data.affine_warp(x, zeros, ones, np.tile([[2.0, -1.0]], (3, 1)))
  np.testing.assert_array_equal(
      shifted, data.pad_crop_flip(x, np.tile([[0, 3]], (3, 1)), np.zeros(3, bool), pad=2)
  )
  # A half-pixel shift averages neighbours (bilinear).
  row = np.zeros((1, 1, 4, 1), np.float32)
  row[0, 0, 1] = 1.0
  half = data.affine_warp(row, np.zeros(1), np.ones(1), np.array([[0.0, 0.5]]))
  np.testing.assert_allclose(half[0, 0, :, 0], [0.0, 0.5, 0.5, 0.0])


def test_affine_views_and_live_batches():
  n = 64
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 10:18, 12:16] = 255  # a bar: it stays roughly where it was and keeps its mass
  pool = data.augmented_views(x, 3, "affine", seed=1)
  np.testing.assert_array_equal(pool[0], x)
  for view in pool[1:]:
    mass = view.reshape(n, -1).astype(np.float64).sum(axis=1) / (32 * 255)
    assert (np.abs(mass - 1) < 0.3).all()  # scale 0.9..1.1 changes the area by <= 21%
    assert len({v.tobytes() for v in view}) == n  # every image drawn differently
  np.testing.assert_array_equal(data.augmented_views(x, 3, "affine", seed=1), pool)
  draws = data.epoch_augmentation(n, 0, 0, "affine")
  assert np.abs(draws["angles"]).max() <= data.AFFINE_MAX_DEGREES
  assert np.abs(draws["scales"] - 1).max() <= data.AFFINE_MAX_SCALE
  assert np.abs(draws["shifts"]).max() <= data.SHIFT_MAX_PIXELS
  d = data.create_dataset("bars", x, np.arange(n) % 2, x[:2], np.arange(2), 2)
  b = next(data.train_batches(d, batch_size=16, seed=0, epoch=0, augment="affine"))
  order = data.epoch_permutation(n, 0, 0)[:16]
  ref = data.affine_warp(x[order], draws["angles"][:16], draws["scales"][:16], draws["shifts"][:16])
  np.testing.assert_allclose(flat(b)["image"], data.normalize(ref, d.mean, d.std))


def test_augmented_views_errors_and_epoch_views():
  x = np.zeros((5, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="num_views=3 needs an augmentation"):
    data.augmented_views(x, 3, "none", seed=0)
  with pytest.raises(ValueError, match="num_views must be a positive integer"):
    data.augmented_views(x, 0, "shift", seed=0)
  np.testing.assert_array_equal(data.augmented_views(x, 1, "none", seed=0)[0], x)
  views = data.epoch_views(1000, 8, seed=1, epoch=2)
  assert views.shape == (1000,) and views.min() == 0 and views.max() == 7
  np.testing.assert_array_equal(data.epoch_views(1000, 8, seed=1, epoch=2), views)
  assert not np.array_equal(data.epoch_views(1000, 8, seed=1, epoch=3), views)
