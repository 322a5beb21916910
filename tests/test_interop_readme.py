"""The README's PyTorch interop round trips (ResNet-18, GPT-2) run as written."""

import os
import re

import pytest

pytest.importorskip("torch", reason="interop tests need PyTorch (the interop extra)")


def readme_interop_round_trips() -> list[str]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    text = f.read()
  section = text[text.index("## PyTorch interop"):]
  section = section[:section.index("\n## ", 1)]
  return [block for block in re.findall(r"```python\n(.*?)```", section, re.S)
          if "like=report" in block]


def test_readme_resnet_and_gpt2_round_trips_run(capsys):
  blocks = readme_interop_round_trips()
  assert len(blocks) == 2 and "ResNet18" in blocks[0] and "GPT2LMHeadModel" in blocks[1]
  pytest.importorskip("transformers", reason="the README's GPT-2 round trip")
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  printed = capsys.readouterr().out.split("\n")
  assert printed[0] == "params/BasicBlock_2/Conv_2/kernel"
  assert float(printed[1]) < 1e-4 and float(printed[3]) < 1e-4
  assert printed[2] == "{'lm_head.weight': 'transformer.wte.weight'}"
