"""Your own arrays: a ``.npz`` file with ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""

from __future__ import annotations

import os

import numpy as np
from sklearn.model_selection import train_test_split

from fjt.data.dataset import Dataset

LAYOUTS = ("", "flat", "nhwc", "nchw", "sequence")


def guess_layout(x: np.ndarray) -> str:
  """``"nhwc"`` or ``"nchw"`` for 4-D images, by which axis is small enough to be channels
  (1 to 4) while the other is not; ``""`` when it cannot tell or ``x`` is not 4-D."""
  if x.ndim != 4:
    return ""
  first, last = x.shape[1] <= 4, x.shape[3] <= 4
  return "nchw" if first and not last else "nhwc" if last and not first else ""


def _split(x, y, test_fraction: float, seed: int):
  if not 0 < test_fraction < 1:
    raise ValueError(f"config key 'data.test_fraction': expected a number in (0, 1), got "
                     f"{test_fraction!r}")
  stratify = None
  if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
  return train_test_split(x, y, test_size=test_fraction, stratify=stratify, random_state=seed)


def load(path: str = "", layout: str = "", test_fraction: float = 0.2, split_seed: int = 0,
         task: str = "") -> Dataset:
  """Arrays from the ``.npz`` file at ``path``.

  Args:
    path: a ``.npz`` holding ``x`` (inputs, first axis examples) and ``y`` (targets: int class
      ids, or floats for regression), and optionally ``x_test``/``y_test``. Without them, a
      seeded ``test_fraction`` split (stratified for int labels) is held out.
    layout: what ``x`` is: ``flat`` (N, features), ``nhwc`` or ``nchw`` images, ``sequence``;
      empty: guessed for 4-D images. Checked against the model before training (fjt's
      convolutions take NHWC).
    test_fraction, split_seed: the held-out share and the seed of its split.
    task: the default task (``fjt.TASKS``); empty: ``classification`` for int ``y``,
      ``regression`` for float ``y``.
  """
  if not path:
    raise ValueError("config key 'data.path': dataset 'arrays' needs the path of a .npz file")
  if not os.path.isfile(path):
    raise ValueError(f"config key 'data.path': file {path!r} does not exist")
  if layout not in LAYOUTS:
    raise ValueError(f"config key 'data.layout': expected one of {LAYOUTS}, got {layout!r}")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"config key 'data.path': {path!r} is not a readable .npz file: {e}") from e
  for key in ("x", "y"):
    if key not in arrays:
      raise ValueError(f"config key 'data.path': {path!r} has no array {key!r} (it has "
                       f"{sorted(arrays)}); save it with np.savez(path, x=inputs, y=targets)")
  if ("x_test" in arrays) != ("y_test" in arrays):
    raise ValueError(f"config key 'data.path': {path!r} has only one of 'x_test' and 'y_test'")
  for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
    if x_key in arrays and len(arrays[x_key]) != len(arrays[y_key]):
      raise ValueError(f"config key 'data.path': {path!r} has {len(arrays[x_key])} rows of "
                       f"{x_key!r} but {len(arrays[y_key])} of {y_key!r}")

  def cast(a):  # JAX computes in 32 bits by default.
    return a.astype(np.float32) if a.dtype == np.float64 else \
        a.astype(np.int32) if a.dtype == np.int64 else a

  x, y = cast(arrays["x"]), cast(arrays["y"])
  if "x_test" in arrays:
    x_train, y_train, x_test, y_test = x, y, cast(arrays["x_test"]), cast(arrays["y_test"])
  else:
    x_train, x_test, y_train, y_test = _split(x, y, test_fraction, split_seed)
  integer = np.issubdtype(y.dtype, np.integer)
  task = task or ("classification" if integer else "regression")
  num_classes = None
  if integer:
    if min(y_train.min(), y_test.min()) < 0:
      raise ValueError(f"config key 'data.path': {path!r} has negative class ids in 'y'")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  guess = guess_layout(x)
  if layout in ("nhwc", "nchw") and guess and guess != layout:
    raise ValueError(f"config key 'data.layout': {layout!r}, but x of shape {x.shape} in {path!r} "
                     f"has its small (channel) axis where {guess.upper()} has it; check the file")
  info = {"task": task, "layout": layout or guess, "path": os.path.abspath(path)}
  return Dataset(train={"x": x_train, "y": y_train}, test={"x": x_test, "y": y_test},
                 num_classes=num_classes, info=info)
