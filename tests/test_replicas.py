import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fjt
import fjt.aggregate
import fjt.replicas
from conftest import ROOT, tiny_digits_config
from fjt.data import splits

LABELS = fjt.load_dataset({"name": "digits"}).train["y"]


def replica_config(steps: int = 6):
  config = tiny_digits_config("mlp", steps=steps)
  config.model.features = (16,)
  config.ema.decay = 0.0
  config.swa.every = 0
  config.optimizer.warmup_steps = 1
  return config


@functools.lru_cache(maxsize=None)
def tiny_run(total_steps: int):
  """Model, optimizer, fresh state and jitted local step of a tiny MLP (shared by tests)."""
  config = replica_config(steps=total_steps)
  model, tx, state = fjt.create_from_config(config, fjt.load_dataset(config.data).train["x"][:1])
  return model, tx, state, jax.jit(functools.partial(fjt.replicas.local_step, model, tx))


def setup(num: int, local_steps: int, rounds: int, batch_size: int = 16):
  """``tiny_run`` for ``local_steps * rounds`` steps, each round's batches (N, L, B, ...) of a
  Dirichlet split, and the shards' example counts."""
  model, tx, state, _ = tiny_run(local_steps * rounds)
  data = fjt.load_dataset({"name": "digits"}).train
  shards = splits.dirichlet_split(data["y"], num, alpha=0.5, seed=0, min_size=3)
  batches = [splits.replica_batches(data, shards, 0, r * local_steps, local_steps, batch_size)
             for r in range(rounds)]
  return model, tx, state, batches, np.asarray([len(s) for s in shards], np.float32)


def reference_rounds(model, tx, replicas, rounds_batches, counts, server=("none", 1.0, 0.0),
                     optimizer_state="keep"):
  """Replica by replica with plain loops of local_step, then fjt.aggregate, then the server
  step written out: v <- g + m v, w <- w - lr * (g + m v if nesterov else v)."""
  step = tiny_run(sum(b["y"].shape[1] for b in rounds_batches))[3]
  name, lr, m = server
  w = replicas[0].params
  v = jax.tree.map(jnp.zeros_like, w)
  for batches in rounds_batches:
    trained = []
    for k, state in enumerate(replicas):
      for t in range(batches["y"].shape[1]):
        state, _ = step(state, jax.tree.map(lambda x: x[k, t], batches))
      trained.append(state)
    agg = fjt.aggregate.aggregate_variables([s.variables for s in trained], counts)
    if name == "none" and lr == 1.0:
      w = agg["params"]
    else:
      g = jax.tree.map(jnp.subtract, w, agg["params"])
      v = jax.tree.map(lambda g, v: g + m * v, g, v)
      direction = jax.tree.map(lambda g, v: g + m * v, g, v) if name == "nesterov" else v
      w = jax.tree.map(lambda w, d: w - lr * d, w, direction)
    opt_states = [s.opt_state for s in trained]
    if optimizer_state == "average":
      opt_states = [fjt.aggregate.mean(opt_states, counts)] * len(trained)
    replicas = [s.replace(params=w, batch_stats=agg["batch_stats"], opt_state=o)
                for s, o in zip(trained, opt_states)]
  return replicas


def rows(stacked):
  return [jax.tree.map(lambda x: np.asarray(x[k]), stacked) for k in range(len(stacked.step))]


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


# Batches of 16 and few steps keep float reordering (vmap, scan) from being amplified past the
# tolerance by the BatchNorm of tiny batches and momentum.
@pytest.mark.parametrize("server,optimizer_state,rounds,local_steps", [
    (("none", 1.0, 0.0), "keep", 1, 4),
    (("momentum", 0.7, 0.9), "keep", 2, 2),
    (("nesterov", 0.7, 0.9), "average", 2, 2),
])
def test_rounds_equal_separate_trainings_then_aggregate(server, optimizer_state, rounds,
                                                        local_steps):
  model, tx, state, batches, counts = setup(num=3, local_steps=local_steps, rounds=rounds)
  server_tx = fjt.replicas.create_server_optimizer(*server)
  replicated = fjt.replicas.replicate(state, 3, server_tx)
  expected = reference_rounds(model, tx, rows(replicated.replicas), batches, counts, server,
                              optimizer_state)
  run_round = fjt.replicas.make_round(model, tx, server_tx, optimizer_state=optimizer_state)
  for r in range(rounds):
    replicated, metrics = run_round(replicated, batches[r], counts)
  assert metrics["loss"].shape == (3, local_steps)
  assert np.asarray(replicated.replicas.step).tolist() == [local_steps * rounds] * 3
  for got, want in zip(rows(replicated.replicas), expected):
    assert_close(got.variables, want.variables)
    assert_close(got.opt_state, want.opt_state)
  # The aggregate is broadcast: every replica holds the same (bitwise) params and statistics.
  first, *others = rows(replicated.replicas)
  for got in others:
    jax.tree.map(np.testing.assert_array_equal, got.variables, first.variables)
  assert run_round._cache_size() == 1


def test_replicate_copies_the_state_with_distinct_rngs():
  state = tiny_run(4)[2]
  replicated = fjt.replicas.replicate(state, 4)
  assert replicated.num_replicas == 4 and replicated.server_opt_state == ()
  for row in rows(replicated.replicas):
    jax.tree.map(np.testing.assert_array_equal, row.replace(rng=state.rng), state)
  assert len({tuple(np.asarray(r).tolist()) for r in replicated.replicas.rng}) == 4


def test_in_jit_batch_stats_merge_equals_merge_batch_stats():
  rng = np.random.default_rng(0)
  stacked = {"BatchNorm_0": {"mean": rng.normal(size=(4, 5)).astype(np.float32),
                             "var": rng.uniform(0.1, 2, size=(4, 5)).astype(np.float32)},
             "block": {"BatchNorm_1": {"mean": rng.normal(size=(4, 3)).astype(np.float32),
                                       "var": rng.uniform(0.1, 2, size=(4, 3)).astype(np.float32)}}}
  counts = np.asarray([3, 10, 7, 1], np.float32)
  got = jax.jit(fjt.replicas.replica_batch_stats)(stacked, counts)
  want = fjt.aggregate.merge_batch_stats(
      [jax.tree.map(lambda x: x[k], stacked) for k in range(4)], counts)
  assert_close(got, want, rtol=1e-6, atol=1e-7)
  # The pooled variance includes the between-replica term: it is not the mean of the variances.
  plain = fjt.aggregate.mean([jax.tree.map(lambda x: x[k], stacked) for k in range(4)], counts)
  assert np.all(got["BatchNorm_0"]["var"] > plain["BatchNorm_0"]["var"])
  with pytest.raises(ValueError, match="batch_stats/BatchNorm_0/scale is not a BatchNorm"):
    fjt.replicas.replica_batch_stats({"BatchNorm_0": {"scale": jnp.ones((2, 3))}}, counts[:2])


def test_replica_mean_weights_by_counts_and_keeps_integer_leaves():
  tree = {"w": jnp.asarray([[1.0, 2.0], [3.0, 6.0]]), "count": jnp.asarray([5, 5], jnp.int32)}
  out = fjt.replicas.replica_mean(tree, jnp.asarray([1.0, 3.0]))
  np.testing.assert_array_equal(out["w"], [2.5, 5.0])  # (1*1 + 3*3) / 4, (1*2 + 3*6) / 4.
  assert out["count"].dtype == jnp.int32 and int(out["count"]) == 5


def test_dirichlet_split_is_seeded_covers_the_data_once_and_holds_min_size():
  a = splits.dirichlet_split(LABELS, 8, alpha=0.5, seed=3, min_size=20)
  b = splits.dirichlet_split(LABELS, 8, alpha=0.5, seed=3, min_size=20)
  c = splits.dirichlet_split(LABELS, 8, alpha=0.5, seed=4, min_size=20)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c))
  for split in (a, c):
    assert len(split) == 8 and min(len(s) for s in split) >= 20
    np.testing.assert_array_equal(np.sort(np.concatenate(split)), np.arange(len(LABELS)))
  counts = splits.split_counts(a, LABELS, 10)
  assert counts.shape == (8, 10) and counts.sum(1).tolist() == [len(s) for s in a]
  np.testing.assert_array_equal(counts.sum(0), np.bincount(LABELS, minlength=10))
  # Skewed: far from the class balance of the whole set (about 10% per class per replica).
  assert (counts / counts.sum(1, keepdims=True)).max() > 0.3
  with pytest.raises(ValueError, match="replicas.min_size"):
    splits.dirichlet_split(LABELS, 8, alpha=0.5, seed=0, min_size=len(LABELS) // 8 + 1)
  with pytest.raises(ValueError, match="replicas.alpha"):
    splits.dirichlet_split(LABELS, 8, alpha=0.0, seed=0)


def test_iid_split_sizes_differ_by_at_most_one():
  shards = splits.iid_split(LABELS, 7, seed=0)
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(LABELS)
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(len(LABELS)))
  assert all(np.array_equal(x, y) for x, y in zip(shards, splits.iid_split(LABELS, 7, seed=0)))
  with pytest.raises(ValueError, match="replicas.num"):
    splits.iid_split(LABELS[:3], 4, seed=0)


@pytest.mark.parametrize("shard_size", [1, 5, 64])
def test_stream_reads_each_epoch_once_whatever_the_shard_size(shard_size):
  stream = splits.stream_indices(seed=0, replica=2, first_step=0, num_steps=10, batch_size=8,
                                 shard_size=shard_size)
  assert stream.shape == (10, 8)
  flat = stream.ravel()
  for epoch in range(len(flat) // shard_size):
    np.testing.assert_array_equal(np.sort(flat[epoch * shard_size:(epoch + 1) * shard_size]),
                                  np.arange(shard_size))
  # A pure function of (seed, replica, step): a later window is a slice of the stream.
  np.testing.assert_array_equal(
      splits.stream_indices(0, 2, first_step=4, num_steps=3, batch_size=8, shard_size=shard_size),
      stream[4:7])
  if shard_size > 1:
    assert not np.array_equal(splits.stream_indices(0, 3, 0, 10, 8, shard_size), stream)


def test_config_errors_name_the_key():
  assert fjt.replicas.create_server_optimizer("none", 1.0) is None  # Plain FedAvg: the mean.
  with pytest.raises(fjt.ConfigError, match="replicas.server_optimizer"):
    fjt.replicas.create_server_optimizer("adamm")
  assert fjt.replicas.create_server_optimizer("adam", 0.1) is not None  # Any optimizer by name.
  with pytest.raises(fjt.ConfigError, match="replicas.server_momentum"):
    fjt.replicas.create_server_optimizer("momentum", 1.0, 1.0)
  with pytest.raises(fjt.ConfigError, match="replicas.optimizer_state"):
    fjt.replicas.make_round(None, None, optimizer_state="reset")
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  config.replicas.split = "shards"
  with pytest.raises(fjt.ConfigError, match="replicas.split"):
    fjt.fit(config, "/nonexistent/never-written")
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  config.ema.decay = 0.9
  with pytest.raises(fjt.ConfigError, match="ema.decay"):
    fjt.fit(config, "/nonexistent/never-written")


def test_fit_writes_its_workdir(tmp_path):
  config = fjt.load_config(os.path.join(ROOT, "configs", "digits_fedavg.py"))
  config.model.features = (16,)
  config.replicas.update(num=4, rounds=3, local_steps=2)
  config.optimizer.warmup_steps = 1
  state, summary = fjt.fit(config, str(tmp_path), progress=False)  # Replicas, then baselines.
  assert summary == json.load(open(tmp_path / "summary.json"))
  assert summary["step"] == 3 and int(state.step) == 6
  assert set(summary["eval"]) == {"accuracy", "loss", "centralized_accuracy", "centralized_loss"}
  central = json.load(open(tmp_path / "centralized" / "summary.json"))
  assert central["step"] == 6
  assert central["eval"]["accuracy"] == summary["eval"]["centralized_accuracy"]
  assert json.load(open(tmp_path / "centralized" / "config.json"))["train"]["batch_size"] == 4 * 32
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in logged if r["split"] == "eval"] == [2, 4, 6]  # Inner steps.
  assert logged[-1] == {"step": 6, "split": "eval", "loss": summary["eval"]["loss"],
                       "accuracy": summary["eval"]["accuracy"]}
  assert summary["communication"]["ratio"] == 2.0  # A pseudo-gradient per 2 local steps.
  report = json.load(open(tmp_path / "splits.json"))
  assert sum(report["counts"]) == len(LABELS) and min(report["counts"]) >= 10
  assert [sum(c) for c in report["class_counts"]] == report["counts"]
  assert summary["replicas"]["counts"] == report["counts"]
  saved = fjt.checkpoint.load_variables(str(tmp_path / "final"))
  jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(state.variables))
  assert os.path.getsize(tmp_path / "metrics.png") > 10_000
  config.optimizer.learning_rate /= 2  # The results in the workdir would be stale: refused.
  with pytest.raises(fjt.ConfigError, match="holds a run made with a different config: "
                                            "optimizer.learning_rate 0.05 -> 0.025"):
    fjt.fit(config, str(tmp_path), progress=False)


CHILD = r"""
import json, os, sys
import jax, numpy as np
assert jax.device_count() == 8, jax.devices()
import fjt, fjt.replicas
from fjt.data import splits

config = fjt.load_config("configs/digits_mlp.py")
config.model.features = (16,)
config.ema.decay, config.swa.every, config.optimizer.warmup_steps, config.train.steps = 0.0, 0, 1, 4
data = fjt.load_dataset(config.data).train
num = 16
shards = splits.dirichlet_split(data["y"], num, alpha=0.5, seed=0, min_size=3)
counts = np.asarray([len(s) for s in shards], np.float32)
model, tx, state = fjt.create_from_config(config, data["x"][:1])
server_tx = fjt.replicas.create_server_optimizer("nesterov", 0.7, 0.9)
results = {}
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = fjt.replicas.replica_mesh(num, devices)
  replicated = fjt.replicas.shard_state(fjt.replicas.replicate(state, num, server_tx), mesh)
  run_round = fjt.replicas.make_round(model, tx, server_tx, mesh, "average")
  for r in range(2):
    batches = splits.replica_batches(data, shards, 0, 2 * r, 2, 8)
    replicated, metrics = run_round(replicated, fjt.replicas.shard_replicas(batches, mesh),
                                    fjt.replicas.shard_replicas(counts, mesh))
  kernel = replicated.replicas.params["Dense_0"]["kernel"]
  results[len(devices)] = {
      "devices": len(kernel.sharding.device_set),
      "shard_rows": kernel.addressable_shards[0].data.shape[0],
      "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(replicated)],
      "loss": np.asarray(metrics["loss"]).tolist()}
errors = []
for n in (12, 4):
  try:
    fjt.replicas.replica_mesh(n)
  except fjt.ConfigError as e:
    errors.append(str(e))
try:
  fjt.replicas.shard_replicas(np.zeros((4, 3)), fjt.replicas.replica_mesh(8))
except fjt.ConfigError as e:
  errors.append(str(e))
json.dump({"results": results, "errors": errors}, open(sys.argv[1], "w"))
"""


def test_round_sharded_over_8_devices_equals_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(out))
  eight, one = report["results"]["8"], report["results"]["1"]
  assert (eight["devices"], eight["shard_rows"]) == (8, 2)
  assert (one["devices"], one["shard_rows"]) == (1, 16)
  for a, b in zip(eight["leaves"], one["leaves"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5, atol=1e-5)
  assert len(report["errors"]) == 3
  assert "'replicas.num': 12 replicas do not split evenly over the 8 devices" in report["errors"][0]
  assert "'replicas.num': 4 replicas do not split evenly over the 8 devices" in report["errors"][1]
  assert "use a multiple of 8" in report["errors"][2]


def test_a_round_of_one_plain_sgd_step_equals_a_synchronous_data_parallel_step():
  model = fjt.MLP(features=(16,), batch_norm=False)
  tx = optax.sgd(0.1)
  data = fjt.load_dataset({"name": "digits"}).train
  state = fjt.create_train_state(model, tx, data["x"][:1], jax.random.PRNGKey(0))
  shards = [np.arange(k * 100, (k + 1) * 100) for k in range(4)]  # Equal counts.
  batches = splits.replica_batches(data, shards, 0, 0, 1, 8)  # (4, 1, 8, ...)
  run_round = fjt.replicas.make_round(model, tx)
  replicated, _ = run_round(fjt.replicas.replicate(state, 4), batches, np.full(4, 100.0))
  global_batch = jax.tree.map(lambda x: x[:, 0].reshape(32, *x.shape[3:]), batches)
  synchronous, _ = jax.jit(fjt.train_step_fn(model, tx))(state, global_batch)
  assert_close(rows(replicated.replicas)[0].params, synchronous.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("communication_dtype", ["float32", "bfloat16"])
def test_the_outer_nesterov_step_is_optax_sgd_on_the_pseudo_gradient(communication_dtype):
  model, tx, state, batches, counts = setup(num=3, local_steps=2, rounds=2)
  server_tx = fjt.replicas.create_server_optimizer("nesterov", 0.7, 0.9)
  replicated = fjt.replicas.replicate(state, 3, server_tx)
  run_round = fjt.replicas.make_round(model, tx, server_tx,
                                      communication_dtype=communication_dtype)
  local_steps = jax.jit(jax.vmap(lambda s, b: jax.lax.scan(
      functools.partial(fjt.replicas.local_step, model, tx), s, b)[0]))
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  w, outer_state = state.params, outer.init(state.params)
  wire = jnp.dtype(communication_dtype)
  for r in range(2):
    trained = local_steps(replicated.replicas, batches[r])  # Before the round donates them.
    replicated, _ = run_round(replicated, batches[r], counts)
    sent = [jax.tree.map(lambda a, b: (a - b[k]).astype(wire), w, trained.params) for k in range(3)]
    pseudo_grad = jax.tree.map(lambda g: g.astype(jnp.float32), fjt.aggregate.mean(sent, counts))
    updates, outer_state = outer.update(pseudo_grad, outer_state)
    w = optax.apply_updates(w, updates)
  assert_close(rows(replicated.replicas)[0].params, w, rtol=1e-5, atol=1e-6)
