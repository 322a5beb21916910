"""Runs the sharded-state checks of test_sharding.py in one process with N simulated devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py OUT_DIR CHECK...

Each check writes its numbers into OUT_DIR/<check>.json (and arrays into .npz) for the test to
compare across processes. A process with one device runs the reference runs.
"""

import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fjt  # noqa: E402
import fjt.summary  # noqa: E402
from conftest import tiny_digits_config  # noqa: E402
from fjt import checkpoint, sharding  # noqa: E402
from fjt.tree import flatten, to_nested_dict  # noqa: E402

STEPS = 50


def _part(names, init=nn.initializers.normal(0.02)):
  return nn.with_logical_partitioning(init, names)


@fjt.models.register("tiny_stack")
class TinyStack(nn.Module):
  """A transformer-like Dense stack with GPT-2's logical axes: an input projection (vocab,
  embed), per block a column-split/row-split pair for attention (heads) and for the MLP (mlp),
  LayerNorms, and a head (embed, vocab)."""
  width: int = 32
  layers: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(self.width, kernel_init=_part(("vocab", "embed")), name="wte")(
        x.reshape(x.shape[0], -1))
    for i in range(self.layers):
      y = nn.LayerNorm(scale_init=_part(("norm",), nn.initializers.ones), name=f"ln_{i}")(h)
      y = nn.Dense(2 * self.width, kernel_init=_part(("embed", "heads")), name=f"c_attn_{i}")(y)
      h = h + nn.Dense(self.width, kernel_init=_part(("heads", "embed")), name=f"attn_proj_{i}")(
          nn.tanh(y))
      y = nn.Dense(4 * self.width, kernel_init=_part(("embed", "mlp")), name=f"c_fc_{i}")(h)
      h = h + nn.Dense(self.width, kernel_init=_part(("mlp", "embed")), name=f"mlp_proj_{i}")(
          nn.relu(y))
    return nn.Dense(self.num_classes, kernel_init=_part(("embed", "vocab")), name="head")(h)


def config(mesh=None, steps=STEPS):
  c = tiny_digits_config("mlp", steps=steps)
  c.model = fjt.config.ml_collections.ConfigDict({"name": "tiny_stack", "width": 32, "layers": 2,
                                                  "num_classes": 10})
  c.optimizer = fjt.config.ml_collections.ConfigDict(  # sgd's own momentum/nesterov go.
      {k: v for k, v in c.optimizer.items() if k not in ("momentum", "nesterov")})
  c.optimizer.name, c.optimizer.learning_rate = "adamw", 3e-3
  c.train.eval_batch_size = 512
  c.checkpoint.every_steps = 25
  c.checkpoint.best_metric = ""
  c.ema.decay = 0.9
  c.swa.every = 0
  if mesh:
    c.mesh = fjt.config.ml_collections.ConfigDict(mesh)
  return c


def save_params(out, name, state):
  np.savez(os.path.join(out, name + ".npz"), **{k: np.asarray(v) for k, v in
                                              flatten(to_nested_dict(state.params)).items()})


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def check_reference(out):
  state, _ = fjt.fit(config(), os.path.join(out, "one"), progress=False)
  save_params(out, "one", state)
  return {"losses": losses(os.path.join(out, "one"))}


def check_meshes(out):
  result = {}
  for name, mesh in (("d2f4", {"data": 2, "fsdp": 4}), ("m2f4", {"fsdp": 4, "model": 2})):
    workdir = os.path.join(out, name)
    state, _ = fjt.fit(config(mesh), workdir, progress=False)
    save_params(out, name, state)
    held = sharding.bytes_per_device(state)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    rows = fjt.summary.state_table(state)
    result[name] = {"losses": losses(workdir), "total": total, "max_held": max(held.values()),
                    "summary_per_device": fjt.summary.bytes_per_device(rows),
                    "summary_total": fjt.summary.totals(rows)["total"]["bytes"],
                    "devices": len(held),
                    "specs": {k: str(sharding.partition_spec(v)) for k, v in
                              flatten(to_nested_dict(state)).items()}}
  return result


def target_state(mesh):
  """A fresh state of ``config(mesh)`` laid out on that mesh (None: on one device)."""
  c = config(mesh)
  example = jnp.zeros((1, 64), jnp.float32)
  devices = None if mesh is None else sharding.create_train_mesh(c.mesh, {})
  return fjt.state.create_from_config(c, example, mesh=devices)[2]


def check_reshard(out):
  """The step-25 checkpoint of the data=2 x fsdp=4 run onto other meshes, bitwise; then that
  run resumed from step 25 on fsdp=8 and on data=8."""
  step25 = os.path.join(out, "d2f4", "checkpoints", "25")
  saved = flatten(checkpoint.load(step25))
  result = {"bitwise": {}}
  for name, mesh in (("f8", {"fsdp": 8}), ("d8", {"data": 8}), ("one", None)):
    target = target_state(mesh)
    restored = checkpoint.load(step25, target)
    flat, target_flat = flatten(to_nested_dict(restored)), flatten(to_nested_dict(target))
    result["bitwise"][name] = (
        sorted(flat) == sorted(saved)
        and all(np.array_equal(np.asarray(flat[k]), np.asarray(saved[k])) for k in saved)
        and all(flat[k].sharding == target_flat[k].sharding for k in flat))
  result["resumed"] = {}
  for name, mesh in (("f8", {"fsdp": 8}), ("d8", {"data": 8})):
    workdir = os.path.join(out, f"resume_{name}")
    shutil.copytree(os.path.join(out, "d2f4"), workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "50"))  # As if killed after step 25.
    state, _ = fjt.fit(config(mesh), workdir, progress=False)
    save_params(out, f"resume_{name}", state)
    result["resumed"][name] = losses(workdir)
  return result


def _same(result, reference, inputs) -> bool:
  """Bitwise equal to ``reference`` and laid out as ``inputs``, leaf by leaf."""
  return all(np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == c.sharding
             for a, b, c in zip(jax.tree.leaves(result), jax.tree.leaves(reference),
                                jax.tree.leaves(inputs)))


def check_aggregate(out):
  """mean / RunningMean / merge_batch_stats of three data=2 x fsdp=4 states against the same
  computed on the gathered (host) trees."""
  mesh = sharding.create_train_mesh({"data": 2, "fsdp": 4}, {})
  example = jnp.zeros((1, 64), jnp.float32)
  states = []
  for seed in range(3):
    c = config({"data": 2, "fsdp": 4})
    c.seed = seed
    states.append(fjt.state.create_from_config(c, example, mesh=mesh)[2])
  gathered = [jax.device_get(s) for s in states]
  stream = fjt.aggregate.RunningMean()
  for s in states:
    stream.add(s)
  hlo = fjt.aggregate._mean_leaves.lower(
      [jax.tree.leaves(s) for s in states], fjt.aggregate._weights_array(np.ones(3)),
      "max").compile().as_text()
  rng = np.random.default_rng(0)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  stats = [{"BatchNorm_0": {"mean": rng.standard_normal(64).astype(np.float32),
                            "var": rng.uniform(0.5, 2, 64).astype(np.float32)}} for _ in range(3)]
  sharded_stats = [jax.device_put(t, split) for t in stats]
  counts = [10, 20, 30]
  return {
      "mean": _same(fjt.aggregate.mean(states), fjt.aggregate.mean(gathered), states[0]),
      "weighted": _same(fjt.aggregate.mean(states, weights=[1, 2, 3]),
                        fjt.aggregate.mean(gathered, weights=[1, 2, 3]), states[0]),
      "running": _same(stream.result(), fjt.aggregate.mean(gathered), states[0]),
      "batch_stats": _same(fjt.aggregate.merge_batch_stats(sharded_stats, counts),
                           fjt.aggregate.merge_batch_stats(stats, counts), sharded_stats[0]),
      "collectives": [line.split("=")[1].split("(")[0].strip() for line in hlo.splitlines()
                      if any(op in line for op in ("all-gather", "all-to-all", "all-reduce"))],
      "sharded_leaves": sum(not leaf.sharding.is_fully_replicated
                            for leaf in jax.tree.leaves(states[0])),
  }


def check_replicas(out):
  """Two DiLoCo rounds of 4 replicas: on 4 devices (states replicated within each replica) and
  on 8 devices as replica=4 x fsdp=2 (each replica's state split over 2 devices)."""
  import fjt.replicas as replicas
  from fjt.data import splits
  c = tiny_digits_config("mlp")
  c.model.features = (16,)
  c.ema.decay, c.swa.every, c.optimizer.warmup_steps, c.train.steps = 0.0, 0, 1, 4
  data = fjt.load_dataset(c.data).train
  num = 4
  shards = splits.iid_split(data["y"], num, 0)
  counts = np.asarray([len(s) for s in shards], np.float32)
  model, tx, state = fjt.create_from_config(c, data["x"][:1])
  server_tx = replicas.create_server_optimizer("nesterov", 0.7, 0.9)
  result = {}
  for name, devices, fsdp in (("replicated", jax.devices()[:4], 1), ("fsdp", jax.devices(), 2)):
    mesh = replicas.replica_mesh(num, devices, fsdp=fsdp)
    one, layout = (None, None) if fsdp == 1 else replicas.sharded_layout(
        model, tx, server_tx, data["x"][:1], mesh, fjt.config.RUN_DEFAULTS["sharding_rules"])
    run = replicas.shard_state(replicas.replicate(state, num, server_tx), mesh, layout)
    run_round = replicas.make_round(model, tx, server_tx, mesh, "average", layout=layout)
    for r in range(2):
      batches = splits.replica_batches(data, shards, 0, 2 * r, 2, 8)
      run, metrics = run_round(run, replicas.shard_replicas(batches, mesh),
                               replicas.shard_replicas(counts, mesh))
    final = replicas.global_state(run, mesh, one)
    result[name] = {
        "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(run)],
        "loss": np.asarray(metrics["loss"]).tolist(),
        "kernel_spec": str(run.replicas.params["Dense_0"]["kernel"].sharding.spec),
        "server_spec": str(jax.tree.leaves(run.server_opt_state)[-1].sharding.spec),
        "final_spec": str(final.params["Dense_0"]["kernel"].sharding.spec),
        "max_held": max(sharding.bytes_per_device(run).values())}
  return result


GPT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "text_gpt.py")


def gpt_config(mesh=None):
  """configs/text_gpt.py for STEPS steps (warm-up shortened to fit), evaluated at the end."""
  c = fjt.load_config(GPT_CONFIG)
  c.train.steps = c.train.eval_every = c.checkpoint.every_steps = STEPS
  c.train.log_every = 10
  c.optimizer.warmup_steps = 10
  if mesh:
    c.mesh = fjt.config.ml_collections.ConfigDict(mesh)
  return c


def check_gpt(out):
  """configs/text_gpt.py on this process's devices: one device (the reference), or
  data=2 x fsdp=4 and fsdp=4 x model=2 on eight."""
  meshes = ((("one", None),) if jax.device_count() == 1 else
            (("gpt_d2f4", {"data": 2, "fsdp": 4}), ("gpt_m2f4", {"fsdp": 4, "model": 2})))
  result = {}
  for name, mesh in meshes:
    workdir = os.path.join(out, name if mesh else "gpt_one")
    state, summary = fjt.fit(gpt_config(mesh), workdir, progress=False)
    save_params(out, name if mesh else "gpt_one", state)
    held = sharding.bytes_per_device(state)
    result[name] = {"losses": losses(workdir), "eval": summary["eval"],
                    "total": sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
                    "max_held": max(held.values()),
                    "summary_per_device": fjt.summary.bytes_per_device(
                        fjt.summary.state_table(state)),
                    "specs": {k: str(sharding.partition_spec(v)) for k, v in
                              flatten(to_nested_dict(state.params)).items()}}
  return result


def main():
  out, checks = sys.argv[1], sys.argv[2:]
  for check in checks:
    result = globals()[f"check_{check}"](out)
    with open(os.path.join(out, check + ".json"), "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
