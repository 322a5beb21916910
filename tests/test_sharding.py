"""Sharded train state over data x fsdp x model meshes (simulated CPU devices, subprocesses)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import ROOT
from fjt import sharding
from fjt.config import RUN_DEFAULTS, ConfigError

WORKER = os.path.join(ROOT, "tests", "sharded_worker.py")
RULES = RUN_DEFAULTS["sharding_rules"]


def mesh(data=1, fsdp=1, model=1):
  return AbstractMesh((data, fsdp, model), ("data", "fsdp", "model"))


def test_mesh_spec_maps_logical_names_through_the_rules():
  spec = lambda logical, shape, dtype="float32", m=mesh(2, 4, 1): sharding.mesh_spec(
      P(*logical), shape, dtype, m, RULES)
  assert spec(("embed", "mlp"), (32, 128)) == P("fsdp")  # model=1: not split over it.
  assert spec(("embed", "mlp"), (32, 128), m=mesh(1, 4, 2)) == P("fsdp", "model")
  assert spec(("mlp", "embed"), (128, 32), m=mesh(1, 4, 2)) == P("model", "fsdp")  # Row split.
  assert spec(("vocab", "embed"), (10, 32), m=mesh(1, 4, 4)) == P(None, "fsdp")  # 4 ∤ 10.
  # ZeRO-3: leaves without names are split over fsdp on their largest dimension it divides.
  assert spec((), (6, 64)) == P(None, "fsdp")
  assert spec((), (10,)) == P()  # Nothing divides: replicated.
  assert spec((), (2,), "uint32") == P()  # Integer leaves (rng, step) stay replicated.
  assert spec((), (64,), m=mesh(8, 1, 1)) == P()  # Pure data parallel: replicated.


def test_train_mesh_errors_name_the_key():
  with pytest.raises(ConfigError, match="'mesh.pipe': unknown mesh axis"):
    sharding.create_train_mesh({"pipe": 2}, {})
  with pytest.raises(ConfigError, match="uses 2 of the 1 devices|cannot lay"):
    sharding.create_train_mesh({"data": 1, "fsdp": 2}, {})


def test_sharding_options_check_the_config():
  from conftest import tiny_digits_config
  from fjt.options import ShardingOptions
  config = tiny_digits_config("mlp")
  assert ShardingOptions.from_config(config).mesh == {"data": -1, "fsdp": 1, "model": 1}
  config.mesh.fsdp = 0
  with pytest.raises(ConfigError, match="'mesh.fsdp': expected a positive int or -1"):
    ShardingOptions.from_config(config)
  config.mesh.fsdp = 2
  config.sharding_rules = (("embed", "tensor"),)
  with pytest.raises(ConfigError, match="'sharding_rules': expected pairs"):
    ShardingOptions.from_config(config)


def run_worker(out, devices, *checks, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  process = subprocess.run([sys.executable, WORKER, str(out), *checks], env=env,
                           capture_output=True, text=True, timeout=timeout)
  assert process.returncode == 0, process.stderr[-4000:]
  return [json.load(open(os.path.join(out, c + ".json"))) for c in checks], process.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The reference run on one device, then every 8-device check in one process."""
  out = tmp_path_factory.mktemp("sharded")
  (reference,), _ = run_worker(out, 1, "reference")
  (meshes, reshard, aggregate, replicas), stderr = run_worker(out, 8, "meshes", "reshard",
                                                              "aggregate", "replicas")
  return out, reference, meshes, reshard, stderr, aggregate, replicas


def max_diff(out, a, b):
  x, y = np.load(os.path.join(out, a + ".npz")), np.load(os.path.join(out, b + ".npz"))
  assert sorted(x) == sorted(y)
  return max(float(np.max(np.abs(x[k] - y[k]))) for k in x)


@pytest.mark.parametrize("name", ["d2f4", "m2f4"])
def test_sharded_runs_match_one_device(runs, name):
  out, reference, meshes, *_ = runs
  assert max_diff(out, "one", name) < 1e-4
  np.testing.assert_allclose(list(meshes[name]["losses"].values()),
                             list(reference["losses"].values()), rtol=1e-4)


def test_fsdp_keeps_a_quarter_of_the_state_per_device(runs):
  _, _, meshes, *_ = runs
  for name in ("d2f4", "m2f4"):
    run = meshes[name]
    assert run["devices"] == 8
    # fjt.summary's per-device total is what the arrays' own addressable_shards hold.
    assert (run["summary_per_device"], run["summary_total"]) == (run["max_held"], run["total"])
    ratio = run["max_held"] / (run["total"] / 4)
    print(name, "bytes per device / (total / 4) =", ratio)
    assert ratio <= 1.15
  specs = meshes["m2f4"]["specs"]
  assert specs["params/c_fc_0/kernel"] == "P('fsdp', 'model')"
  assert specs["params/mlp_proj_0/kernel"] == "P('model', 'fsdp')"
  assert specs["opt_state/0/0/mu/c_fc_0/kernel"] == "P('fsdp', 'model')"
  assert specs["step"] == "P()"


def test_checkpoint_saved_on_data2_fsdp4_restores_bitwise_on_other_meshes(runs):
  _, _, _, reshard, *_ = runs
  assert reshard["bitwise"] == {"f8": True, "d8": True, "one": True}


@pytest.mark.parametrize("name", ["f8", "d8"])
def test_training_resumed_on_another_mesh_continues(runs, name):
  out, _, meshes, reshard, stderr, *_ = runs
  resumed, uninterrupted = reshard["resumed"][name], meshes["d2f4"]["losses"]
  assert sorted(resumed, key=int) == sorted(uninterrupted, key=int)  # Steps 10 .. 50.
  np.testing.assert_allclose([resumed[k] for k in uninterrupted], list(uninterrupted.values()),
                             rtol=1e-4)
  assert max_diff(out, "d2f4", f"resume_{name}") < 1e-4
  mesh = {"f8": "data=1 x fsdp=8 x model=1", "d8": "data=8 x fsdp=1 x model=1"}[name]
  assert (f"was saved on mesh data=2 x fsdp=4 x model=1; resuming on mesh {mesh} "
          "(resharded on restore)") in stderr


def test_aggregate_of_sharded_states_equals_that_of_the_gathered_ones(runs):
  aggregate = runs[5]
  assert aggregate["sharded_leaves"] > 10
  # Bitwise equal to the mean of the host copies, with the inputs' shardings.
  assert (aggregate["mean"], aggregate["weighted"], aggregate["running"],
          aggregate["batch_stats"]) == (True, True, True, True)
  # Shard by shard: no leaf is gathered (the only collective reduces finiteness flags).
  assert not any(op.startswith(("all-gather", "all-to-all")) for op in aggregate["collectives"])


def test_average_script_reads_checkpoints_saved_sharded(runs):
  out = runs[0]
  inputs = [str(out / "d2f4"), str(out / "m2f4")]
  process = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "average.py"),
                            "--out", str(out / "soup"), *inputs], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 0, process.stderr[-3000:]
  from fjt import aggregate, checkpoint
  expected = aggregate.mean([checkpoint.load_variables(p)["params"] for p in inputs])
  soup = checkpoint.load(out / "soup")["params"]
  for got, want in zip(jax.tree.leaves(soup), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_summary_of_a_config_on_a_mesh_needs_no_devices():
  config = os.path.join(ROOT, "configs", "digits_mlp.py")
  from fjt import summary
  rows = {r.path: r for r in summary.state_table(config, mesh={"data": 2, "fsdp": 4})}
  kernel = rows["params/Dense_0/kernel"]  # (64, 256): named (embed, mlp); embed -> fsdp.
  assert (kernel.sharding, kernel.bytes, kernel.device_bytes) == ("P('fsdp',)", 65536, 16384)
  assert rows["params/Dense_2/bias"].sharding == "P()"  # 10 classes: 4 does not divide.
  assert rows["step"].sharding == "P()"
  total = summary.totals(list(rows.values()))["total"]["bytes"]
  assert summary.bytes_per_device(list(rows.values())) <= 1.15 * total / 4
  process = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "summary.py"), config,
                            "--mesh", "data=2,fsdp=4"], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 0, process.stderr
  assert "P('fsdp',)" in process.stdout and "per device: " in process.stdout


def test_replicas_with_each_replica_sharded_over_fsdp(runs):
  replicas = runs[6]
  sharded, replicated = replicas["fsdp"], replicas["replicated"]
  for a, b in zip(sharded["leaves"], replicated["leaves"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sharded["loss"], replicated["loss"], rtol=1e-5, atol=1e-5)
  # Dense_0/kernel (64, 16) is named (embed, mlp): the replica axis, then embed -> fsdp.
  assert (sharded["kernel_spec"], replicated["kernel_spec"]) == ("P('replica', 'fsdp')",
                                                                 "P('replica',)")
  assert sharded["server_spec"] == "P('fsdp',)"  # Server momentum laid out as the params.
  assert sharded["final_spec"] == "P('fsdp',)"  # The aggregate model stays split.
  assert sharded["max_held"] < 0.6 * replicated["max_held"]


GPT_CONFIG = os.path.join(ROOT, "configs", "text_gpt.py")


@pytest.mark.skipif(not os.path.exists(GPT_CONFIG), reason="configs/text_gpt.py not merged yet")
def test_text_gpt_sharded_matches_one_device_and_keeps_a_quarter_per_device(tmp_path):
  (one,), _ = run_worker(tmp_path, 1, "gpt")
  (sharded,), _ = run_worker(tmp_path, 8, "gpt")
  for name in ("gpt_d2f4", "gpt_m2f4"):
    run = sharded[name]
    assert max_diff(tmp_path, "gpt_one", name) < 1e-4
    np.testing.assert_allclose(list(run["losses"].values()), list(one["one"]["losses"].values()),
                               rtol=1e-4)
    ratio = run["max_held"] / (run["total"] / 4)
    print(f"{name}: bytes per device / (total / 4) = {ratio:.4f}, "
          f"params max |diff| = {max_diff(tmp_path, 'gpt_one', name):.2e}")
    assert run["summary_per_device"] == run["max_held"] and ratio <= 1.15
  specs = sharded["gpt_m2f4"]["specs"]
  assert specs["h_0/attn/c_attn/kernel"] == "P('fsdp', 'model')"  # Column split.
  assert specs["h_0/attn/c_proj/kernel"] == "P('model', 'fsdp')"  # Row split.
  assert specs["h_0/mlp/c_fc/kernel"] == "P('fsdp', 'model')"
  assert specs["wte/embedding"] == "P('model', 'fsdp')"  # (vocab, embed).
