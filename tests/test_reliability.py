"""Nothing lost, nothing hung, nothing silently wrong: full disks, kills at resume, the best
checkpoint across resumes, non-finite states and metrics, damaged logs, changed data."""

import errno
import json
import os

import jax
import numpy as np
import pytest

import fjt
from conftest import tiny_digits_config
from fjt import checkpoint, cli, preemption
from fjt.checks import NonFiniteLossError
from fjt.config import ConfigError
from fjt.files import write_atomic
from fjt.logs import LogWriteError
from test_checkpoint import assert_trees_equal


def full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def config(steps=30, every=10):
  c = tiny_digits_config("mlp", steps)
  c.train.eval_every = every
  c.checkpoint.every_steps = every
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 30-step run (checkpoints every 10, best step by lowest accuracy: step 10) and its state."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  state, summary = fjt.fit(best_config(), workdir, progress=False)
  return workdir, state, summary


def best_config():
  c = config()
  c.checkpoint.max_to_keep = 1
  c.checkpoint.best_metric, c.checkpoint.best_mode = "accuracy", "min"  # Step 10: the worst.
  return c


def stop_at(monkeypatch, step):
  """SIGTERM as the loop sees it, after ``step``."""
  monkeypatch.setattr(preemption.StopSignals, "requested",
                      lambda self, done: done == step and setattr(self, "signal_name", "SIGTERM")
                      is None)


def test_write_atomic_leaves_the_old_file_on_a_full_disk(tmp_path):
  path = tmp_path / "summary.json"
  write_atomic(path, "old")

  def half_then_full(f):
    f.write(b"new, half written")
    full_disk()
  with pytest.raises(OSError, match=rf"No space left on device \(writing {path}\)"):
    write_atomic(path, half_then_full)
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_failing_log_sink_stops_cleanly_and_the_rerun_ends_bitwise_equal(
    tmp_path, monkeypatch, uninterrupted):
  """The TensorBoard writer's disk fills at step 20: one line, exit 1, checkpoint 10 intact; the
  rerun resumes from it and ends as the uninterrupted run did."""
  real = fjt.logs._EventFile.add_scalars
  monkeypatch.setattr(fjt.logs._EventFile, "add_scalars", lambda self, prefix, metrics, step:
                      full_disk() if step == 20 else real(self, prefix, metrics, step))
  with pytest.raises(LogWriteError) as info:
    fjt.fit(best_config(), str(tmp_path), progress=False)
  assert cli.exit_code(info.value) == 1
  assert str(info.value) == (
      f"writing {tmp_path}/events.out.tfevents.* failed: No space left on device (OSError); the "
      "checkpoints already saved are complete: free disk space, then run the same command to "
      "resume from the last saved step")
  assert [s for s, _ in checkpoint.step_dirs(str(tmp_path / "checkpoints"))] == [10]
  monkeypatch.undo()
  state, summary = fjt.fit(best_config(), str(tmp_path), progress=False)
  assert_trees_equal(state, uninterrupted[1])
  assert summary == uninterrupted[2]


def test_best_step_survives_two_resumes_and_a_damaged_metrics_line(tmp_path, monkeypatch,
                                                                   uninterrupted, capsys):
  workdir = str(tmp_path)
  for step in (10, 20):  # Stopped twice, as by SIGTERM: each rerun resumes.
    stop_at(monkeypatch, step)
    with pytest.raises(preemption.StoppedBySignal) as info:
      fjt.fit(best_config(), workdir, progress=False)
    assert cli.exit_code(info.value) == 4
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write("garbage\n")
  monkeypatch.undo()
  state, summary = fjt.fit(best_config(), workdir, progress=False)
  kept = lambda w: [s for s, _ in checkpoint.step_dirs(os.path.join(w, "checkpoints"))]
  assert kept(workdir) == kept(uninterrupted[0]) == [10, 30]
  assert_trees_equal(state, uninterrupted[1])
  assert (tmp_path / "metrics.jsonl.damaged").read_text() == "garbage\n"
  assert "line(s) that are not metrics rows (first: line" in capsys.readouterr().err


def test_a_torn_config_json_is_recovered_from_the_newest_checkpoint(tmp_path, capsys):
  c = config(steps=20)
  fjt.fit(c, str(tmp_path), progress=False)
  (tmp_path / "config.json").write_text("")  # What a kill mid-write used to leave.
  _, summary = fjt.fit(c, str(tmp_path), progress=False)  # Finished: evaluated again.
  assert summary["step"] == 20
  err = capsys.readouterr().err
  assert (f"fjt: {tmp_path}/config.json is unreadable (Expecting value: line 1 column 1 (char 0));"
          f" using the config recorded in checkpoint {tmp_path}/checkpoints/20\n") in err
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 20
  (tmp_path / "config.json").write_text("{")
  c.seed = 7  # The recovered record still protects the run.
  with pytest.raises(ConfigError, match=r"different config: seed 0 -> 7\."):
    fjt.fit(c, str(tmp_path), progress=False)


@pytest.mark.parametrize("key, value, line", [
    ("optimizer.learning_rate", 1e39, "config key 'optimizer.learning_rate': 1e+39 overflows "
     "float32 (largest 3.403e+38)"),
    ("optimizer.weight_decay", 1e39, "config key 'optimizer.weight_decay': 1e+39 overflows "
     "float32 (largest 3.403e+38)"),
])
def test_floats_that_overflow_float32_are_refused_up_front(tmp_path, key, value, line):
  c = config()
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError) as info:
    fjt.fit(c, str(tmp_path), progress=False)
  assert str(info.value) == line and cli.exit_code(info.value) == 2
  assert not os.path.exists(tmp_path / "checkpoints" / "10")


def test_a_non_finite_state_is_never_saved_and_never_exits_0(tmp_path):
  """A loss that is finite (0) with a NaN gradient: the loss check passes, the state does not."""
  c = config(steps=1, every=1)
  c.optimizer.schedule, c.checkpoint.best_metric = "constant", ""
  loss_fn = lambda outputs, batch: jax.numpy.sqrt(jax.numpy.abs(0.0 * outputs).sum())
  with pytest.raises(NonFiniteLossError) as info:
    fjt.fit(c, str(tmp_path), task=loss_fn, progress=False)
  assert cli.exit_code(info.value) == 1
  assert str(info.value).startswith("the state is not finite at step 1: ")
  assert str(info.value).endswith("; lower optimizer.learning_rate or set "
                                  "optimizer.grad_clip_norm")
  assert checkpoint.step_dirs(str(tmp_path / "checkpoints")) == []


def test_a_non_finite_eval_metric_is_an_error_naming_the_split(tmp_path):
  dataset = fjt.data.load_dataset(config().data)
  x = np.array(dataset.test["x"], dtype=np.float32)
  x[3] = np.nan
  dataset.test["x"] = x
  with pytest.raises(NonFiniteLossError) as info:
    fjt.fit(config(steps=10), str(tmp_path), dataset=dataset, progress=False)
  assert cli.exit_code(info.value) == 1
  assert str(info.value).startswith("evaluation on the validation split at step 10 is not "
                                    "finite: loss nan, ema_loss nan; check the split's data")


def test_dropout_rate_outside_0_1_is_refused(tmp_path):
  c = tiny_digits_config("mlp", 10)
  c.model.dropout_rate = 2.0
  with pytest.raises(ConfigError, match=r"^config key 'model.dropout_rate': expected a number in "
                                        r"\[0, 1\), got 2.0$"):
    fjt.fit(c, str(tmp_path), progress=False)
