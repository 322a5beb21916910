"""The README is a tested document: every Python snippet in it runs as pasted.

Each ```python block is a complete program, run in a fresh interpreter whose working directory
holds the repository's `configs/` and `scripts/` (so what a snippet writes lands in a temporary
`runs/`). A block preceded by `<!-- readme-test: skip (why) -->` is not run here (it needs a GPU,
a long training run or a download); the reason is in the README beside it.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\s*)?```python\n(.*?)```", re.S)


def _missing_extras(code: str) -> list[str]:
  """The optional packages (``torch``, ``transformers``) a block imports that are not installed."""
  imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M))
  imported |= {name for line in re.findall(r"^\s*import\s+(.+)$", code, re.M)
               for name in re.findall(r"\w+", line)}
  return [name for name in ("torch", "transformers")
          if name in imported and importlib.util.find_spec(name) is None]


def python_blocks():
  text = open(README, encoding="utf-8").read()
  for match in BLOCK.finditer(text):
    line = text[:match.start(2)].count("\n")
    marks = []
    if match.group(1):
      marks.append(pytest.mark.skip(reason="marked skip in the README"))
    elif missing := _missing_extras(match.group(2)):
      marks.append(pytest.mark.skip(
          reason=f"README blocks that use {' and '.join(missing)} need the interop extra"))
    yield pytest.param(match.group(2), id=f"line{line}", marks=marks)


@pytest.mark.parametrize("code", list(python_blocks()))
def test_readme_python_block_runs(code, tmp_path):
  for name in ("configs", "scripts"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  (tmp_path / "runs").mkdir()
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
