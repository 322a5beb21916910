"""Checkpoint integrity: every restore checks the manifest's sizes and CRC-32s; a checkpoint
without a manifest is reported, never sealed after the fact; ``save`` replaces atomically."""

import functools
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fjt
from conftest import ROOT
from fjt import checkpoint, merge
from fjt.checkpoint import CheckpointError, MANIFEST


def tree(value: float = 0.0):
  """A small train-state-like tree: variables plus optimizer state, step and rng."""
  w = np.arange(4096, dtype=np.float32).reshape(64, 64) / 64 + value
  return {"params": {"Dense_0": {"kernel": w, "bias": np.full(64, value, np.float32)}},
          "batch_stats": {"BatchNorm_0": {"mean": np.ones(64, np.float32)}},
          "opt_state": {"mu": np.zeros((64, 64), np.float32)}, "step": np.int32(7),
          "rng": np.zeros(2, np.uint32)}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def flip_a_byte(checkpoint_dir) -> str:
  """Flips one bit in the middle of the largest data file (same size); returns its path
  relative to ``checkpoint_dir``."""
  files = glob.glob(os.path.join(checkpoint_dir, "**", "d", "*"), recursive=True)
  victim = max(files, key=os.path.getsize)
  middle = os.path.getsize(victim) // 2
  with open(victim, "r+b") as f:
    f.seek(middle)
    byte = f.read(1)[0]
    f.seek(middle)
    f.write(bytes([byte ^ 0x10]))
  return os.path.relpath(victim, checkpoint_dir)


def test_a_bit_flip_is_named_by_every_load(tmp_path, monkeypatch):
  path = str(tmp_path / "c")
  checkpoint.save(path, tree())
  rel = flip_a_byte(path)
  size = sum(os.path.getsize(p) for p in glob.glob(f"{path}/**/*", recursive=True)
             if os.path.isfile(p))
  message = f"checkpoint {path}: file {rel} has changed since it was written (CRC-32 "
  for read in (checkpoint.load, checkpoint.load_variables, lambda p: checkpoint.load(p, tree()),
               lambda p: merge.average_checkpoints([p, p], str(tmp_path / "avg"), progress=False)):
    with pytest.raises(CheckpointError) as info:
      read(path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "avg")
  assert size == sum(os.path.getsize(p) for p in glob.glob(f"{path}/**/*", recursive=True)
                     if os.path.isfile(p))
  # What the checksums catch: without them the flipped bit loads without a word.
  monkeypatch.setattr(checkpoint.integrity, "verify",
                      functools.partial(checkpoint.verify, checksums=False))
  loaded = checkpoint.load(path)
  differ = [p for p, a in fjt.tree.flatten(loaded).items()
            if not np.array_equal(a, fjt.tree.flatten(tree())[p])]
  assert len(differ) == 1  # One leaf, silently off.


def test_a_damaged_file_that_breaks_orbaxs_read_is_named_not_orbaxs_error(tmp_path):
  # The CRC-32s are checked before Orbax's read: when that read would fail on the damaged file
  # as well, the error is still the one naming the file.
  path = str(tmp_path / "c")
  checkpoint.save(path, tree())
  metadata = os.path.join(path, "_METADATA")
  with open(metadata, "r+b") as f:
    f.write(b"\xff" * os.path.getsize(metadata))
  message = f"checkpoint {path}: file _METADATA has changed since it was written (CRC-32 "
  for read in (checkpoint.load, checkpoint.load_variables, lambda p: checkpoint.load(p, tree())):
    with pytest.raises(CheckpointError) as info:
      read(path)
    assert str(info.value).startswith(message)


def test_a_checkpoint_without_manifest_is_reported_not_sealed(tmp_path, capsys):
  path = tmp_path / "c"
  checkpoint.save(path, tree())
  os.remove(path / MANIFEST)
  assert_trees_equal(checkpoint.load(path), tree())
  err = capsys.readouterr().err
  assert err == f"fjt: checkpoint {path} has no {MANIFEST}: its files are not verified\n"
  assert not os.path.exists(path / MANIFEST)


def run_with_steps(workdir, steps=(1, 2)):
  run = checkpoint.RunCheckpointer(str(workdir), max_to_keep=len(steps))
  for step in steps:
    run.save(step, tree(step))
  run.close()
  return checkpoint.RunCheckpointer(str(workdir), max_to_keep=len(steps))


def step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def test_resume_names_a_bit_flip_and_falls_back_in_one_line(tmp_path, capsys):
  run = run_with_steps(tmp_path)
  newest = step_dir(tmp_path, 2)
  rel = flip_a_byte(newest)
  with pytest.raises(CheckpointError) as info:
    run.restore_latest(tree())
  message = str(info.value)
  assert message.startswith(f"checkpoint {newest}: file {rel} has changed since it was written")
  assert "--config.checkpoint.fallback=True" in message and "\n" not in message
  assert os.path.isdir(newest)  # Nothing moved without fallback.
  capsys.readouterr()
  state, step = run.restore_latest(tree(), fallback=True)
  run.close()
  assert step == 1
  assert_trees_equal(state, tree(1))
  aside = os.path.join(tmp_path, "checkpoints", "damaged-2")
  assert capsys.readouterr().err == (f"fjt: checkpoint {newest}: file {rel} has changed since it "
                                     f"was written ({message.split('(')[1].split(')')[0]}); moved "
                                     f"it to {aside}, trying the previous step\n")
  assert os.path.isdir(aside)


def test_resume_does_not_seal_a_step_whose_manifest_is_gone(tmp_path, capsys):
  run = run_with_steps(tmp_path)
  newest = step_dir(tmp_path, 2)
  os.remove(os.path.join(newest, MANIFEST))
  with pytest.raises(CheckpointError, match=f"^checkpoint {newest}: file {MANIFEST} is missing, so "
                                            "its files cannot be verified. To resume"):
    run.restore_latest(tree())
  assert not os.path.exists(os.path.join(newest, MANIFEST))  # Not re-sealed.
  state, step = run.restore_latest(tree(), fallback=True)
  run.close()
  assert step == 1 and os.path.isdir(os.path.join(tmp_path, "checkpoints", "damaged-2"))
  assert "file fjt_manifest.json is missing" in capsys.readouterr().err


def test_a_step_killed_before_its_seal_is_set_aside(tmp_path, monkeypatch, capsys):
  run_with_steps(tmp_path, steps=(1,))
  newest = step_dir(tmp_path, 2)

  def killed(*args, **kwargs):  # As a run killed between Orbax's rename and the manifest.
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint.integrity, "write_manifest", killed)
  run = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=2)
  run.save(2, tree(2))
  with pytest.raises(KeyboardInterrupt):
    run.close()
  monkeypatch.undo()
  assert os.path.isdir(newest) and not os.path.exists(os.path.join(newest, MANIFEST))
  run = checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=2)
  state, step = run.restore_latest(tree())
  run.close()
  assert step == 1
  aside = os.path.join(tmp_path, "checkpoints", "unsealed-2")
  assert capsys.readouterr().err == (f"fjt: checkpoint {newest} was never sealed (the run was "
                                     f"killed while saving it); moved it to {aside}, trying the "
                                     "previous step\n")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "unsealed-2"]


def test_fallback_keeps_earlier_damaged_steps_and_says_when_none_is_left(tmp_path, capsys):
  run = run_with_steps(tmp_path)
  os.makedirs(tmp_path / "checkpoints" / "damaged-2")  # From an earlier fallback.
  for step in (1, 2):
    flip_a_byte(step_dir(tmp_path, step))
  target = tree(5)
  state, step = run.restore_latest(target, fallback=True)
  run.close()
  assert step == 0 and state is target
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["damaged-1", "damaged-2", "damaged-2-2"]
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 3 and all(line.startswith("fjt: ") for line in lines)
  assert lines[-1] == f"fjt: no step under {tmp_path}/checkpoints reads cleanly; training from step 0"


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_max_to_keep_below_one_is_a_config_error(tmp_path, value):
  with pytest.raises(fjt.ConfigError) as info:
    checkpoint.RunCheckpointer(str(tmp_path), max_to_keep=value)
  assert str(info.value) == ("config key 'checkpoint.max_to_keep': expected a positive int (a run "
                             f"never deletes its last checkpoint), got {value!r}")


def test_loading_a_run_onto_variables_takes_its_variables(tmp_path):
  checkpoint.save(tmp_path / "run", tree())
  target = {"params": jax.tree.map(jnp.zeros_like, tree()["params"]),
            "batch_stats": jax.tree.map(jnp.zeros_like, tree()["batch_stats"])}
  variables, report = checkpoint.load(tmp_path / "run", target, strict=False)
  assert report.missing == report.unexpected == report.mismatched == []
  assert_trees_equal(variables, {"params": tree()["params"], "batch_stats": tree()["batch_stats"]})
  assert_trees_equal(checkpoint.load(tmp_path / "run", target), variables)  # strict=True
  # A variables target lacking a collection the run has still hears of it.
  _, report = checkpoint.load(tmp_path / "run", {"params": target["params"]}, strict=False)
  assert report.unexpected == ["batch_stats/BatchNorm_0/mean"]


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["exchange", "two-renames"])
def test_save_replaces_an_existing_checkpoint(tmp_path, monkeypatch, atomic_swap):
  if not atomic_swap:
    monkeypatch.setattr(checkpoint.io, "_exchange", lambda a, b: False)
  path = tmp_path / "c"
  checkpoint.save(path, tree(1))
  checkpoint.save(path, {"params": tree(2)["params"]})
  assert_trees_equal(checkpoint.load(path), {"params": tree(2)["params"]})
  assert os.listdir(tmp_path) == ["c"]  # Nothing left beside it.


def test_save_refuses_what_it_must_not_replace(tmp_path):
  checkpoint.save(tmp_path / "c", tree())
  with pytest.raises(FileExistsError, match=f"^checkpoint.save: {tmp_path}/c exists and is a "
                                            "checkpoint; pass force=True to replace it$"):
    checkpoint.save(tmp_path / "c", tree(), force=False)
  os.makedirs(tmp_path / "notes")
  with pytest.raises(FileExistsError, match="notes exists and is not a checkpoint written by "
                                            "fjt.checkpoint.save; choose a new path$"):
    checkpoint.save(tmp_path / "notes", tree())
  assert_trees_equal(checkpoint.load(tmp_path / "c"), tree())


SAVE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from fjt import checkpoint
    value = float(sys.argv[2])
    # 64 MB, so that writing it takes long enough to be killed in the middle.
    checkpoint.save(sys.argv[1], {f"w{i}": np.full((1 << 20,), value + i, np.float32)
                                  for i in range(16)})
""")


def save_in_subprocess(path, value):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", SAVE_SCRIPT, str(path), str(value)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saved_tree(value):
  return {f"w{i}": np.full((1 << 20,), value + i, np.float32) for i in range(16)}


def test_save_killed_midway_leaves_the_old_checkpoint(tmp_path):
  path = tmp_path / "c"
  out, err = save_in_subprocess(path, 1.0).communicate(timeout=120)
  assert os.path.isdir(path), err
  process = save_in_subprocess(path, 2.0)
  start = time.time()
  while time.time() - start < 120 and process.poll() is None:
    if glob.glob(f"{path}.fjt-tmp*"):  # The new checkpoint is being written.
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.0005)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL, "the save ended before it could be killed"
  assert glob.glob(f"{path}.fjt-tmp*")  # Killed midway: its temporary directory is left.
  assert_trees_equal(checkpoint.load(path), saved_tree(1.0))
  out, err = save_in_subprocess(path, 2.0).communicate(timeout=120)
  assert_trees_equal(checkpoint.load(path), saved_tree(2.0))
  assert os.listdir(tmp_path) == ["c"]  # The killed save's leftovers are removed.


def test_init_from_checks_the_checksums(tmp_path):
  from conftest import tiny_digits_config
  _, _, state = fjt.create_from_config(tiny_digits_config("mlp"), np.zeros((1, 64), np.float32))
  checkpoint.save(tmp_path / "params", state.params)
  rel = flip_a_byte(tmp_path / "params")
  with pytest.raises(CheckpointError, match=f"file {rel} has changed since it was written"):
    fjt.train.init_from_checkpoint(state, str(tmp_path / "params"))


def test_a_replace_killed_between_two_renames_names_the_old_checkpoint(tmp_path):
  # Where the OS cannot swap two directories atomically, the old checkpoint waits at
  # PATH.fjt-old while the new one is renamed into place.
  checkpoint.save(tmp_path / "c.fjt-old", tree())
  with pytest.raises(CheckpointError) as info:
    checkpoint.load(tmp_path / "c")
  assert str(info.value) == (f"no checkpoint at '{tmp_path}/c': a save replacing it was killed; "
                             f"the previous checkpoint is '{tmp_path}/c.fjt-old' (rename it back)")
