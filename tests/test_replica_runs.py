"""Replica runs (FedAvg, DiLoCo) in the one loop: signals, kills, resumes, reruns, meshes."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from fjt import checkpoint
from test_checkpoint import assert_trees_equal, logged_past, signal_when
from test_diloco import write_corpus

# FedAvg on digits: 4 replicas, 30 rounds of 2 local steps (60 steps), no baseline.
FEDAVG = ("--config", os.path.join(ROOT, "configs", "digits_fedavg.py"),
          "--config.model.features=(16,)", "--config.optimizer.warmup_steps=2",
          "--config.replicas.num=4", "--config.replicas.rounds=30",
          "--config.replicas.local_steps=2", "--config.replicas.baselines=()",
          "--config.train.eval_every=1000")


def diloco(corpus):
  """configs/text_diloco.py on ``corpus``: a 1-layer GPT, 4 replicas, a warm start of 6 steps,
  then 8 rounds of 3 local steps (30 steps), no baseline."""
  return ("--config", os.path.join(ROOT, "configs", "text_diloco.py"),
          "--config.data.name=text_files", f"--config.data.paths=('{corpus}',)",
          "--config.data.vocab_size=16", "--config.data.block_size=16",
          "--config.model.vocab_size=16", "--config.model.block_size=16",
          "--config.model.num_layers=1", "--config.model.num_heads=2",
          "--config.model.embed_dim=32", "--config.replicas.warmup_steps=6",
          "--config.replicas.rounds=8", "--config.replicas.local_steps=3",
          "--config.replicas.baselines=()", "--config.train.log_every=2",
          "--config.train.eval_batch_size=16", "--config.optimizer.warmup_steps=2")


def train(workdir, *args, devices=1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           "--workdir", str(workdir), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(process):
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return out, err


def train_rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if r["split"] == "train"]


def same_rows(a, b, stopped=None):
  """Train rows equal but for throughput (a resumed run's first row spans the restart). A
  signal between two log steps (``stopped``) loses the metrics of the steps since the last row
  (the state is saved, not the window): the first row after the restart then averages fewer
  steps, so that one row is left out."""
  strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows]
  rows_a, rows_b = strip(train_rows(a)), strip(train_rows(b))
  if stopped is not None and stopped not in {r["step"] for r in rows_b}:
    spans = min(r["step"] for r in rows_b if r["step"] > stopped)
    rows_a, rows_b = ([r for r in rows if r["step"] != spans] for rows in (rows_a, rows_b))
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
  assert rows_a == rows_b


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
  """Uninterrupted FedAvg and DiLoCo runs, checkpointed every 10 steps."""
  root = tmp_path_factory.mktemp("uninterrupted")
  fedavg = train(root / "fedavg", *FEDAVG, "--config.checkpoint.every_steps=10")
  text = train(root / "diloco", *diloco(corpus), "--config.checkpoint.every_steps=10")
  finish(fedavg), finish(text)
  return {"fedavg": root / "fedavg", "diloco": root / "diloco"}


def test_round_rows_show_each_replica(runs):
  rows = train_rows(runs["fedavg"])
  assert [r["step"] for r in rows] == list(range(2, 61, 2))  # A row per round, at its steps.
  for r in rows:
    losses = [r[f"replica_{k}_loss"] for k in range(4)]
    assert r["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  text = train_rows(runs["diloco"])
  assert [r["step"] for r in text] == [2, 4, 6, *range(9, 31, 3)]  # Warm start, then rounds.
  assert "replica_0_loss" not in text[0] and "replica_3_loss" in text[-1]


@pytest.mark.parametrize("name, past", [("fedavg", 20), ("diloco", 2), ("diloco", 12)],
                         ids=["fedavg", "diloco-warm-start", "diloco-rounds"])
def test_sigterm_saves_and_the_same_command_ends_bitwise_equal(tmp_path, runs, corpus, name, past):
  args = FEDAVG if name == "fedavg" else diloco(corpus)
  args = (*args, "--config.checkpoint.every_steps=10")
  process = train(tmp_path, *args)
  _, err = signal_when(tmp_path, process, logged_past(tmp_path, past), signal.SIGTERM)
  assert process.returncode == 4, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("fjt: stopped at step ") and last.endswith(
      "by SIGTERM; checkpoint saved; run the same command to resume"), err[-2000:]
  stopped = int(last.split()[4])
  assert [s for s, _ in checkpoint.step_dirs(tmp_path / "checkpoints")][-1] == stopped
  _, err = finish(train(tmp_path, *args))
  assert f"fjt: resuming from step {stopped}" in err
  assert_trees_equal(checkpoint.load_variables(tmp_path / "final"),
                     checkpoint.load_variables(runs[name] / "final"))
  same_rows(tmp_path, runs[name], stopped)
  summary, expected = (json.load(open(d / "summary.json")) for d in (tmp_path, runs[name]))
  assert summary["eval"] == expected["eval"]


def test_sigkill_at_a_random_moment_loses_at_most_the_rounds_since_the_last_save(tmp_path, runs):
  args = (*FEDAVG, "--config.checkpoint.every_steps=10")
  process = train(tmp_path, *args)
  ready = logged_past(tmp_path, 10)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None and not ready(None):
    time.sleep(0.01)
  time.sleep(random.Random(0).uniform(0.0, 1.5))  # Anywhere in the rounds after step 10.
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  finish(train(tmp_path, *args))
  assert_trees_equal(checkpoint.load_variables(tmp_path / "final"),
                     checkpoint.load_variables(runs["fedavg"] / "final"))
  same_rows(tmp_path, runs["fedavg"])


def test_a_run_saved_on_4_devices_resumes_on_2_and_a_changed_config_is_refused(tmp_path):
  args = (*FEDAVG, "--config.checkpoint.every_steps=10")
  process = train(tmp_path / "run", *args, devices=4)
  _, err = signal_when(tmp_path / "run", process, logged_past(tmp_path / "run", 20),
                       signal.SIGTERM)
  assert process.returncode == 4, err[-3000:]
  stopped = int(err.strip().splitlines()[-1].split()[4])
  _, err = finish(train(tmp_path / "run", *args, devices=2))
  assert f"fjt: resuming from step {stopped}" in err and "(resharded on restore)" in err
  finish(train(tmp_path / "uninterrupted", *args, devices=4))
  # The restore is exact, but the rounds after it sum the replicas over 2 devices instead of 4:
  # another order of float additions (measured: at most 2.7e-7 apart after 30 rounds).
  a, b = (checkpoint.load_variables(tmp_path / d / "final") for d in ("run", "uninterrupted"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
  changed = train(tmp_path / "run", *args, "--config.replicas.local_steps=3")
  _, err = changed.communicate(timeout=300)
  assert changed.returncode == 2
  assert "holds a run made with a different config: replicas.local_steps 2 -> 3" in err
