"""Data parallel on simulated devices and multi-process runs on 127.0.0.1 (subprocesses)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from fjt import checkpoint

TRAIN = os.path.join(ROOT, "scripts", "train.py")
CONFIG = os.path.join(ROOT, "configs", "digits_mlp.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, *args, devices=1, **popen):
  # Simulated devices and gloo processes are CPU features: on a GPU machine too.
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, TRAIN, "--config", CONFIG, "--workdir", str(workdir),
                           *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **popen)


def finish(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, err[-3000:]
  return out


def max_difference(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b)))


RUN = ("--config.train.steps=100", "--config.optimizer.warmup_steps=10",
       "--config.train.eval_every=50", "--config.checkpoint.every_steps=50")


def test_eight_devices_match_one(tmp_path):
  one, eight = start(tmp_path / "one", *RUN), start(tmp_path / "eight", *RUN, devices=8)
  out_one, out_eight = finish(one), finish(eight)
  a, b = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "eight")
  assert max_difference(a["params"], b["params"]) < 1e-4
  assert max_difference(a["batch_stats"], b["batch_stats"]) < 1e-4
  assert out_one.splitlines()[-1].split(",")[1:3] == out_eight.splitlines()[-1].split(",")[1:3]


def test_batch_must_split_over_the_devices(tmp_path):
  process = start(tmp_path, "--config.train.batch_size=60", devices=8)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 2
  assert "'train.batch_size': 60 rows do not split over the 8 devices of the 'data' axis" in err


def test_two_processes_match_one(tmp_path):
  port, run = free_port(), RUN[:2] + ("--config.train.eval_every=100",)
  procs = [start(tmp_path / "two", *run, "--coordinator", f"127.0.0.1:{port}", "--num_processes",
                 "2", "--process_id", str(i)) for i in range(2)]
  single = start(tmp_path / "one", *run)
  outs = [finish(p) for p in procs]
  finish(single)
  assert "step 100" in outs[0]
  a, b = checkpoint.load(tmp_path / "two"), checkpoint.load(tmp_path / "one")
  assert max_difference(a, b) < 1e-4
  # Only process 0 writes logs and the summary; both wrote the checkpoint through Orbax.
  rows = open(tmp_path / "two" / "metrics.jsonl").read().splitlines()
  assert len(rows) == len(set(rows)) == 2  # One train log and one eval at step 100, written once.


def test_a_killed_peer_ends_the_survivor_within_the_timeout(tmp_path):
  port = free_port()
  run = ("--config.train.steps=1000000", "--config.distributed.timeout_s=10",
         "--config.train.eval_every=1000000", "--config.checkpoint.every_steps=1000000",
         "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2")
  survivor = start(tmp_path, *run, "--process_id", "0")
  victim = start(tmp_path, *run, "--process_id", "1")
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not (
      os.path.exists(tmp_path / "metrics.jsonl") and os.path.getsize(tmp_path / "metrics.jsonl")):
    time.sleep(0.1)  # Until both are training: step 100 is logged.
  assert survivor.poll() is None and victim.poll() is None
  victim.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  _, err = survivor.communicate(timeout=120)
  victim.communicate()
  assert survivor.returncode == 3, err[-3000:]
  assert time.monotonic() - killed_at < 10 + 20  # The timeout, plus detection and teardown.
  # A collective that fails, or the watchdog when none does: the same one line.
  said = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]
  assert len(said) == 1 and said[0].startswith("error: process 0 of 2: process 1 stopped "
                                               "answering "), err[-3000:]
  assert "Traceback" not in err and "Check failed" not in err and "*** " not in err, err[-3000:]


def test_processes_started_with_different_configs_refuse_to_train(tmp_path):
  port = free_port()
  procs = [start(tmp_path, "--config.train.steps=50", f"--config.seed={i}", "--coordinator",
                 f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i))
           for i in range(2)]
  for process in procs:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "error: the processes of this run were started with different configs (process 1 vs "
        "process 0): seed 0 -> 1; start every process with the same --config and overrides")
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  port = free_port()
  run = ("--config.train.steps=1000000", "--config.train.eval_every=1000000",
         "--config.checkpoint.every_steps=1000000", "--config.train.log_every=10",
         "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2")
  procs = [start(tmp_path, *run, "--process_id", str(i)) for i in range(2)]
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not (
      os.path.exists(tmp_path / "metrics.jsonl") and os.path.getsize(tmp_path / "metrics.jsonl")):
    time.sleep(0.1)  # Until both are training: step 10 is logged.
  procs[1].send_signal(signal.SIGTERM)  # The scheduler stops one host first.
  lines = []
  for process in procs:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 4, err[-3000:]
    lines.append(err.strip().splitlines()[-1])
  assert lines[0] == lines[1] and lines[0].startswith("fjt: stopped at step "), lines
  step = int(lines[0].split()[4])
  assert step > 10
  assert [s for s, _ in checkpoint.step_dirs(tmp_path / "checkpoints")] == [step]


def test_replicas_over_two_processes_match_one(tmp_path):
  port = free_port()
  run = ("--config", os.path.join(ROOT, "configs", "digits_fedavg.py"), "--config.replicas.rounds=3")
  procs = [start(tmp_path / "two", *run, "--coordinator", f"127.0.0.1:{port}", "--num_processes",
                 "2", "--process_id", str(i)) for i in range(2)]
  single = start(tmp_path / "one", *run)
  outs = [finish(p) for p in procs] + [finish(single)]
  assert outs[0].splitlines()[-1].split(":")[1] == outs[2].splitlines()[-1].split(":")[1]
  a, b = checkpoint.load(tmp_path / "two" / "final"), checkpoint.load(tmp_path / "one" / "final")
  assert max_difference(a["params"], b["params"]) < 1e-5


def test_diloco_over_two_processes_matches_one_bitwise(tmp_path):
  # configs/text_diloco.py with a GPT of 1 layer, 32 wide, block 16: 4 replicas (2 a process) of
  # a by-source split, a warm start, outer Nesterov, bfloat16 pseudo-gradients. Two processes of
  # one device against one process of two devices (the same mesh): bitwise equal. Against one
  # device (measured): params within 1.3e-6 with float32 communication, 5.8e-5 with bfloat16:
  # the warm start's data-parallel mean sums in another order, and a pseudo-gradient nudged
  # across a bfloat16 rounding boundary moves a weight by its bfloat16 step (~2^-8 of it) times
  # the outer step.
  port = free_port()
  run = ("--config", os.path.join(ROOT, "configs", "text_diloco.py"),
         "--config.model.num_layers=1", "--config.model.embed_dim=32",
         "--config.model.block_size=16", "--config.data.block_size=16", "--config.data.eval_stride=8",
         "--config.replicas.num=4", "--config.replicas.split=by_source",
         "--config.replicas.rounds=2", "--config.replicas.local_steps=3",
         "--config.replicas.warmup_steps=2", "--config.optimizer.warmup_steps=2",
         "--config.replicas.baselines=()")
  procs = [start(tmp_path / "two", *run, "--coordinator", f"127.0.0.1:{port}", "--num_processes",
                 "2", "--process_id", str(i)) for i in range(2)]
  single = start(tmp_path / "one", *run, devices=2)
  for process in (*procs, single):
    finish(process)
  a, b = checkpoint.load(tmp_path / "two" / "final"), checkpoint.load(tmp_path / "one" / "final")
  assert max_difference(a["params"], b["params"]) == 0.0
  two, one = (json.load(open(tmp_path / d / "summary.json")) for d in ("two", "one"))
  assert two["eval"] == one["eval"] and two["communication"] == one["communication"]
  assert two["replicas"]["counts"] == one["replicas"]["counts"]
  assert (tmp_path / "two" / "splits.json").read_text() == \
      (tmp_path / "one" / "splits.json").read_text()


def test_two_processes_with_fsdp_across_them_resume_on_one(tmp_path):
  port, fsdp = free_port(), ("--config.mesh.data=1", "--config.mesh.fsdp=2")
  procs = [start(tmp_path / "two", *RUN, *fsdp, "--coordinator", f"127.0.0.1:{port}",
                 "--num_processes", "2", "--process_id", str(i)) for i in range(2)]
  single = start(tmp_path / "one", *RUN)
  for process in (*procs, single):
    finish(process)
  one = checkpoint.load(tmp_path / "one")
  assert max_difference(checkpoint.load(tmp_path / "two"), one) < 1e-4
  # Killed after step 50: resume the two-process fsdp=2 run in one process on one device.
  shutil.copytree(tmp_path / "two", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "100")
  resumed = start(tmp_path / "resumed", *RUN)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert ("was saved on mesh data=1 x fsdp=2 x model=1; resuming on mesh data=1 x fsdp=1 x "
          "model=1") in err
  assert max_difference(checkpoint.load(tmp_path / "resumed"), one) < 1e-4

