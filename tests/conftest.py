import os
import sys

import jax
import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests that compare against numpy or another path exactly need full float32 matmuls, which is
# the CPU's default but not a GPU's (TF32). Determinism (config.deterministic, on by default)
# is set per run by fjt; subprocess tests that need the CPU set JAX_PLATFORMS=cpu themselves.
jax.config.update("jax_default_matmul_precision", "highest")


def tiny_digits_config(model: str = "mlp", steps: int = 30) -> ml_collections.ConfigDict:
  """A digits config small enough to train in a second on a CPU."""
  from fjt.config import load_config
  config = load_config(os.path.join(ROOT, "configs", f"digits_{model}.py"))
  config.train.steps = steps
  config.train.eval_every = steps
  config.train.log_every = 10
  config.optimizer.warmup_steps = 2
  if model == "mlp":
    config.model.features = (32,)
  else:
    config.model.features = (8, 16)
    config.model.dense_features = ()
  return config


@pytest.fixture
def tiny_config():
  return tiny_digits_config


def pytest_terminal_summary(terminalreporter):
  """One line per reason for the tests that were skipped (e.g. an optional extra not installed),
  so that "3 skipped" never hides what did not run."""
  import collections
  reasons = collections.Counter()
  for report in terminalreporter.stats.get("skipped", []):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reasons[reason.removeprefix("Skipped: ")] += 1
  for reason, count in sorted(reasons.items()):
    terminalreporter.write_line(f"skipped {count}: {reason}")
