import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fjt
from conftest import ROOT, tiny_digits_config
from fjt import checkpoint
from fjt.checkpoint import CheckpointError, CheckpointMismatchError


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def mlp_state():
  config = tiny_digits_config("mlp")
  model, tx, state = fjt.create_from_config(config, np.zeros((1, 64), np.float32))
  return state


def test_save_and_load_any_pytree(tmp_path, mlp_state, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoint.save("params", mlp_state.params)  # Relative paths work.
  loaded = checkpoint.load("params")
  assert isinstance(loaded, dict)
  assert_trees_equal(loaded, mlp_state.params)
  # With a target the result has the target's type: a whole TrainState round trip.
  checkpoint.save(tmp_path / "state", mlp_state)
  zeros = jax.tree.map(jnp.zeros_like, mlp_state)
  restored = checkpoint.load(tmp_path / "state", zeros)
  assert type(restored) is fjt.TrainState
  assert_trees_equal(restored, mlp_state)


def test_strict_load_lists_every_difference(tmp_path):
  checkpoint.save(tmp_path / "c", {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32),
                                   "old": np.zeros(1, np.float32)})
  target = {"a": np.zeros(4, np.float32), "b": np.ones((2, 2), np.float32), "new": np.zeros(2)}
  with pytest.raises(CheckpointMismatchError) as info:
    checkpoint.load(tmp_path / "c", target)
  message = str(info.value)
  assert "at 3 paths" in message
  assert "missing (1): new" in message and "unexpected (1): old" in message
  assert "a [checkpoint (3,) float32, target (4,) float32]" in message
  assert info.value.report.missing == ["new"] and info.value.report.unexpected == ["old"]


def test_non_strict_load_reports_and_keeps_target_values(tmp_path):
  saved = {"params": {"body": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "head": np.ones((3, 10), np.float32), "extra": np.ones(2, np.float32)},
           "step": np.int32(7)}
  checkpoint.save(tmp_path / "c", saved)
  target = {"params": {"body": jnp.zeros((2, 3), jnp.bfloat16), "head": jnp.zeros((3, 5)),
                       "new": jnp.full(4, 2.0)}, "step": jnp.int32(0)}
  # A shape mismatch raises even when not strict, naming the path...
  with pytest.raises(CheckpointMismatchError, match=r"params/head \(checkpoint \(3, 10\) float32, "
                                                    r"target \(3, 5\) float32\)"):
    checkpoint.load(tmp_path / "c", target, strict=False)
  # ...unless skipped, then the target's value is kept.
  tree, report = checkpoint.load(tmp_path / "c", target, strict=False, skip=[r"^params/head$"])
  assert report.missing == ["params/new"] and report.unexpected == ["params/extra"]
  assert report.mismatched == ["params/body", "params/head"] and report.skipped == ["params/head"]
  assert "checkpoint (2, 3) float32, target (2, 3) bfloat16" == report.details["params/body"]
  # Loaded leaves take the target's dtype and sharding; missing and skipped keep the target's.
  assert tree["params"]["body"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(tree["params"]["body"],
                                saved["params"]["body"].astype(ml_dtypes.bfloat16))
  assert tree["params"]["body"].sharding == target["params"]["body"].sharding
  np.testing.assert_array_equal(tree["params"]["head"], 0.0)
  np.testing.assert_array_equal(tree["params"]["new"], 2.0)
  assert int(tree["step"]) == 7


def test_abstract_targets(tmp_path, mlp_state):
  checkpoint.save(tmp_path / "c", mlp_state)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          mlp_state)
  assert_trees_equal(checkpoint.load(tmp_path / "c", abstract), mlp_state)
  with pytest.raises(CheckpointMismatchError, match="has no value for extra"):
    checkpoint.load(tmp_path / "c", {"extra": jax.ShapeDtypeStruct((2,), jnp.float32)}, strict=False)


def test_resolve_paths_and_errors(tmp_path):
  with pytest.raises(CheckpointError, match="not a directory"):
    checkpoint.load(tmp_path / "nothing")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="expected a run workdir"):
    checkpoint.load(tmp_path / "empty")


def train_cli(workdir, *overrides, timeout=300):
  args = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
          os.path.join(ROOT, "configs", "digits_mlp.py"), "--workdir", str(workdir),
          "--config.model.features=(16,)", "--config.optimizer.warmup_steps=2",
          "--config.train.log_every=10", *overrides]
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


KILL_RUN = ("--config.train.steps=300", "--config.checkpoint.every_steps=10",
            "--config.train.eval_every=100")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  out, err = train_cli(workdir, *KILL_RUN).communicate(timeout=300)
  assert "step 300" in out, err
  return workdir


def kill_when(workdir, process, ready, limit=120.0):
  start = time.time()
  while time.time() - start < limit and process.poll() is None:
    if ready(os.path.join(workdir, "checkpoints")):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.0005)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def saving(step):
  """Ready when the save of a step >= ``step`` is in progress (a temporary directory)."""
  def ready(directory):
    return any(int(os.path.basename(p).split(".")[0]) >= step
               for p in glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
  return ready


def finished_after(step):
  return lambda directory: any(s > step for s, _ in checkpoint.step_dirs(directory))


@pytest.mark.parametrize("ready", [saving(100), finished_after(150)], ids=["mid-save", "between-saves"])
def test_sigkilled_run_resumes_bitwise(tmp_path, uninterrupted, ready):
  kill_when(tmp_path, train_cli(tmp_path, *KILL_RUN), ready)
  out, err = train_cli(tmp_path, *KILL_RUN).communicate(timeout=300)
  assert "step 300" in out, err
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))  # Leftovers cleaned.
  assert_trees_equal(checkpoint.load(tmp_path), checkpoint.load(uninterrupted))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 300
  assert json.load(open(tmp_path / "summary.json")) == json.load(open(uninterrupted / "summary.json"))


def logged_past(workdir, step):
  """Ready when ``metrics.jsonl`` has a train row past ``step``."""
  def ready(_):
    try:
      rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
              if line.endswith("\n")]
    except (OSError, ValueError):
      return False
    return any(r["split"] == "train" and r["step"] > step for r in rows)
  return ready


def signal_when(workdir, process, ready, signum, limit=120.0):
  start = time.time()
  while time.time() - start < limit and process.poll() is None and not ready(workdir):
    time.sleep(0.01)
  assert process.poll() is None, "the run ended before the signal"
  process.send_signal(signum)
  return process.communicate(timeout=120)


def test_sigterm_and_sigint_save_the_current_step_and_the_run_resumes_bitwise(tmp_path,
                                                                              uninterrupted):
  # No periodic checkpoints: every step saved is the one a signal stopped at.
  run = (*KILL_RUN, "--config.checkpoint.every_steps=1000")
  stops = []
  for signum, past in ((signal.SIGTERM, 50), (signal.SIGINT, 150)):
    process = train_cli(tmp_path, *run)
    out, err = signal_when(tmp_path, process, logged_past(tmp_path, past), signum)
    assert process.returncode == 4, err
    name = signal.Signals(signum).name
    last = err.strip().splitlines()[-1]
    step = int(last.split()[4]) if last.startswith("fjt: stopped at step ") else -1
    assert last == (f"fjt: stopped at step {step} by {name}; checkpoint saved; run the same "
                    "command to resume"), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "checkpoints")][-1] == step > past
    stops.append(step)
  process = train_cli(tmp_path, *run)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  assert f"fjt: resuming from step {stops[1]} (checkpoint {tmp_path}/checkpoints/{stops[1]})" in err
  assert_trees_equal(checkpoint.load(tmp_path), checkpoint.load(uninterrupted))
  assert json.load(open(tmp_path / "summary.json")) == json.load(open(uninterrupted / "summary.json"))


def test_finished_run_reports_again(uninterrupted):
  before = sorted(os.listdir(uninterrupted / "checkpoints"))
  process = train_cli(uninterrupted, *KILL_RUN)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  summary = json.load(open(uninterrupted / "summary.json"))
  assert f"accuracy {summary['eval']['accuracy']:.4f}" in out
  assert sorted(os.listdir(uninterrupted / "checkpoints")) == before


def copy_run(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("damage", ["truncate", "delete", "bitflip"])
def test_damaged_checkpoint_is_named_and_fallback_restores(tmp_path, uninterrupted, damage):
  workdir = copy_run(uninterrupted, tmp_path / "run")
  steps = checkpoint.step_dirs(workdir / "checkpoints")
  newest = steps[-1][1]
  victim = max(glob.glob(os.path.join(newest, "default", "**", "d", "*"), recursive=True),
               key=os.path.getsize)
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(10)
  elif damage == "bitflip":  # Same size: only the CRC-32 can tell.
    with open(victim, "r+b") as f:
      f.seek(os.path.getsize(victim) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 1]))
  else:
    os.remove(victim)
  rel = os.path.relpath(victim, newest)
  process = train_cli(workdir, *KILL_RUN)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 1
  assert f"checkpoint {newest}: file {rel}" in err and "--config.checkpoint.fallback=True" in err
  assert "Traceback" not in err
  assert os.path.isdir(newest)  # Nothing deleted.
  if damage != "truncate":
    return  # The fallback path is the same for every kind of damage.
  process = train_cli(workdir, *KILL_RUN, "--config.checkpoint.fallback=True")
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  said = [line for line in err.splitlines() if line.startswith("fjt: ")]
  previous = steps[-2][0]
  assert len(said) == 2 and said[0].startswith(f"fjt: checkpoint {newest}: file {rel}")
  assert said[1] == f"fjt: resuming from step {previous} (checkpoint {steps[-2][1]})"
  assert said[0].endswith("trying the previous step") and "Warning" not in err
  assert os.path.isdir(workdir / "checkpoints" / f"damaged-{steps[-1][0]}")
  # Retraining from the older step gives back the same final state.
  assert_trees_equal(checkpoint.load(workdir), checkpoint.load(uninterrupted))


def test_max_to_keep_zero_is_a_one_line_config_error(tmp_path):
  out, err = train_cli(tmp_path, "--config.train.steps=10",
                       "--config.checkpoint.max_to_keep=0").communicate(timeout=300)
  assert err.strip().splitlines() == ["error: config key 'checkpoint.max_to_keep': expected a "
                                      "positive int (a run never deletes its last checkpoint), got 0"]
  assert not os.path.exists(tmp_path / "checkpoints" / "10")


def test_fine_tuning_freezes_the_body_and_trains_a_new_head(tmp_path):
  pretrain = tiny_digits_config("cnn", steps=20)
  pretrain.data.classes = (0, 1, 2, 3, 4)
  pretrain.model.num_classes = 5
  config = tiny_digits_config("cnn", steps=20)
  config.pretrain = pretrain
  config.data.classes = (5, 6, 7, 8, 9)
  config.model.num_classes = 5
  config.init_skip = (r"^params/Dense_0/",)
  config.freeze = (r"^params/(Conv|BatchNorm)_\d+/",)
  state, summary = fjt.fit(config, str(tmp_path), progress=False)
  pretrained = checkpoint.load(tmp_path / "pretrain")
  for name in ("Conv_0", "Conv_1", "BatchNorm_0", "BatchNorm_1"):
    assert_trees_equal(state.params[name], pretrained["params"][name])
  head = state.params["Dense_0"]["kernel"]
  assert not np.array_equal(head, pretrained["params"]["Dense_0"]["kernel"])
  # The head was re-initialised (skipped), not loaded, then trained.
  assert summary["init_from"]["skipped"] == ["params/Dense_0/bias", "params/Dense_0/kernel"]
  assert summary["pretrain"]["step"] == 20 and 0 < summary["eval"]["accuracy"] <= 1
  # No optimizer memory for frozen parameters.
  opt_paths = [p for p in checkpoint.saved_shapes(tmp_path) if p.startswith("opt_state/")]
  assert opt_paths and all("Dense_0" in p or p.endswith("count") for p in opt_paths)


def test_init_from_a_params_file(tmp_path, mlp_state):
  checkpoint.save(tmp_path / "params", jax.tree.map(lambda a: a + 1.0, mlp_state.params))
  state, report = fjt.train.init_from_checkpoint(mlp_state, str(tmp_path / "params"))
  assert_trees_equal(state.params, jax.tree.map(lambda a: a + 1.0, mlp_state.params))
  assert report.unexpected == report.mismatched == []
  # The file has no BatchNorm statistics: they keep the state's, and say so (issue 24).
  assert report.missing == ["batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"]
  assert_trees_equal(state.batch_stats, mlp_state.batch_stats)


def test_freeze_pattern_that_matches_nothing_is_an_error():
  config = tiny_digits_config("mlp")
  config.freeze = ("Conv_9",)
  with pytest.raises(fjt.ConfigError, match="'freeze': pattern 'Conv_9' matches no parameter"):
    fjt.create_from_config(config, np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 5), (7, 0), (1, 1), (1000, 3), (4096, 4097)])
def test_crc32_combine_equals_crc32_of_the_concatenation(len_a, len_b):
  import zlib
  rng = np.random.default_rng(len_a * 10007 + len_b)
  a, b = rng.bytes(len_a), rng.bytes(len_b)
  assert checkpoint.crc32_combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)


def test_file_checksums_cut_into_ranges_equal_whole_file_crc32(tmp_path, monkeypatch):
  import zlib
  # Ranges of a file are mapped from page-aligned offsets: 5000 bytes is not a page multiple.
  monkeypatch.setattr(checkpoint.integrity, "_CRC_RANGE", 5000)
  rng = np.random.default_rng(0)
  contents = [rng.bytes(n) for n in (0, 1, 4999, 5000, 5001, 23456, 1 << 16)]
  paths = []
  for i, data in enumerate(contents):
    paths.append(str(tmp_path / f"f{i}"))
    with open(paths[-1], "wb") as f:
      f.write(data)
  assert checkpoint.integrity._crc32s(paths) == [zlib.crc32(data) for data in contents]


def test_manifest_lists_the_arrays_as_orbax_metadata_does(tmp_path, mlp_state):
  trees = {"state": mlp_state,
           "mixed": {"w": jnp.ones((2, 3), jnp.bfloat16), "n": np.arange(4, dtype=np.int8),
                     "step": jnp.zeros((), jnp.int32), "empty": {}}}
  for name, tree in trees.items():
    checkpoint.save(tmp_path / name, tree)
    from_manifest = checkpoint.saved_shapes(tmp_path / name)
    os.remove(tmp_path / name / checkpoint.MANIFEST)  # Now Orbax's metadata answers.
    assert from_manifest == checkpoint.saved_shapes(tmp_path / name)
  # Run checkpoints (written in the background) list their arrays too.
  run = checkpoint.RunCheckpointer(str(tmp_path / "run"))
  run.save(1, mlp_state)
  run.close()
  with open(tmp_path / "run" / "checkpoints" / "1" / checkpoint.MANIFEST) as f:
    assert set(json.load(f)["arrays"]) == set(checkpoint.saved_shapes(tmp_path / "state"))
