"""What turns pixels into a model's input: ``x = (pixels / 255 - mean) / std``, and its checks.

Owns :func:`normalize` (used by the data pipeline in training and by every
inference path) and :class:`Preprocessing`, the constants a run records in its
manifest and an export in its sidecar. NumPy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def normalize(images_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``(x / 255 - mean) / std`` in float32.

  Args:
    images_uint8: ``[..., C]`` pixel values in [0, 255].
    mean: ``[C]`` (or broadcastable), in units of ``x / 255``.
    std: ``[C]``.

  Returns:
    float32 array of the shape of ``images_uint8``.
  """
  images_uint8 = np.asarray(images_uint8)
  channels = images_uint8.shape[-1]
  mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
  std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
  # Rows of W * C contiguous values: with C as the innermost broadcast axis
  # NumPy would run its inner loop over only C (1 or 3) elements, ~8x slower.
  width = images_uint8.shape[-2] if images_uint8.ndim >= 2 else 1
  x = images_uint8.astype(np.float32).reshape(-1, width * channels)  # a fresh copy
  x /= np.float32(255.0)
  x -= np.tile(mean, width)
  x /= np.tile(std, width)
  return x.reshape(images_uint8.shape)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The input normalisation of a run: ``x = (pixels / 255 - mean) / std``.

  Attributes:
    image_shape: (H, W, C).
    num_classes: K, the number of logits.
    mean: per-channel mean of ``x_train / 255``, length C.
    std: per-channel standard deviation of ``x_train / 255``, length C.
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "num_classes", int(self.num_classes))
    object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))
    channels = self.image_shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(
          f"mean and std need {channels} values (one per channel of "
          f"image_shape={self.image_shape}), got {self.mean} and {self.std}"
      )

  def check_images(self, images: np.ndarray, what: str = "images") -> np.ndarray:
    """Returns ``images`` as an array after checking it is a non-empty [N, H, W, C]."""
    images = np.asarray(images)
    h, w, c = self.image_shape
    if images.ndim == 4 and images.shape[1:3] == (h, w) and images.shape[3] != c:
      raise ValueError(
          f"{what} have {images.shape[3]} channel(s); the model takes {c} "
          f"({'grayscale' if c == 1 else 'RGB' if c == 3 else f'{c} channels'}), "
          f"shape [N, {h}, {w}, {c}]"
      )
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"{what} must have shape [N, {h}, {w}, {c}] "
          f"(N images of the model's input shape), got {tuple(images.shape)}"
      )
    if len(images) == 0:
      raise ValueError(f"{what} is empty (shape {tuple(images.shape)}): give at least one image")
    return images

  def normalize(self, images: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """The model's input, float32 [N, H, W, C].

    Args:
      images: [N, H, W, C] uint8 pixels in [0, 255], or float pixels in [0, 1]
        (``uint8 / 255``); with ``normalized=True`` float inputs are taken as
        already normalised and returned as float32.
      normalized: see ``images``.

    Raises:
      ValueError: wrong shape or channel count, no images, an unsupported
        dtype, NaN/Inf values, or float pixels outside [0, 1].
    """
    images = self.check_images(images)
    if images.dtype == np.uint8:
      return normalize(images, np.asarray(self.mean), np.asarray(self.std))
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(
          f"images must be uint8 pixels (0..255) or float pixels in [0, 1], got "
          f"dtype {images.dtype}; convert with images.astype(np.uint8) if they "
          "are 0..255 integers"
      )
    bad = ~np.isfinite(images)
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"images contain {int(bad.sum())} NaN/Inf value(s) (first at index {first}, "
          f"image {first[0]}); pixels must be finite: uint8 0..255 or float in [0, 1]"
      )
    if normalized:
      return images.astype(np.float32)
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
      raise ValueError(
          f"float images must be pixels in [0, 1] (uint8 / 255), got values in "
          f"[{low:.4g}, {high:.4g}]; pass uint8 pixels, divide by 255, or pass "
          "normalized=True for inputs already normalised like the training data"
      )
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32)

  def to_json(self) -> dict:
    return {
        "image_shape": list(self.image_shape),
        "num_classes": self.num_classes,
        "mean": list(self.mean),
        "std": list(self.std),
        "formula": "x = (uint8_pixels / 255 - mean) / std, float32, NHWC",
    }

  @classmethod
  def from_json(cls, entry: dict) -> "Preprocessing":
    return cls(entry["image_shape"], entry["num_classes"], entry["mean"], entry["std"])
