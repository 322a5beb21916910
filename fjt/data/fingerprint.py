"""What identifies the data a run was trained on, so that a resume, a re-evaluation or a tool
reading the run (``sample.py``, ``embeddings.py``) finds out when the data changed under it.

``data_fingerprint(config.data)`` is a flat ``{what: value}``: for a token folder the sizes of
``train.bin`` / ``val.bin`` and SHA-256s of ``meta.json`` and the tokenizer file; for the
standard-library corpus the Python version and a SHA-256 of its file list and docstrings (the
corpus differs between Python versions); for text files a SHA-256 of their names and contents;
for an ``.npz`` its SHA-256. The digits ship with scikit-learn and a registered loader of your own
has none (``{}``: nothing to compare). ``changes(old, new)`` says what differs, one phrase each.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable, Mapping
from typing import Any


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _tokens(path: str = "", vocab_size: int = 0, dtype: str = "", **_) -> dict[str, Any]:
  from fjt.data.tokens import _SPLIT_FILES, read_meta
  meta = read_meta(path, vocab_size, dtype)
  out = {f"{name} bytes": os.path.getsize(os.path.join(path, name))
         for name in _SPLIT_FILES.values() if os.path.isfile(os.path.join(path, name))}
  out.update({"vocab_size": meta.get("vocab_size"), "dtype": meta.get("dtype")})
  for name in ("meta.json", "meta.pkl"):  # fjt's meta, nanoGPT's, or none (config keys).
    if os.path.isfile(os.path.join(path, name)):
      out[f"{name} sha256"] = _sha256_file(os.path.join(path, name))
  tokenizer = os.path.join(path, meta.get("tokenizer", "tokenizer.json"))
  if os.path.isfile(tokenizer):
    out[f"{os.path.basename(tokenizer)} sha256"] = _sha256_file(tokenizer)
  return out


def _stdlib(**_) -> dict[str, Any]:
  from fjt.data.text import stdlib_docstring_texts
  digest = hashlib.sha256()
  files = stdlib_docstring_texts()  # Cached: the loader has read them.
  for path, docs in files:
    digest.update(path.encode() + b"\0" + "\0".join(docs).encode() + b"\0\0")
  return {"python": platform.python_version(), "stdlib files": len(files),
          "stdlib docstrings sha256": digest.hexdigest()}


def _text_files(paths=(), **_) -> dict[str, Any]:
  from fjt.data.text_files import find_files
  digest, files = hashlib.sha256(), find_files(paths)
  for name, path in files:
    digest.update(name.encode() + b"\0" + _sha256_file(path).encode())
  return {"text files": len(files), "text files sha256": digest.hexdigest()}


def _arrays(path: str = "", **_) -> dict[str, Any]:
  return {f"{os.path.basename(path)} sha256": _sha256_file(path)}


FINGERPRINTS: dict[str, Callable[..., dict[str, Any]]] = {
    "tokens": _tokens, "text": _stdlib, "text_files": _text_files, "arrays": _arrays}


def data_fingerprint(data: Mapping) -> dict[str, Any]:
  """The fingerprint of the dataset of ``config.data`` (its ``name`` and loader arguments)."""
  data = dict(data)
  compute = FINGERPRINTS.get(data.pop("name", None))
  try:
    return compute(**data) if compute else {}
  except (OSError, ValueError):  # The loader names what is missing or unreadable.
    return {}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """``"what old -> new"`` for each entry that differs (hashes shortened to 12 digits)."""
  show = lambda v: "(absent)" if v is None else (v[:12] if isinstance(v, str) and len(v) == 64
                                                 else str(v))
  return [f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)]
