"""A checkpoint's manifest, ``fjt_manifest.json``: the size and CRC-32C of each of its files.

Orbax alone reads a truncated or bit-flipped data file without complaint; every restore checks
the manifest (``verifying``: sizes first, CRC-32Cs beside the read), so a damaged file is named
and nothing read from it is returned.
A checkpoint without a manifest is never sealed after the fact: it is reported as unverified.
The manifest also lists the arrays a checkpoint holds (``array_specs``: its shapes in one small
file) and the mesh it was saved from.

The checksum is CRC-32C (Castagnoli, as TensorStore's zarr3 index codec and cloud storage use
it), computed by ``google-crc32c`` with the CPU's CRC instruction: about 16 GB/s on one core,
7x zlib's CRC-32, so checking a checkpoint costs about one read of it from the page cache.
Files are checksummed in ranges (reads overlap in threads) combined with ``crc_combine``.
Manifests written before CRC-32C (entries with ``crc32``) are checked with zlib's CRC-32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import google_crc32c
import jax
import numpy as np

from fjt.checkpoint.errors import CheckpointError
from fjt.checkpoint.report import shape_dtype
from fjt.logs import say
from fjt.tree import flatten, to_nested_dict

PyTree = Any
MANIFEST = "fjt_manifest.json"

_CRC_RANGE = 1 << 25  # Bytes of a file checksummed by one task (32 MiB).
_CRC_CHUNK = 1 << 23  # Bytes read at a time (8 MiB).

CHECKSUM = "crc32c"  # The manifest key of the checksum new manifests record.
# name -> (extend(crc, data) -> crc, reflected polynomial, how errors name it)
_CHECKSUMS: dict[str, tuple[Callable[[int, bytes], int], int, str]] = {
    "crc32c": (google_crc32c.extend, 0x82F63B78, "CRC-32C"),
    "crc32": (lambda crc, data: zlib.crc32(data, crc), 0xEDB88320, "CRC-32"),
}


# --- CRC arithmetic -----------------------------------------------------------------------------


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
  """A GF(2) matrix (its 32 columns as bitmasks) times a 32-bit vector."""
  out, bit = 0, 0
  while vector:
    if vector & 1:
      out ^= matrix[bit]
    vector >>= 1
    bit += 1
  return out


@functools.lru_cache(maxsize=64)
def _crc_zeros(nbytes: int, polynomial: int) -> tuple[int, ...]:
  """The GF(2) operator that appends ``nbytes`` zero bytes to a CRC with the reflected
  ``polynomial``, as in zlib's ``crc32_combine``: the power of the one-zero-bit operator, by
  repeated squaring."""
  power = [polynomial] + [1 << k for k in range(31)]  # One zero bit.
  result = [1 << k for k in range(32)]
  bits = 8 * nbytes
  while bits:
    if bits & 1:
      result = [_gf2_times(power, column) for column in result]
    bits >>= 1
    if bits:
      power = [_gf2_times(power, column) for column in power]
  return tuple(result)


def crc_combine(crc1: int, crc2: int, len2: int, checksum: str = CHECKSUM) -> int:
  """The CRC of ``a + b`` from ``crc1`` of ``a``, ``crc2`` of ``b`` and ``len2 = len(b)``;
  ``checksum`` ``"crc32c"`` (Castagnoli) or ``"crc32"`` (zlib's)."""
  return _gf2_times(_crc_zeros(len2, _CHECKSUMS[checksum][1]), crc1) ^ crc2


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
  """zlib's ``crc32_combine``: CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)``, ``len(b)``."""
  return crc_combine(crc1, crc2, len2, "crc32")


def _crc_range(path: str, start: int, size: int, checksum: str) -> int:
  extend, crc = _CHECKSUMS[checksum][0], 0
  with open(path, "rb", buffering=0) as f:
    f.seek(start)
    while size > 0 and (data := f.read(min(size, _CRC_CHUNK))):
      crc = extend(crc, data)  # google-crc32c takes bytes, not views: one read, no other copy.
      size -= len(data)
  return crc


def _checksums(paths: Sequence[str], checksums: Sequence[str] | None = None) -> list[int]:
  """The CRC (``checksums[i]``, CRC-32C by default) of each file; files are cut into ranges
  whose reads overlap in threads, and the ranges' CRCs combined."""
  checksums = checksums or [CHECKSUM] * len(paths)
  tasks = []
  for i, path in enumerate(paths):
    size = os.path.getsize(path)
    tasks += [(i, path, start, min(_CRC_RANGE, size - start))
              for start in range(0, size, _CRC_RANGE)] or [(i, path, 0, 0)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)
                                             or 1) as pool:
    crcs = list(pool.map(lambda task: _crc_range(*task[1:], checksums[task[0]]), tasks))
  out = [0] * len(paths)
  for (i, _, _, size), crc in zip(tasks, crcs):
    out[i] = crc_combine(out[i], crc, size, checksums[i])
  return out


# --- Writing the manifest -----------------------------------------------------------------------


def _files(directory: str) -> list[str]:
  found = []
  for dirpath, _, filenames in os.walk(directory):
    for name in filenames:
      if not name.startswith(MANIFEST):
        found.append(os.path.relpath(os.path.join(dirpath, name), directory))
  return sorted(found)


def array_specs(tree: PyTree) -> dict[str, list] | None:
  """``{path: [shape, dtype name]}`` of the leaves of a tree as it is saved, for the manifest;
  None if a leaf has no plain numpy dtype (then readers ask Orbax's metadata)."""
  try:
    return {p: [list(shape), dtype.name] for p, (shape, dtype)
            in ((p, shape_dtype(leaf)) for p, leaf in flatten(to_nested_dict(tree)).items())}
  except TypeError:
    return None


def write_manifest(checkpoint_dir: str, arrays: dict[str, list] | None = None,
                   mesh: dict[str, int] | None = None, record: dict[str, Any] | None = None
                   ) -> None:
  """Records size and CRC-32C of every file of a finished checkpoint (atomically), the
  ``array_specs`` of what it holds if given (so reading its shapes takes one small file), the
  ``{axis: size}`` of the mesh it was saved from if given, and the run's ``record`` of the step
  if given (``fjt.checkpoint.run``: its config, data fingerprint and eval metrics)."""
  rels = _files(checkpoint_dir)
  paths = [os.path.join(checkpoint_dir, rel) for rel in rels]
  files = {rel: {"size": os.path.getsize(path), CHECKSUM: crc}
           for rel, path, crc in zip(rels, paths, _checksums(paths))}
  manifest = {"files": files}
  if arrays is not None:
    manifest["arrays"] = arrays
  if mesh is not None:
    manifest["mesh"] = mesh
  if record is not None:
    manifest["record"] = record
  tmp = os.path.join(checkpoint_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(checkpoint_dir, MANIFEST))


# --- Reading it ---------------------------------------------------------------------------------


def verify(checkpoint_dir: str, checksums: bool = True) -> bool:
  """Checks a checkpoint's files against its manifest; returns False if it has none.

  Sizes are compared first (a stat per file), then, if ``checksums``, the CRC-32C of every
  file (CRC-32 in older manifests), at about the cost of reading the checkpoint once.
  Raises ``CheckpointError`` naming the directory and the first bad file.
  """
  manifest_path = os.path.join(checkpoint_dir, MANIFEST)
  if not os.path.isfile(manifest_path):
    return False
  try:
    with open(manifest_path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"checkpoint {checkpoint_dir}: file {MANIFEST} is damaged ({e})") from e
  for rel, expected in files.items():
    full = os.path.join(checkpoint_dir, rel)
    if not os.path.isfile(full):
      raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} is missing")
    size = os.path.getsize(full)
    if size != expected["size"]:
      raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} has {size} bytes, "
                            f"{expected['size']} were written")
  if checksums:
    rels = list(files)
    kinds = [CHECKSUM if CHECKSUM in files[rel] else "crc32" for rel in rels]
    found = _checksums([os.path.join(checkpoint_dir, rel) for rel in rels], kinds)
    for rel, kind, crc in zip(rels, kinds, found):
      if crc != files[rel][kind]:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} has changed since it was "
                              f"written ({_CHECKSUMS[kind][2]} {crc:08x}, {files[rel][kind]:08x} "
                              "was written)")
  return True


def verify_or_say(checkpoint_dir: str) -> None:
  """``verify`` with checksums before a restore; a checkpoint without a manifest is read
  as it is, with one line saying its files are not verified (it is not sealed now: that
  would vouch for whatever happens to be on disk)."""
  if not verify(checkpoint_dir):
    say(f"checkpoint {checkpoint_dir} has no {MANIFEST}: its files are not verified")


@contextlib.contextmanager
def verifying(checkpoint_dir: str) -> Iterator[None]:
  """``verify_or_say`` in a background thread while the body reads the checkpoint.

  Sizes are checked first (a stat per file: a truncated file is named before anything is read);
  the CRC-32Cs then run beside the body, so a restore reads the files about once in wall time,
  not twice in a row. On leaving, the check is waited for: a damaged file raises its
  ``CheckpointError`` whatever the body returned or raised (the restored values are dropped),
  so every restore is still verified and a damaged file still named.
  """
  if not verify(checkpoint_dir, checksums=False):  # No manifest: said once, by verify_or_say.
    verify_or_say(checkpoint_dir)
    yield
    return
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fjt-verify") as pool:
    check = pool.submit(verify_or_say, checkpoint_dir)
    try:
      yield
    finally:
      check.result()  # Its error, if any, replaces the body's: the damaged file is the cause.


def manifest_shapes(checkpoint_dir: str) -> dict[str, jax.ShapeDtypeStruct] | None:
  """``{path: ShapeDtypeStruct}`` of the arrays the manifest lists (``array_specs``), or None
  if it lists none or cannot be read (then Orbax's metadata says)."""
  try:
    with open(os.path.join(checkpoint_dir, MANIFEST), encoding="utf-8") as f:
      arrays = json.load(f).get("arrays")
    if arrays is None:
      return None
    return {p: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
            for p, (shape, dtype) in arrays.items()}
  except (OSError, ValueError, TypeError):  # Absent, damaged or older: Orbax's metadata says.
    return None


def manifest_record(checkpoint_dir: str) -> dict[str, Any] | None:
  """The run's record of a checkpoint (``write_manifest``'s ``record``), or None if its manifest
  has none or cannot be read."""
  try:
    with open(os.path.join(checkpoint_dir, MANIFEST), encoding="utf-8") as f:
      record = json.load(f).get("record")
  except (OSError, ValueError, AttributeError):
    return None
  return record if isinstance(record, dict) else None


def manifest_mesh(checkpoint_dir: str) -> dict[str, int] | None:
  """``{axis: size}`` of the mesh the manifest says the checkpoint was saved from, or None."""
  try:
    with open(os.path.join(checkpoint_dir, MANIFEST), encoding="utf-8") as f:
      mesh = json.load(f).get("mesh")
  except (OSError, ValueError):
    return None
  return mesh if isinstance(mesh, dict) else None
