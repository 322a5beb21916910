"""Your own text: next-word prediction on folders of ``.txt``/``.md``/``.rst`` files.

The same word tokenisation, vocabulary and windows as the standard-library corpus
(``fjt.data.text``); each file is one document, in validation by a hash of its path relative
to the argument that named it (so the split survives moving the folder). A file's source
(``replicas.split = "by_source"``) is the first component of that relative path: its top-level
folder, or the file's name without extension.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from fjt.data import text
from fjt.data.dataset import Dataset

SUFFIXES = (".txt", ".md", ".rst")


def find_files(paths: Sequence[str]) -> list[tuple[str, str]]:
  """``[(relative_name, file_path), ...]`` for ``paths`` (files, folders searched recursively
  for ``SUFFIXES``, or glob patterns), sorted by name, each file once. A file named directly or
  by a glob is read whatever its suffix."""
  if isinstance(paths, str):
    paths = (paths,)
  found = {}
  for pattern in paths:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
      raise ValueError(f"config key 'data.paths': {pattern!r} matches no file or folder")
    for match in matches:
      if os.path.isdir(match):
        for dirpath, dirnames, filenames in os.walk(match):
          dirnames.sort()
          for name in sorted(filenames):
            if name.endswith(SUFFIXES):
              path = os.path.join(dirpath, name)
              found.setdefault(os.path.relpath(path, match).replace(os.sep, "/"), path)
      else:
        found.setdefault(os.path.basename(match), match)
  if not found:
    raise ValueError(f"config key 'data.paths': no {'/'.join(SUFFIXES)} files under {list(paths)}")
  return sorted(found.items())


def load(paths: Sequence[str] = (), vocab_size: int = 5000, context: int = 4,
         validation_percent: int = 10, block_size: int = 0, eval_stride: int = 0) -> Dataset:
  """Windows of ``context`` words -> next word over the text files of ``paths``; with
  ``block_size``, blocks of a token stream for a GPT (``fjt.data.text.window_dataset``).

  When the hash puts no file in validation (a handful of files), the file with the smallest
  hash goes there, so both splits exist whenever there are two files.
  """
  if not paths:
    raise ValueError("config key 'data.paths': dataset 'text_files' needs files, folders or globs")
  files = []
  for name, path in find_files(paths):
    try:
      with open(path, encoding="utf-8") as f:
        tokens = text.tokenize(f.read())
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"config key 'data.paths': cannot read {path!r} as UTF-8 text: {e}") from e
    if tokens:
      files.append((name, (tokens,)))
  if len(files) < 2:
    raise ValueError(f"config key 'data.paths': {len(files)} file(s) with words under "
                     f"{list(paths)}; need at least 2 (one for validation)")
  in_validation = [text.is_validation_file(name, validation_percent) for name, _ in files]
  if all(in_validation) or not any(in_validation):
    smallest = min(range(len(files)), key=lambda i: text.file_hash(files[i][0]))
    in_validation = [i == smallest for i in range(len(files))]
  renamed = [(("val/" if v else "train/") + name, docs) for (name, docs), v in
             zip(files, in_validation)]
  dataset = text.window_dataset(renamed, vocab_size, context,
                                validation_percent=0, is_validation=lambda n: n.startswith("val/"),
                                block_size=block_size, eval_stride=eval_stride,
                                source_of=lambda n: text.source_name(n.partition("/")[2]))
  dataset.info["files"] = {"train": in_validation.count(False), "validation": in_validation.count(True)}
  return dataset
