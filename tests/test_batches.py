"""Tests of mamba_pkd.data.batches: normalising, sharding, train and eval batches."""

import numpy as np
import pytest

from conftest import flat, small_dataset
from mamba_pkd import data

# ---------------------------------------------------------------------------
# normalize, shard, steps


def test_normalize_hand_values():
  out = data.normalize(np.array([[[0], [51]], [[255], [102]]], np.uint8), [0.2], [0.5])
  # (0/255 - .2)/.5, (51/255 - .2)/.5 = 0, (1 - .2)/.5, (102/255 - .2)/.5 = .4
  np.testing.assert_allclose(out[..., 0], [[-0.4, 0.0], [1.6, 0.4]], atol=1e-6)
  assert out.dtype == np.float32
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
  mean, std = np.array([0.1, 0.5, 0.9], np.float32), np.array([0.2, 0.3, 0.4], np.float32)
  ref = (x.astype(np.float64) / 255.0 - mean.astype(np.float64)) / std.astype(np.float64)
  np.testing.assert_allclose(data.normalize(x, mean, std), ref, atol=1e-5)


def test_shard_and_steps():
  a = np.arange(24).reshape(12, 2)
  s = data.shard(a, 3)
  assert s.shape == (3, 4, 2)
  np.testing.assert_array_equal(s[1], a[4:8])
  with pytest.raises(ValueError, match="num_devices=5"):
    data.shard(a, 5)
  assert data.steps_per_epoch(4000, 128) == 31
  assert data.steps_per_epoch(4000, 128, drop_remainder=False) == 32
  assert data.steps_per_epoch(1000, 128, drop_remainder=False) == 8  # eval: last batch padded
  with pytest.raises(ValueError, match="batch_size=64"):
    data.steps_per_epoch(50, 64)


# ---------------------------------------------------------------------------
# train_batches


def test_train_epoch_is_permutation_with_matching_rows():
  d = small_dataset()
  batches = [
      flat(b) for b in data.train_batches(d, batch_size=8, seed=3, epoch=0, drop_remainder=False)
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
        b["image"][real], data.normalize(d.x_train[b["index"][real]], d.mean, d.std)
    )
  dropped = [flat(b) for b in data.train_batches(d, batch_size=8, seed=3, epoch=0)]
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
        [b["index"].ravel() for b in data.train_batches(d, batch_size=10, seed=seed, epoch=epoch)]
    )

  np.testing.assert_array_equal(order(0, 1), order(0, 1))
  assert not np.array_equal(order(0, 1), order(0, 2))
  assert not np.array_equal(order(0, 1), order(1, 1))


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_hosts_and_devices_see_the_single_host_batches(augment):
  d = small_dataset(shape=(8, 8, 3))
  kwargs = dict(batch_size=12, seed=5, epoch=2, augment=augment, drop_remainder=False)
  single = list(data.train_batches(d, **kwargs))
  hosts = [
      list(data.train_batches(d, process_index=p, process_count=2, num_devices=3, **kwargs))
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
    data.train_batches(d, batch_size=10, seed=0, epoch=0, num_devices=4)
  with pytest.raises(ValueError, match=r"batch_size=10.*2 \* 3"):
    data.train_batches(d, batch_size=10, seed=0, epoch=0, num_devices=2, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    data.train_batches(d, batch_size=8, seed=0, epoch=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"'none', 'shift', 'crop_flip', 'affine'.*'mixup'"):
    data.train_batches(d, batch_size=8, seed=0, epoch=0, augment="mixup")
  with pytest.raises(ValueError, match="seed"):
    data.train_batches(d, batch_size=8, seed=-1, epoch=0)


# ---------------------------------------------------------------------------
# eval_batches


def test_eval_covers_every_example_once_with_masks():
  d = small_dataset()  # 23 test examples
  batches = list(
      data.eval_batches(d.x_test, d.y_test, mean=d.mean, std=d.std, batch_size=8, num_devices=2)
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
  np.testing.assert_allclose(images[:23], data.normalize(d.x_test, d.mean, d.std))
  # Two hosts: same number of steps, together every example exactly once.
  seen = []
  for p in range(2):
    host = list(
        data.eval_batches(
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
    data.eval_batches(d.x_test, d.y_test[:5], mean=d.mean, std=d.std, batch_size=8)
