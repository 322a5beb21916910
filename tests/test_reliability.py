"""Nothing lost, nothing hung, nothing silently wrong: full disks, kills at resume, the best
checkpoint across resumes, non-finite states and metrics, damaged logs, changed data."""

import errno
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import fjt
from conftest import ROOT, tiny_digits_config
from fjt import checkpoint, cli, preemption
from fjt.checks import NonFiniteLossError
from fjt.config import ConfigError
from fjt.data import tokens
from fjt.files import write_atomic
from fjt.logs import LogWriteError
from test_checkpoint import assert_trees_equal

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import convert as convert_cli  # noqa: E402
import embeddings as embeddings_cli  # noqa: E402
import prepare_text  # noqa: E402
import sample as sample_cli  # noqa: E402


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


def half_then_full(f):
  f.write(b"new, half written")
  full_disk()


def test_write_atomic_leaves_the_old_file_on_a_full_disk(tmp_path):
  path = tmp_path / "summary.json"
  write_atomic(path, "old")
  with pytest.raises(OSError, match=rf"No space left on device \(writing {path}\)"):
    write_atomic(path, half_then_full)
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_failing_log_sink_stops_cleanly_and_the_rerun_ends_bitwise_equal(
    tmp_path, monkeypatch, uninterrupted, capsys):
  """The TensorBoard writer's disk fills at step 20: one line, exit 1, step 20 saved (the
  checkpoints' disk still takes it; a full one leaves checkpoint 10 as it was); the rerun resumes
  and ends as the uninterrupted run did."""
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
  assert [s for s, _ in checkpoint.step_dirs(str(tmp_path / "checkpoints"))] == [10, 20]
  assert capsys.readouterr().err.endswith("fjt: saved step 20 before stopping\n")
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
    ("optimizer.learning_rate", 1e39, "config key 'optimizer.learning_rate': expected a finite "
     "number > 0 that fits float32, got 1e+39"),
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


def token_run(tmp_path, capsys):
  """A tiny GPT trained 4 steps on a word-tokenizer token folder; returns (config, workdir)."""
  from test_gpt import write_texts
  write_texts(tmp_path / "texts")
  assert prepare_text.main([str(tmp_path / "texts"), "--out", str(tmp_path / "tokens"),
                            "--vocab_size", "20"]) == 0
  c = fjt.apply_overrides(fjt.load_config(os.path.join(ROOT, "configs", "text_gpt.py")), [
      "data.name=tokens", f"data.path={tmp_path / 'tokens'}", "data.block_size=16",
      "data.eval_stride=0", "model.vocab_size=15", "model.block_size=16", "model.embed_dim=8",
      "model.num_heads=2", "train.steps=4", "train.eval_every=4", "train.log_every=2",
      "checkpoint.every_steps=4", "optimizer.warmup_steps=1", "train.batch_size=4"])
  fjt.fit(c, str(tmp_path / "run"), progress=False)
  capsys.readouterr()
  return c, str(tmp_path / "run")


def test_changed_data_is_named_by_resume_sample_and_embeddings(tmp_path, capsys):
  c, workdir = token_run(tmp_path, capsys)
  assert embeddings_cli.main([workdir, "cat", "--neighbors", "1"]) == 0  # A word vocabulary.
  assert capsys.readouterr().out.startswith("params/wte/embedding: (15, 8) float32, vocabulary "
                                            "of 15 words\ncat")
  with open(tmp_path / "texts" / "doc0.txt", "a", encoding="utf-8") as f:
    f.write("\nThe cat sat on the mat.")  # Re-prepared from changed text: train.bin grows.
  assert prepare_text.main([str(tmp_path / "texts"), "--out", str(tmp_path / "tokens"),
                            "--vocab_size", "20"]) == 0
  capsys.readouterr()
  with pytest.raises(ConfigError) as info:
    fjt.fit(c, workdir, progress=False)  # A re-evaluation of the finished run.
  line = str(info.value)
  assert line.startswith(f"the data of the run in {workdir} changed since it was made: "
                         "meta.json sha256 ") and cli.exit_code(info.value) == 2
  assert "; train.bin bytes 8106 -> 8118. Restore" in line and line.endswith(
      ". Restore the data, or pass --config.allow_changed_data=true to use it anyway")
  assert sample_cli.main([workdir, "--prompt", "the cat", "--tokens", "3"]) == 2
  assert embeddings_cli.main([workdir, "cat"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == [f"error: {line}"] * 2
  c.allow_changed_data = True  # Deliberately: said in one line, then evaluated again.
  _, summary = fjt.fit(c, workdir, progress=False)
  assert summary["step"] == 4
  assert f"fjt: the data of the run in {workdir} changed since it was made" in \
      capsys.readouterr().err


def test_prepare_text_refuses_small_vocabularies_and_leaves_nothing_partial(tmp_path, capsys,
                                                                            monkeypatch):
  (tmp_path / "a.txt").write_text("hello world foo bar baz hello world again and again")
  out = tmp_path / "tokens"
  for size, kind, least in ((0, "word", 3), (2, "word", 3), (256, "bpe", 257)):
    assert prepare_text.main([str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", kind,
                              "--vocab_size", str(size)]) == 2
    assert capsys.readouterr().err == (f"error: --vocab_size: a {kind} tokenizer needs at least "
                                       f"{least} tokens (its special tokens and more), got {size}\n")
  assert not out.exists()
  (tmp_path / "nul.txt").write_bytes(b"\0" * 100)
  assert prepare_text.main([str(tmp_path / "nul.txt"), "--out", str(out)]) == 2
  assert capsys.readouterr().err == (f"error: source file {str(tmp_path / 'nul.txt')!r} holds NUL "
                                     "bytes: not a text file\n")
  meta = tokens.prepare_text([str(tmp_path / "a.txt")], str(out), vocab_size=10,
                             validation_percent=20)
  vocab = json.loads((out / "tokenizer.json").read_text())["vocab"]
  assert vocab[2:] == ["hello", "world", "bar", "baz", "foo"]  # The cut falls between words.
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  real = tokens.write_atomic  # The disk fills while train.bin is written.
  monkeypatch.setattr(tokens, "write_atomic", lambda path, data: real(
      path, half_then_full if path.endswith("train.bin") else data))
  assert prepare_text.main([str(tmp_path / "a.txt"), "--out", str(out), "--vocab_size", "5"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: [Errno 28] No space left on device (writing ") and \
      "train.bin" in err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # Nothing partial.
  assert meta["train_tokens"] == len(before["train.bin"]) // 2


def test_sample_refuses_a_non_finite_temperature(tmp_path, capsys):
  assert sample_cli.main([str(tmp_path), "--temperature", "nan"]) == 2
  assert capsys.readouterr().err == ("error: --temperature: expected a finite number >= 0 "
                                     "(0: greedy), got nan\n")


def test_convert_never_writes_into_a_run_and_asks_before_replacing(tmp_path, capsys,
                                                                   uninterrupted):
  workdir = uninterrupted[0]
  weights, cfg = str(tmp_path / "model.safetensors"), os.path.join(ROOT, "configs",
                                                                  "digits_mlp.py")
  step = os.path.join(workdir, "checkpoints", "30")
  before = sorted(os.listdir(step))
  for out in (step, os.path.join(workdir, "checkpoints", "40"), workdir):
    assert convert_cli.main([weights, out, "--config", cfg, "--overwrite"]) == 2
    what = "the run" if out == workdir else "inside the checkpoints of the run"
    assert capsys.readouterr().err == (
        f"error: {out} is {what} in {workdir}: its checkpoints are a training state that "
        "resuming reads; write the output elsewhere\n")
  assert sorted(os.listdir(step)) == before
  (tmp_path / "out").mkdir()
  assert convert_cli.main([weights, str(tmp_path / "out"), "--config", cfg]) == 2
  assert capsys.readouterr().err == f"error: {tmp_path / 'out'} exists; pass --overwrite to replace it\n"


def test_convert_names_a_truncated_weights_file(tmp_path, capsys):
  torch = pytest.importorskip("torch", reason="reading .pt files needs torch (extra 'interop')")
  path = tmp_path / "model.pt"
  torch.save({"w": torch.zeros(100, 100)}, path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # torch: "[Errno 22] Invalid argument", no file named.
  cfg = os.path.join(ROOT, "configs", "digits_mlp.py")
  assert convert_cli.main([str(path), str(tmp_path / "out"), "--config", cfg]) == 2
  assert capsys.readouterr().err == (f"error: {path}: cannot read the weights (Invalid argument); "
                                     "the file is damaged or not a PyTorch/safetensors file\n")


def test_sigterm_in_a_replica_configs_baseline_resumes_it_without_retraining(tmp_path, capsys,
                                                                              monkeypatch):
  """FedAvg, 3 rounds of 2 steps, then the centralized baseline (6 steps), stopped at its step 2:
  the rerun says the replica run is finished (evaluated again) and resumes the baseline."""
  c = fjt.apply_overrides(fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py")), [
      "model.features=(16,)", "optimizer.warmup_steps=2", "replicas.num=2", "replicas.rounds=3",
      "replicas.local_steps=2", "replicas.baselines=('centralized',)", "train.eval_every=1000"])
  _, expected = fjt.fit(c, str(tmp_path / "uninterrupted"), progress=False)
  calls = []
  real = preemption.StopSignals.requested
  monkeypatch.setattr(preemption.StopSignals, "requested", lambda self, done: calls.append(done)
                      or (len(calls) == 5 and setattr(self, "signal_name", "SIGTERM") is None))
  workdir = tmp_path / "run"
  with pytest.raises(preemption.StoppedBySignal) as info:
    fjt.fit(c, str(workdir), progress=False)
  assert calls == [2, 4, 6, 1, 2] and cli.exit_code(info.value) == 4
  assert info.value.checkpoint_dir == str(workdir / "centralized" / "checkpoints")
  monkeypatch.setattr(preemption.StopSignals, "requested", real)
  capsys.readouterr()
  _, summary = fjt.fit(c, str(workdir), progress=False)
  assert capsys.readouterr().err.splitlines()[-2:] == [
      f"fjt: the run finished at step 6 (checkpoint {workdir}/checkpoints/6); evaluating it again "
      "(raise --config.train.steps to train on)",
      f"fjt: resuming from step 2 (checkpoint {workdir}/centralized/checkpoints/2)"]
  assert summary["eval"] == expected["eval"]


def test_sigkill_while_config_json_is_rewritten_leaves_the_old_one(tmp_path):
  """What a kill right after ``fjt: resuming from step N`` used to tear: the rewrite of
  config.json, killed after the new text is synced and before its rename."""
  (tmp_path / "config.json").write_text('{"old": 1}')
  script = ("import os, signal, sys\nfrom fjt import logs\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "logs.RunLog(sys.argv[1], '{\"new\": 1}')\n")
  process = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert process.returncode == -signal.SIGKILL, process.stderr
  assert (tmp_path / "config.json").read_text() == '{"old": 1}'
