"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fjt.data.dataset import Dataset

SPLIT_SEED = 0  # The split is fixed for every run, whatever the training seed.


def load(layout: str = "flat", classes: Sequence[int] = (), test_fraction: float = 0.2) -> Dataset:
  """Digits scaled to [0, 1] with a fixed stratified 80/20 split.

  Args:
    layout: "flat" gives x of shape (N, 64); "nhwc" gives (N, 8, 8, 1). float32.
    classes: keep only these digits, relabelled 0..len(classes)-1 in this
      order (e.g. (5, 6, 7, 8, 9) for a 5-class task); empty keeps all ten.
    test_fraction: share of each class held out for the test split.
  """
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)  # Pixel values are 0..16.
  y = digits.target.astype(np.int32)
  if layout == "flat":
    x = x.reshape(len(x), 64)
  elif layout == "nhwc":
    x = x[..., None]
  else:
    raise ValueError(f"config key 'data.layout': expected 'flat' or 'nhwc', got {layout!r}")
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED)
  num_classes = 10
  if classes:
    classes = [int(c) for c in classes]
    if not set(classes) <= set(range(10)) or len(set(classes)) != len(classes):
      raise ValueError(f"config key 'data.classes': expected distinct digits 0-9, got {classes}")
    relabel = np.full(10, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    keep_train, keep_test = relabel[y_train] >= 0, relabel[y_test] >= 0
    x_train, y_train = x_train[keep_train], relabel[y_train[keep_train]]
    x_test, y_test = x_test[keep_test], relabel[y_test[keep_test]]
    num_classes = len(classes)
  return Dataset(train={"x": x_train, "y": y_train}, test={"x": x_test, "y": y_test},
                 num_classes=num_classes, info={"task": "classification", "layout": layout})
