"""A workdir remembers its config; settings are checked before any work; one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fjt
from conftest import ROOT, tiny_digits_config
from fjt import runs

TRAIN = os.path.join(ROOT, "scripts", "train.py")
CONFIG = os.path.join(ROOT, "configs", "digits_mlp.py")
TINY = ("--config.model.features=(16,)", "--config.optimizer.warmup_steps=2",
        "--config.train.log_every=10")


def train_cli(workdir, *overrides, config=CONFIG):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, TRAIN, "--config", config, "--workdir", str(workdir),
                           *TINY, *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def test_a_rerun_is_refused_continued_or_allowed_by_what_changed(tmp_path, capfd):
  config = tiny_digits_config("mlp", steps=20)
  fjt.fit(config, str(tmp_path), progress=False)
  record = (tmp_path / "config.json").read_bytes()
  capfd.readouterr()

  changed = tiny_digits_config("mlp", steps=20)
  changed.optimizer.learning_rate = 0.5
  changed.model.features = (64,)
  with pytest.raises(runs.RunConfigChangedError) as info:
    fjt.fit(changed, str(tmp_path), progress=False)
  message = str(info.value)
  assert "model.features [32] -> [64]; optimizer.learning_rate 0.05 -> 0.5." in message
  assert f"--restart to move this run aside (to {tmp_path}.previous-1)" in message
  assert "\n" not in message
  assert (tmp_path / "config.json").read_bytes() == record  # The record is not overwritten.

  neutral = tiny_digits_config("mlp", steps=20)
  neutral.train.log_every = 5
  neutral.train.eval_batch_size = 100
  neutral.checkpoint.max_to_keep = 3
  _, summary = fjt.fit(neutral, str(tmp_path), progress=False)
  assert summary["step"] == 20
  assert capfd.readouterr().err.splitlines() == [
      f"fjt: the run finished at step 20 (checkpoint {tmp_path}/checkpoints/20); evaluating it "
      "again (raise --config.train.steps to train on)"]

  longer = tiny_digits_config("mlp", steps=30)
  state, summary = fjt.fit(longer, str(tmp_path), progress=False)
  assert summary["step"] == int(state.step) == 30
  assert capfd.readouterr().err.splitlines() == [
      f"fjt: resuming from step 20 (checkpoint {tmp_path}/checkpoints/20)",
      "fjt: train.steps raised from 20 to 30: the run continues from step 20, the learning-rate "
      "schedule now that of 30 steps"]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == [10, 20, 30]
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 30

  shorter = tiny_digits_config("mlp", steps=10)
  with pytest.raises(runs.RunConfigChangedError, match="train.steps 30 -> 10"):
    fjt.fit(shorter, str(tmp_path), progress=False)

  aside = runs.restart(str(tmp_path))
  assert aside == f"{tmp_path}.previous-1" and not os.path.exists(tmp_path)
  assert sorted(os.listdir(aside)) and os.path.isdir(os.path.join(aside, "checkpoints", "30"))
  _, summary = fjt.fit(changed, str(tmp_path), progress=False)
  assert summary["step"] == 20


def test_a_killed_run_before_its_first_save_protects_nothing(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"seed": 5}))
  assert runs.check_rerun(str(tmp_path), tiny_digits_config(), has_results=False) == []


def test_a_record_written_before_a_new_default_key_still_matches(tmp_path):
  config = tiny_digits_config()
  record = runs.as_record(config)
  del record["deterministic"], record["matmul_precision"]  # Written before these keys existed.
  (tmp_path / "config.json").write_text(json.dumps(record))
  assert runs.check_rerun(str(tmp_path), config, has_results=True) == []
  config.matmul_precision = "highest"  # Not the default: a change.
  with pytest.raises(runs.RunConfigChangedError, match='matmul_precision \\(absent\\) -> "highest"'):
    runs.check_rerun(str(tmp_path), config, has_results=True)


def test_the_progress_rate_leaves_out_the_first_steps_compile_time():
  from tqdm import tqdm
  import io
  out = io.StringIO()
  with tqdm(total=100, file=out, smoothing=0) as bar:
    bar.start_t -= 60  # The first step compiled for a minute.
    fjt.train._count_first_step(bar)
    assert bar.n == 1 and bar.format_dict["rate"] is None  # Shown as ?step/s, no ETA.
    bar.start_t -= 1  # Then 10 steps in a second.
    bar.update(10)
    assert bar.n == 11 and 9 < 10 / bar.format_dict["elapsed"] <= 10  # Not 11 per minute.
  assert out.getvalue().endswith("\n")  # Closed with its line ended, so what follows is not glued.


def test_config_changes_name_absent_keys_and_neutral_groups():
  changes = runs.config_changes({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"b": 2, "c": [1, 2]}})
  assert list(map(str, changes)) == ["a.b 1 -> 2", "d 1 -> (absent)"]
  assert runs.result_neutral("checkpoint.every_steps") and runs.result_neutral("train.log_every")
  assert not runs.result_neutral("train.steps") and not runs.result_neutral("train.batch_size")


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, sys.argv[1]); from fjt.runs import WorkdirLock\n"
      "WorkdirLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"),
      ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "locked\n"
  with pytest.raises(runs.WorkdirInUseError,
                     match=f"workdir {tmp_path} is in use by another run \\(pid {holder.pid}\\)"):
    runs.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  runs.WorkdirLock(str(tmp_path)).acquire().release()  # A killed holder's lock is gone.


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_finishes(tmp_path):
  # Long enough that the second process (a fresh interpreter importing jax) starts well before
  # the first one finishes: with 400 steps a fast machine finished first.
  first = train_cli(tmp_path, "--config.train.steps=2000", "--config.train.eval_every=2000",
                    "--config.checkpoint.every_steps=500")
  deadline = time.time() + 120
  while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
    time.sleep(0.05)  # The first run holds the lock and is training.
  assert first.poll() is None
  out, err = train_cli(tmp_path, "--config.train.steps=2000").communicate(timeout=120)
  assert err.strip().splitlines() == [
      f"error: workdir {tmp_path} is in use by another run (pid {first.pid}); wait for it to "
      "finish or use another --workdir"]
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert "step 2000" in out
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(10, 2001, 10))


def with_key(key, value):
  config = tiny_digits_config("mlp", steps=5)
  group, _, name = key.rpartition(".")
  (config[group] if group else config)[name] = value
  return config


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", -0.1,
     "config key 'optimizer.learning_rate': expected a finite number > 0 that fits float32, got -0.1"),
    ("optimizer.momentum", 1.0, "config key 'optimizer.momentum': expected a number in [0, 1), "
     "got 1.0"),
    ("train.log_every", 0, "config key 'train.log_every': expected a positive int, got 0"),
    ("train.eval_batch_size", 0,
     "config key 'train.eval_batch_size': expected a positive int, got 0"),
    ("model.features", (0,), "config key 'model.features': expected positive ints (layer "
     "widths), got (0,)"),
    ("checkpoint.best_metric", "nonexistent",
     "config key 'checkpoint.best_metric': 'nonexistent' is not a metric of task "
     "'classification'"),
    ("checkpoint.max_to_keep", -1, "config key 'checkpoint.max_to_keep': expected a positive "
     "int (a run never deletes its last checkpoint), got -1"),
    ("matmul_precision", "tf32",
     "config key 'matmul_precision': expected 'default', 'high' or 'highest', got 'tf32'"),
])
def test_bad_settings_are_refused_before_training(tmp_path, key, value, message):
  with pytest.raises(fjt.ConfigError) as info:
    fjt.fit(with_key(key, value), str(tmp_path), progress=False)
  assert message in str(info.value) and "\n" not in str(info.value)
  assert not os.listdir(tmp_path / "checkpoints") if os.path.isdir(tmp_path / "checkpoints") \
      else True


def test_an_unwritable_checkpoints_directory_is_found_before_training(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(fjt.ConfigError, match=f"directory '{tmp_path}/checkpoints' is not "
                                            "writable: File exists; fix its permissions"):
    fjt.fit(tiny_digits_config("mlp", steps=5), str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  from fjt import checkpoint
  config = tiny_digits_config("mlp", steps=30)
  config.checkpoint.every_steps = 10
  config.train.log_every = 1
  steps_done = []
  real_save = checkpoint.RunCheckpointer.save

  def full_disk_at_10(self, step, state, metrics=None):
    if step == 10:
      def fail():
        self._error = OSError(28, "No space left on device")
      import threading
      self._worker = threading.Thread(target=fail)
      self._worker.start()
      return
    real_save(self, step, state, metrics)

  monkeypatch.setattr(checkpoint.RunCheckpointer, "save", full_disk_at_10)
  real_write = fjt.logs.MetricWriter.write
  monkeypatch.setattr(fjt.logs.MetricWriter, "write", lambda self, step, split, m:
                      steps_done.append(step) or real_write(self, step, split, m))
  with pytest.raises(fjt.checkpoint.CheckpointError) as info:
    fjt.fit(config, str(tmp_path), progress=False)
  assert str(info.value).startswith(f"saving a checkpoint under {tmp_path}/checkpoints failed: "
                                    "No space left on device (OSError). Free disk")
  assert max(steps_done) <= 12  # Not at the next save (step 20).


def test_save_errors_name_the_step_and_the_os_error():
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file '
                     '"/w/checkpoints/60.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/": '
                     "Failed to write 193186 bytes to file 19: No space left on device "
                     "[os_error_code='28']")
  assert fjt.train.save_error_line("/w/checkpoints", error) == (
      "saving step 60 under /w/checkpoints failed: No space left on device (ValueError). Free "
      "disk space or fix the directory's permissions, then run the same command to resume from "
      "the last saved step")


def test_cli_one_line_errors_for_a_raising_get_config_and_a_negative_learning_rate(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  raise KeyError('oops')\n")
  for config, overrides, expected in [
      (str(broken), (), f"error: get_config() in '{broken}' raised KeyError: 'oops'"),
      (CONFIG, ("--config.optimizer.learning_rate=-0.05",),
       "error: config key 'optimizer.learning_rate': expected a finite number > 0 that fits float32, got -0.05")]:
    process = train_cli(tmp_path / "run", *overrides, config=config)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.strip().splitlines() == [expected]
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_request_determinism_sets_the_xla_flag_before_jax_starts():
  code = ("import os, sys; sys.path.insert(0, sys.argv[1]); os.environ.pop('XLA_FLAGS', None)\n"
          "from fjt import accelerators; accelerators.request_determinism(True)\n"
          "accelerators.request_determinism(True); print(os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "--xla_gpu_deterministic_ops=true"


def test_matmul_precision_is_set_around_a_run():
  import jax
  with fjt.accelerators.precision("highest"):
    assert jax.config.jax_default_matmul_precision == "highest"
  with fjt.accelerators.precision("default"):
    assert jax.config.jax_default_matmul_precision in (None, "highest")  # conftest's, if set.


def test_a_second_signal_exits_at_once_without_saving():
  code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1])\n"
          "from fjt.preemption import StopSignals\n"
          "with StopSignals() as stop:\n"
          "  os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5)\n"
          "  print(stop.requested(7), stop.signal_name, flush=True)\n"
          "  os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('not reached')\n")
  result = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 128 + signal.SIGTERM
  assert result.stdout == "True SIGINT\n"
  assert result.stderr.splitlines() == [
      "fjt: SIGINT received: finishing the current step and saving it (send it again to exit "
      "at once)", "fjt: second signal (SIGTERM): exiting at once, without saving"]


@pytest.fixture
def small_disk(tmp_path):
  """``mount(options, directory=None) -> directory``: a tmpfs mounted with ``options`` (e.g.
  ``size=4m``, ``ro``) on a new directory, unmounted afterwards; the test is skipped where mounting is not allowed (not root)."""
  mounted = []

  def mount(options, directory=None):
    directory = directory or tmp_path / f"disk{len(mounted)}"
    directory.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                      capture_output=True).returncode:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    mounted.append(directory)
    return directory

  yield mount
  for directory in mounted:
    subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_and_a_read_only_checkpoints_directory_are_one_line_each(small_disk):
  full = small_disk("size=4m")  # Two checkpoints of the digits MLP fit; the third does not.
  process = train_cli(full / "run", "--config.model.features=(256, 256)",
                      "--config.train.steps=200", "--config.checkpoint.every_steps=20",
                      "--config.checkpoint.max_to_keep=10")
  _, err = process.communicate(timeout=300)
  said = [line for line in err.replace("\r", "\n").splitlines()
          if line.strip() and not line.startswith("train:")]
  assert process.returncode == 1 and len(said) == 1, err[-3000:]
  assert said[0].startswith("error: saving step ") and said[0].endswith(
      "failed: No space left on device (ValueError). Free disk space or fix the directory's "
      "permissions, then run the same command to resume from the last saved step")
  workdir = full.parent / "run"
  small_disk("ro", workdir / "checkpoints")  # The workdir is writable, its checkpoints/ not.
  process = train_cli(workdir, "--config.train.steps=20")
  _, err = process.communicate(timeout=120)
  assert process.returncode == 2 and err.strip().splitlines() == [
      f"error: directory '{workdir}/checkpoints' is not writable: Read-only file system; fix "
      "its permissions or use another --workdir"]
  assert not os.path.exists(workdir / "metrics.jsonl")  # Found before training.
