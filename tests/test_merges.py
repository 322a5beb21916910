"""TIES, DARE and SLERP (fjt.aggregate.ties, dare, slerp) against numpy implementations of their
formulas, from memory, from checkpoints on disk, sharded, and from mergekit-style YAML."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fjt
from fjt import aggregate, merge, merge_config
from fjt.aggregate import dare_mask, leaf_id
from fjt.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- numpy references of the formulas ------------------------------------------------


def np_top(tau, k):
  """Top-k by magnitude, ties to the lower flat index (a stable sort)."""
  order = np.argsort(-np.abs(tau).ravel(), kind="stable")
  mask = np.zeros(tau.size, bool)
  mask[order[:max(k, 0)]] = True
  return mask.reshape(tau.shape)


def np_elect(d, w):
  d = np.stack(d)
  elected = np.sign(d.sum(0))
  agree = np.sign(d) == elected
  divisor = (w[:, None] * agree.reshape(len(w), -1)).sum(0).reshape(d.shape[1:])
  return (d * agree).sum(0) / np.where(divisor == 0, 1, divisor)


def np_ties(base, xs, w, densities, scale):
  taus = [x - base for x in xs]
  d = [w[i] * np.where(np_top(t, int(f * t.size)), t, 0) for i, (t, f) in
       enumerate(zip(taus, densities))]
  return base + scale * np_elect(d, w)


def np_dare(base, xs, w, densities, seed, path, consensus):
  d = []
  for i, (x, f) in enumerate(zip(xs, densities)):
    mask = np.asarray(dare_mask(seed, leaf_id(path), i, base.shape, f))
    d.append(w[i] * np.where(mask, (x - base) / np.float32(f), 0))
  if consensus is None:
    return base + np.sum(d, axis=0) / w.sum()
  return base + np_elect(d, w)


def np_slerp(a, b, t):
  unit = lambda v: v / np.linalg.norm(v) if np.linalg.norm(v) > 1e-8 else v
  cos = np.clip(np.sum(unit(a.ravel()) * unit(b.ravel())), -1, 1)
  if abs(cos) > 0.9995:
    return (1 - t) * a + t * b
  theta = np.arccos(cos)
  return np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b


def trees(n=3, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  base = {"a": rng.normal(size=(7, 5)), "b": {"c": rng.normal(size=(13,))}}
  base = jax.tree.map(lambda x: x.astype(dtype), base)
  out = [jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(dtype), base)
         for _ in range(n)]
  for i, t in enumerate(out):
    t["step"] = np.int32(10 + i)
  return {**base, "step": np.int32(0)}, out


def close(x, y):
  np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2e-6,
                             atol=2e-6)


# --- in memory ----------------------------------------------------------------------------------


def test_top_magnitude_and_kth_largest_are_exact_with_ties():
  rng = np.random.default_rng(1)
  x = rng.integers(-4, 5, size=(9, 11)).astype(np.float32)  # Many equal magnitudes.
  for k in (0, 17, 98, 200):
    np.testing.assert_array_equal(np.asarray(aggregate.top_magnitude(jnp.asarray(x), k)),
                                  np_top(x, k))
  a = np.abs(rng.normal(size=70_000)).astype(np.float32)  # Over 2^16, with ties below.
  a[::7] = 0.5
  big = rng.integers(-50, 51, size=(300, 250)).astype(np.float32)  # Over 2^16, with ties.
  np.testing.assert_array_equal(np.asarray(aggregate.top_magnitude(jnp.asarray(big), 20_000)),
                                np_top(big, 20_000))
  kth = jax.jit(aggregate.kth_largest)  # k may be traced: one compilation.
  for k in (1, 714, 35_000, 70_000):
    assert float(kth(jnp.asarray(a), k)) == np.sort(a)[::-1][k - 1]


def test_counting_select_is_exact_on_hard_cases():
  """top_magnitude_cut (the counting select behind ties) against a stable argsort, where the
  guesses fail and the fallbacks decide: many equal magnitudes, an all-zero task vector, k of 1
  and size - 1, a prime size (rows of one entry), leaves large enough to be sampled."""
  import importlib
  ties_module = importlib.import_module("fjt.aggregate.ties")
  rng = np.random.default_rng(5)

  def check(taus, ks):
    taus = [np.asarray(t, np.float32) for t in taus]
    cut = jax.jit(lambda *ts: ties_module.top_magnitude_cut(lambda i: ts[i], ks))
    bits, cutoff = cut(*taus)
    for i, (tau, k) in enumerate(zip(taus, ks)):
      mask = np.asarray(ties_module._kept(jnp.asarray(tau), bits[i], cutoff[i]))
      np.testing.assert_array_equal(mask, np_top(tau, k), err_msg=f"k={k} of {tau.size}")

  sampled = 64 * 4096  # Leaves from this size start from a sample's guesses.
  shape = (sampled // 512 + 3, 512)
  few = rng.integers(-3, 4, size=shape).astype(np.float32)  # 4 magnitudes: huge ties.
  check([few, np.zeros(shape), rng.normal(size=shape) * 1e-3], [1, 77_777, shape[0] * 512 - 1])
  check([np.zeros(shape), few, few], [12_345, shape[0] * 512 - 1, 1])
  # A float32 task vector of nearby weights: magnitudes on a grid, dozens per value.
  base = rng.normal(size=shape).astype(np.float32)
  grid = (base + np.float32(0.01) * rng.normal(size=shape).astype(np.float32)) - base
  check([grid, grid[::-1], -grid], [int(0.2 * grid.size), int(0.9 * grid.size), 3])
  # One huge value, the rest tiny; +-Inf (overflowed differences) order above every finite.
  spike = rng.normal(size=shape).astype(np.float32) * 1e-30
  spike[5, 7] = 3e38
  spike[9, 1] = -np.inf
  check([spike, spike, spike], [1, 2, 1000])
  prime = 70_001  # Over 2^16 and prime: one entry per row when resolving ties.
  check([rng.integers(-2, 3, size=prime), rng.normal(size=prime)], [35_000, 69_999])
  check([rng.integers(-1, 2, size=(3, 5))], [7])


def test_ties_is_exact_for_float64_leaves():
  """float64 leaves select on 64-bit keys (x64 on, so in a child process)."""
  code = textwrap.dedent("""
      import jax; jax.config.update("jax_enable_x64", True)
      import numpy as np, jax.numpy as jnp
      from test_merges import np_ties
      from fjt import aggregate
      rng = np.random.default_rng(0)
      base = {"a": rng.normal(size=(600, 500)), "b": rng.integers(-3, 4, size=70_001) * 1.0}
      ts = [jax.tree.map(lambda x: x + 0.01 * rng.normal(size=x.shape), base) for _ in range(3)]
      ts[1]["b"] = base["b"] + rng.integers(-2, 3, size=70_001)
      out = aggregate.ties(base, ts, density=(0.2, 0.5, 0.99))
      for key in ("a", "b"):
        assert out[key].dtype == np.float64
        ref = np_ties(base[key], [t[key] for t in ts], np.ones(3), [0.2, 0.5, 0.99], 1.0)
        np.testing.assert_allclose(out[key], ref, rtol=1e-12, atol=1e-12)
      a = np.abs(rng.normal(size=300_000)); a[::3] = 0.5
      for k in (1, 1000, 150_000, 300_000):
        assert float(jax.jit(aggregate.kth_largest)(jnp.asarray(a), k)) == np.sort(a)[::-1][k - 1]
      """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


def test_ties_matches_numpy():
  base, ts = trees()
  w = np.array([1.0, 2.0, 0.5], np.float32)
  out = aggregate.ties(base, ts, density=0.3, weights=w, scale=0.7)
  for key in ("a",):
    close(out[key], np_ties(base[key], [t[key] for t in ts], w, [0.3] * 3, 0.7))
  close(out["b"]["c"], np_ties(base["b"]["c"], [t["b"]["c"] for t in ts], w, [0.3] * 3, 0.7))
  assert out["step"] == 12 and out["a"].dtype == np.float32  # Integer leaves: "max".
  # Density per model; default weights; density 1 keeps every entry.
  out = aggregate.ties(base, ts, density=(0.1, 0.5, 1.0))
  close(out["a"], np_ties(base["a"], [t["a"] for t in ts], np.ones(3), [0.1, 0.5, 1.0], 1.0))
  with pytest.raises(ValueError, match=r"density is 0; expected a fraction in \(0, 1\]"):
    aggregate.ties(base, ts, density=0)
  with pytest.raises(ValueError, match="merges task vectors: pass base="):
    aggregate.aggregate_trees("ties", ts)


def test_dare_matches_numpy_and_is_seeded():
  base, ts = trees()
  w = np.array([1.0, 3.0, 2.0], np.float32)
  for consensus in (None, "sum"):
    out = aggregate.dare(base, ts, density=0.4, seed=7, weights=w, consensus=consensus)
    for path, get in (("a", lambda t: t["a"]), ("b/c", lambda t: t["b"]["c"])):
      close(get(out), np_dare(get(base), [get(t) for t in ts], w, [0.4] * 3, 7, path, consensus))
  again = aggregate.dare(base, ts, density=0.4, seed=7, consensus="sum")
  np.testing.assert_array_equal(again["a"], aggregate.dare(base, ts, density=0.4, seed=7,
                                                           consensus="sum")["a"])
  other = aggregate.dare(base, ts, density=0.4, seed=8, consensus="sum")
  assert not np.array_equal(again["a"], other["a"])
  # The rule dare_ties is DARE with consensus "sum"; a leaf's masks depend on its path only.
  np.testing.assert_array_equal(
      aggregate.aggregate_trees("dare_ties", ts, base=base, params={"density": 0.4, "seed": 7})["a"],
      again["a"])
  sub = aggregate.dare({"a": base["a"]}, [{"a": t["a"]} for t in ts], density=0.4, seed=7,
                       consensus="sum")
  np.testing.assert_array_equal(sub["a"], again["a"])


def test_dare_keeps_density_and_rescales():
  n = 200_000
  base = {"w": jnp.zeros(n), "v": jnp.zeros(n)}
  tau = {"w": jnp.linspace(1.0, 2.0, n), "v": jnp.linspace(1.0, 2.0, n)}
  out = aggregate.dare(base, [tau], density=0.3, seed=0)
  for key in ("w", "v"):
    kept = np.asarray(out[key]) != 0
    assert abs(kept.mean() - 0.3) < 0.005
    np.testing.assert_array_equal(np.asarray(out[key])[kept], np.asarray(tau[key])[kept] / np.float32(0.3))
  # Independent per leaf (same shape, different paths) and per model.
  assert (np.asarray(out["w"]) != 0).tolist() != (np.asarray(out["v"]) != 0).tolist()
  m0, m1 = (np.asarray(dare_mask(0, leaf_id("w"), i, (n,), 0.3)) for i in (0, 1))
  assert abs((m0 & m1).mean() - 0.09) < 0.005  # Independent draws overlap density^2.


def test_slerp_matches_numpy_and_is_linear_when_colinear():
  rng = np.random.default_rng(3)
  a = {"x": rng.normal(size=(6, 4)).astype(np.float32), "n": np.int32(1)}
  b = {"x": rng.normal(size=(6, 4)).astype(np.float32), "n": np.int32(5)}
  for t in (0.0, 0.3, 1.0):
    out = aggregate.slerp(a, b, t)
    close(out["x"], np_slerp(a["x"], b["x"], t))
  assert out["n"] == 5
  # Colinear leaves (cos = 1, and -1) take the linear branch exactly.
  for c in (2.0, -3.0):
    b2 = {"x": (c * a["x"]).astype(np.float32), "n": np.int32(1)}
    close(aggregate.slerp(a, b2, 0.25)["x"], 0.75 * a["x"] + 0.25 * b2["x"])  # Not 0 (theta 0).
  # Just below the threshold (cos ~ 0.9994) the spherical formula is used and matches numpy.
  e = rng.normal(size=a["x"].shape).astype(np.float32)
  e -= np.sum(e * a["x"]) / np.sum(a["x"] ** 2) * a["x"]
  near = a["x"] + 0.0347 * np.linalg.norm(a["x"]) / np.linalg.norm(e) * e
  cos = np.sum(a["x"] * near) / np.linalg.norm(a["x"]) / np.linalg.norm(near)
  assert 0.999 < cos < 0.9995
  close(aggregate.slerp(a, {"x": near, "n": np.int32(1)}, 0.4)["x"], np_slerp(a["x"], near, 0.4))
  with pytest.raises(ValueError, match="slerp interpolates 2 models, got 3"):
    aggregate.aggregate_trees("slerp", [a, a, a])


def test_bfloat16_inputs_accumulate_in_float32():
  base, ts = trees(dtype=np.float32)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16) if x.dtype == np.float32
                                else x, t)
  b16, t16 = cast(base), [cast(t) for t in ts]
  up = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32) if x.dtype == jnp.bfloat16
                              else x, t)
  for got, want in (
      (aggregate.ties(b16, t16, density=0.5)["a"],
       np_ties(up(b16)["a"], [up(t)["a"] for t in t16], np.ones(3), [0.5] * 3, 1.0)),
      (aggregate.dare(b16, t16, density=0.5, seed=1, consensus="sum")["a"],
       np_dare(up(b16)["a"], [up(t)["a"] for t in t16], np.ones(3), [0.5] * 3, 1, "a", "sum")),
      (aggregate.slerp(t16[0], t16[1], 0.3)["a"], np_slerp(up(t16[0])["a"], up(t16[1])["a"], 0.3))):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jnp.asarray(want.astype(np.float32), jnp.bfloat16),
                                             np.float32))


def test_stacked_rules_take_a_base():
  base, ts = trees()
  floats = lambda t: {"a": t["a"], "b": t["b"]}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[floats(t) for t in ts])
  got = jax.jit(lambda s, b: aggregate.aggregate_stacked("dare_ties", s, jnp.ones(3), base=b))(
      stacked, floats(base))
  want = aggregate.dare(floats(base), [floats(t) for t in ts], density=0.2, seed=0,
                        consensus="sum")
  close(got["a"], want["a"])
  close(got["b"]["c"], want["b"]["c"])


# --- sharded inputs keep their shardings (8 simulated devices, a subprocess) ------------------

SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fjt import aggregate
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"k": P("data", "model"), "v": P("model")}
    rng = np.random.default_rng(0)
    host = lambda: {"k": rng.normal(size=(16, 32)).astype(np.float32),
                    "v": rng.normal(size=(64,)).astype(np.float32)}
    base, ts = host(), [host() for _ in range(3)]
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
    for name, f in [("ties", lambda b, t: aggregate.ties(b, t, density=0.3)),
                    ("dare", lambda b, t: aggregate.dare(b, t, density=0.3, seed=2, consensus="sum")),
                    ("slerp", lambda b, t: aggregate.slerp(t[0], t[1], 0.3))]:
      got, want = f(put(base), [put(t) for t in ts]), f(base, ts)
      for k in specs:
        assert got[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), got[k].ndim), (name, k, got[k].sharding)
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    print("ok")
""")


def test_sharded_inputs_keep_their_shardings():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  process = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == 0 and "ok" in process.stdout, process.stderr[-3000:]


# --- checkpoints on disk, the CLI and mergekit-style YAML ---------------------------------------


@pytest.fixture
def on_disk(tmp_path, monkeypatch):
  monkeypatch.setattr(merge, "MIN_PIECE_BYTES", 0)  # Several groups of leaves, even when tiny.
  base, ts = trees()
  rng = np.random.default_rng(5)
  stats = [{"bn": {"mean": rng.normal(size=4).astype(np.float32),
                   "var": rng.uniform(1, 2, size=4).astype(np.float32)}} for _ in range(4)]
  floats = lambda t: {"a": t["a"], "b": t["b"]}
  paths = []
  for name, tree, s in zip(["base", "t0", "t1", "t2"], [base] + ts, stats):
    fjt.checkpoint.save(str(tmp_path / name), {"params": floats(tree), "batch_stats": s})
    paths.append(str(tmp_path / name))
  return tmp_path, paths, floats(base), [floats(t) for t in ts], stats[1:]


def test_streaming_from_disk_equals_in_memory(on_disk):
  tmp, paths, base, ts, stats = on_disk
  w = [1.0, 2.0, 1.0]
  result = merge.average_checkpoints(paths[1:], str(tmp / "ties"), w, "ties", base=paths[0],
                                     params={"density": 0.3}, progress=False)
  want = aggregate.ties(base, ts, density=0.3, weights=w)
  for got in (result.variables, fjt.checkpoint.load_variables(str(tmp / "ties"))):
    np.testing.assert_array_equal(got["params"]["a"], want["a"])
    np.testing.assert_array_equal(got["params"]["b"]["c"], want["b"]["c"])
    merged_stats = aggregate.merge_batch_stats(stats, w)  # The exact pooled rule, not TIES.
    np.testing.assert_array_equal(got["batch_stats"]["bn"]["var"], merged_stats["bn"]["var"])
  result = merge.average_checkpoints(paths[1:], str(tmp / "dt"), None, "dare_ties",
                                     base=paths[0], params={"density": 0.5, "seed": 3},
                                     progress=False)
  want = aggregate.dare(base, ts, density=0.5, seed=3, consensus="sum")
  np.testing.assert_array_equal(result.variables["params"]["b"]["c"], want["b"]["c"])
  with pytest.raises(ValueError, match="merges task vectors: give the base checkpoint"):
    merge.average_checkpoints(paths[1:], str(tmp / "x"), method="ties", progress=False)


def test_cli_and_mergekit_yaml(on_disk, capsys):
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import average
  tmp, paths, base, ts, _ = on_disk
  assert average.main(["--method", "slerp", "--base", paths[1], paths[2], "--t", "0.3",
                       "--out", str(tmp / "slerp")]) == 0
  got = fjt.checkpoint.load_variables(str(tmp / "slerp"))["params"]
  np.testing.assert_array_equal(got["a"], aggregate.slerp(ts[0], ts[1], 0.3)["a"])
  (tmp / "merge.yml").write_text(textwrap.dedent(f"""\
      merge_method: ties
      base_model: {paths[0]}
      models:
        - model: {paths[1]}
          parameters: {{weight: 1.0, density: 0.2}}
        - model: {paths[2]}
          parameters: {{weight: 2.0, density: 0.5}}
        - model: {paths[3]}
          parameters: {{weight: 1.0, density: 0.2}}
      parameters: {{lambda: 0.8, normalize: true}}
      """))
  assert average.main(["--config", str(tmp / "merge.yml"), "--out", str(tmp / "yml")]) == 0
  got = fjt.checkpoint.load_variables(str(tmp / "yml"))["params"]
  want = aggregate.ties(base, ts, density=(0.2, 0.5, 0.2), weights=[1, 2, 1], scale=0.8)
  np.testing.assert_array_equal(got["a"], want["a"])
  (tmp / "bad.yml").write_text(f"merge_method: ties\nbase_model: {paths[0]}\ndtype: bfloat16\n"
                               f"models:\n  - model: {paths[1]}\n")
  capsys.readouterr()
  assert average.main(["--config", str(tmp / "bad.yml"), "--out", str(tmp / "bad")]) != 0
  assert "key 'dtype' is not supported by fjt" in capsys.readouterr().err
  with pytest.raises(ConfigError, match=r"models\[0\].parameters.gamma"):
    merge_config.parse_merge_config(
        {"merge_method": "ties", "models": [{"model": "x", "parameters": {"gamma": 1}}]})


def test_text_sources_keep_the_vocabulary():
  from fjt.data import text
  files = (("email/a.py", (("alpha", "beta"),)), ("email/b.py", (("beta", "gamma"),)),
           ("http/c.py", (("delta", "delta", "alpha"),)))
  val = lambda p: p == "email/b.py"
  full = text.window_dataset(files, 10, 2, 10, is_validation=val)
  part = text.window_dataset(files, 10, 2, 10, is_validation=val, sources=("email",))
  assert part.info["vocab"] == full.info["vocab"]
  assert part.info["train_tokens"] == 2 and part.sources.names == ("email",)
  with pytest.raises(ValueError, match="data.sources: no file has source 'ftp'"):
    text.window_dataset(files, 10, 2, 10, is_validation=val, sources=("ftp",))


def test_a_replica_round_ties_merges_the_replicas_task_vectors():
  import fjt.replicas
  from test_replicas import assert_close, rows, setup, tiny_run
  model, tx, state, batches, counts = setup(num=3, local_steps=2, rounds=1)
  replicated = fjt.replicas.replicate(state, 3, None)
  start, step = rows(replicated.replicas), tiny_run(2)[3]
  trained = []
  for k, s in enumerate(start):
    for t in range(2):
      s, _ = step(s, jax.tree.map(lambda x: x[k, t], batches[0]))
    trained.append(s)
  # The round's global params are the base; the replicas' params the fine-tunes.
  want = aggregate.ties(start[0].params, [s.params for s in trained], density=0.5,
                        weights=counts)
  run_round = fjt.replicas.make_round(model, tx, aggregate="ties",
                                      aggregate_params={"density": 0.5})
  replicated, _ = run_round(replicated, batches[0], counts)
  for got in rows(replicated.replicas):
    assert_close(got.params, want)
