import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import fjt
from fjt import aggregate as agg
from fjt.data import digits

SETTINGS = settings(max_examples=25, deadline=None)
SHAPES = {"a": (3,), "b": (2, 2)}


def tree_of(a, b, step=0):
  return {"params": {"a": jnp.asarray(a), "b": jnp.asarray(b)}, "step": jnp.asarray(step, jnp.int32)}


def equal_trees(x, y):
  """Bit-exact equality of two trees (structure, dtypes and values)."""
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@st.composite
def float_trees(draw, elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_n=1,
                max_n=6):
  n = draw(st.integers(min_n, max_n))
  arrays = lambda shape: hnp.arrays(np.float32, shape, elements=elements)
  return [tree_of(draw(arrays(SHAPES["a"])), draw(arrays(SHAPES["b"])), step=draw(st.integers(0, 9)))
          for _ in range(n)]


weights_st = st.floats(0.125, 8.0, width=32)


# --- Paths and the seed algorithm -------------------------------------------------------------


def test_tree_paths_of_a_train_state():
  model = fjt.MLP(features=(8,), num_classes=3)
  state = jax.eval_shape(lambda: fjt.create_train_state(model, optax.adam(1e-3), jnp.zeros((1, 64)),
                                                       jax.random.PRNGKey(0)))
  paths = agg.tree_paths(state)
  assert paths[0] == "step" and paths[-1] == "rng"
  assert "params/Dense_0/kernel" in paths
  assert "batch_stats/BatchNorm_0/var" in paths
  assert "opt_state/0/mu/Dense_1/bias" in paths  # Tuple index, then the dicts inside.
  assert agg.tree_paths([{"x": 1}, (2, 3)]) == ["0/x", "1/0", "1/1"]
  assert agg.tree_paths(jnp.zeros(2)) == [""]


def test_mean_of_train_states():
  model = fjt.MLP(features=(8,), num_classes=3)
  shapes = jax.eval_shape(lambda: fjt.create_train_state(model, optax.sgd(0.1, momentum=0.9),
                                                         jnp.zeros((1, 64)), jax.random.PRNGKey(0)))
  rng = np.random.RandomState(0)
  states = [jax.tree.map(lambda s: rng.randint(0, 9, s.shape).astype(s.dtype), shapes)
            for _ in range(3)]
  states = [s.replace(step=np.int32(step)) for s, step in zip(states, (10, 30, 20))]
  out = agg.mean(states)
  assert isinstance(out, fjt.TrainState) and int(out.step) == 30 and out.step.dtype == jnp.int32
  kernels = [np.asarray(s.params["Dense_0"]["kernel"]) for s in states]
  np.testing.assert_allclose(out.params["Dense_0"]["kernel"], sum(kernels) / 3, rtol=1e-6)
  wider = jax.eval_shape(lambda: fjt.create_train_state(
      fjt.MLP(features=(8,), num_classes=3), optax.sgd(0.1, momentum=0.9), jnp.zeros((1, 32)),
      jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match=r"input 1 differs from input 0 at params/Dense_0/kernel: "
                                       r"shape \(32, 8\) in input 1, \(64, 8\) in input 0"):
    agg.check_compatible([shapes, wider])


def test_seed_algorithm_hand_example():
  trees = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([5.0, 9.0])}]
  np.testing.assert_array_equal(agg.mean(trees)["w"], [3.0, 5.0])
  # Weighted: (1*1 + 1*3 + 2*5) / 4 = 3.5, (2 + 4 + 2*9) / 4 = 6.
  np.testing.assert_array_equal(agg.mean(trees, weights=[1, 1, 2])["w"], [3.5, 6.0])
  np.testing.assert_array_equal(agg.uniform_soup(trees)["w"], [3.0, 5.0])


@SETTINGS
@given(float_trees(elements=st.floats(width=32, allow_nan=False, allow_infinity=False), max_n=1),
       st.integers(1, 8), st.lists(weights_st, min_size=8, max_size=8))
def test_mean_of_identical_trees_is_the_tree_exactly(one, n, weights):
  trees = one * n
  equal_trees(agg.mean(trees), one[0])
  equal_trees(agg.mean(trees, weights=weights[:n]), one[0])


@SETTINGS
@given(float_trees(elements=st.integers(-1000, 1000).map(float), min_n=2),
       st.lists(st.integers(1, 20), min_size=6, max_size=6), st.randoms())
def test_permutation_invariance_is_exact_when_the_sum_is_exact(trees, weights, rnd):
  # Integer values times integer weights sum exactly in float32, so the only rounding is the
  # final division: the result is correctly rounded, hence independent of the order.
  weights = weights[:len(trees)]
  order = list(range(len(trees)))
  rnd.shuffle(order)
  equal_trees(agg.mean(trees, weights), agg.mean([trees[i] for i in order], [weights[i] for i in order]))


@SETTINGS
@given(float_trees(min_n=2), st.lists(weights_st, min_size=6, max_size=6), st.randoms())
def test_permutation_invariance_within_float32_rounding(trees, weights, rnd):
  weights = weights[:len(trees)]
  order = list(range(len(trees)))
  rnd.shuffle(order)
  a = agg.mean(trees, weights)
  b = agg.mean([trees[i] for i in order], [weights[i] for i in order])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-3), a, b)


@SETTINGS
@given(float_trees(), st.lists(weights_st, min_size=6, max_size=6), st.floats(1e-3, 1e3),
       st.integers(-20, 20))
def test_scaling_all_weights_changes_nothing(trees, weights, factor, exponent):
  weights = np.asarray(weights[:len(trees)])
  # A power of two scales exactly; any other factor changes the rounding only.
  equal_trees(agg.mean(trees, weights), agg.mean(trees, weights * 2.0**exponent))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-3),
               agg.mean(trees, weights), agg.mean(trees, weights * factor))


@SETTINGS
@given(float_trees(), st.lists(weights_st, min_size=6, max_size=6))
def test_running_mean_equals_mean(trees, weights):
  weights = weights[:len(trees)]
  acc = agg.RunningMean()
  for tree, w in zip(trees, weights):
    acc.add(tree, weight=w)
  assert acc.count == len(trees)
  assert acc.total_weight == pytest.approx(sum(weights))
  streamed, batch = acc.result(), agg.mean(trees, weights)
  assert jax.tree.structure(streamed) == jax.tree.structure(batch)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-6, atol=1e-4), streamed, batch)
  assert streamed["step"] == max(int(t["step"]) for t in trees)
  assert streamed["step"].dtype == jnp.int32


def test_running_mean_keeps_inputs_alive_and_matches_exactly_on_exact_sums():
  trees = [tree_of(np.full(3, v, np.float32), np.eye(2, dtype=np.float32) * v, step=v)
           for v in (1, 2, 6)]
  acc = agg.RunningMean()
  for t in trees:
    acc.add(t)
  equal_trees(acc.result(), agg.mean(trees))
  np.testing.assert_array_equal(trees[0]["params"]["a"], [1, 1, 1])  # Not donated away.
  assert agg.RunningMean(on_nonfinite="error").count == 0
  with pytest.raises(ValueError, match="no tree has been added"):
    agg.RunningMean().result()


def test_running_mean_validates_each_tree_against_the_first():
  acc = agg.RunningMean()
  acc.add(tree_of(np.zeros(3, np.float32), np.zeros((2, 2), np.float32)))
  with pytest.raises(ValueError, match=r"input 1 differs from input 0 at params/b: shape \(2, 3\)"):
    acc.add(tree_of(np.zeros(3, np.float32), np.zeros((2, 3), np.float32)))
  with pytest.raises(ValueError, match="input 2 has a non-finite value .* at params/a"):
    acc.add(tree_of(np.array([0, np.nan, 0], np.float32), np.zeros((2, 2), np.float32)))
  with pytest.raises(ValueError, match="weight of input 3 is -1.0"):
    acc.add(tree_of(np.zeros(3, np.float32), np.zeros((2, 2), np.float32)), weight=-1)
  skipping = agg.RunningMean(on_nonfinite="skip")
  skipping.add(tree_of(np.ones(3, np.float32), np.ones((2, 2), np.float32)))
  with pytest.warns(UserWarning, match="leaving out input 1 .* at params/b"):
    skipping.add(tree_of(np.ones(3, np.float32), np.full((2, 2), np.inf, np.float32)))
  assert skipping.count == 1
  np.testing.assert_array_equal(skipping.result()["params"]["b"], np.ones((2, 2)))
  strict = agg.RunningMean(integer_policy="error")
  strict.add(tree_of(np.ones(3, np.float32), np.ones((2, 2), np.float32), step=3))
  with pytest.raises(ValueError, match="input 1 differs from input 0 at step"):
    strict.add(tree_of(np.ones(3, np.float32), np.ones((2, 2), np.float32), step=4))


# --- Dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_averaged_in_float32_then_cast(dtype):
  rng = np.random.RandomState(0)
  xs = [rng.randn(1000).astype(dtype) for _ in range(5)]
  weights = [1, 2, 3, 1, 7]
  acc = np.float32(weights[0]) * xs[0].astype(np.float32)
  for w, x in zip(weights[1:], xs[1:]):
    acc = acc + np.float32(w) * x.astype(np.float32)
  expected = (acc / np.float32(sum(weights))).astype(dtype)
  out = agg.mean([{"w": jnp.asarray(x)} for x in xs], weights)["w"]
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out).view(np.uint16), expected.view(np.uint16))
  # Rounding each product to the input dtype first would differ: float32 accumulation matters.
  assert dtype != jnp.bfloat16 or not np.array_equal(
      np.asarray(out), (sum(np.asarray(w * x, ml_dtypes.bfloat16) for w, x in zip(weights, xs))
                        / np.asarray(sum(weights), ml_dtypes.bfloat16)).astype(dtype))


def test_integer_and_bool_leaves_keep_their_dtype_and_follow_the_policy():
  trees = [{"w": jnp.array([1.0]), "step": jnp.array(s, jnp.int32), "flag": jnp.array(f),
            "ids": jnp.array([s, 9 - s], jnp.uint8)} for s, f in ((3, False), (7, True), (5, False))]
  out = agg.mean(trees)
  assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7
  assert out["flag"].dtype == jnp.bool_ and bool(out["flag"])
  assert out["ids"].dtype == jnp.uint8 and out["ids"].tolist() == [7, 6]  # Element-wise max.
  first = agg.mean(trees, integer_policy="first")
  assert int(first["step"]) == 3 and first["ids"].tolist() == [3, 6]
  with pytest.raises(ValueError, match="input 1 differs from input 0 at flag: .*integer_policy='error'"):
    agg.mean(trees, integer_policy="error")
  same = [dict(t, step=jnp.array(4, jnp.int32), flag=jnp.array(True), ids=jnp.array([1, 2], jnp.uint8))
          for t in trees]
  assert int(agg.mean(same, integer_policy="error")["step"]) == 4
  with pytest.raises(ValueError, match="integer_policy is 'min'"):
    agg.mean(trees, integer_policy="min")


# --- Validation -------------------------------------------------------------------------------


def mlp_variables(features, seed=0, inputs=64):
  """fjt.MLP variables with random values (shapes from eval_shape: nothing to compile)."""
  model = fjt.MLP(features=features, num_classes=10)
  shapes = jax.eval_shape(lambda: fjt.init_variables(model, jnp.zeros((1, inputs)),
                                                     jax.random.PRNGKey(0)))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: np.abs(rng.randn(*s.shape)).astype(s.dtype), shapes)


def test_mismatches_name_the_input_and_path():
  a, b = mlp_variables((32,)), mlp_variables((32,), inputs=16)
  with pytest.raises(ValueError, match=r"input 2 differs from input 0 at params/Dense_0/kernel: "
                                       r"shape \(16, 32\) in input 2, \(64, 32\) in input 0"):
    agg.mean([a, a, b])
  half = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), a)
  with pytest.raises(ValueError, match="input 1 differs from input 0 at batch_stats/BatchNorm_0/mean: "
                                       "dtype bfloat16 in input 1, float32 in input 0"):
    agg.check_compatible([a, half])
  deeper = mlp_variables((32, 16))
  with pytest.raises(ValueError, match=r"batch_stats/BatchNorm_1/mean is in input 1 but not in "
                                       r"input 0 \(and 5 more paths\)"):
    agg.mean([a, deeper])
  with pytest.raises(ValueError,
                     match="batch_stats/BatchNorm_1/mean is in input 0 but missing from input 1"):
    agg.mean([deeper, a])
  with pytest.raises(ValueError, match=r"in structure at x: tuple .* in input 1, list .* in input 0"):
    agg.check_compatible([{"x": [1.0, 2.0]}, {"x": (1.0, 2.0)}])
  with pytest.raises(ValueError, match=r"ckpt_b differs from ckpt_a at x: shape \(2,\)"):
    agg.check_compatible([{"x": jnp.zeros(1)}, {"x": jnp.zeros(2)}], names=["ckpt_a", "ckpt_b"])
  with pytest.raises(TypeError, match="sequence of pytrees .* got a dict"):
    agg.mean(a)
  with pytest.raises(ValueError, match="trees is empty"):
    agg.mean([])


def test_nonfinite_inputs_raise_or_are_skipped():
  good = [tree_of(np.full(3, v, np.float32), np.full((2, 2), v, np.float32)) for v in (1.0, 3.0)]
  bad = tree_of(np.ones(3, np.float32), np.array([[0, 0], [np.inf, 0]], np.float32))
  nan = tree_of(np.array([0, np.nan, 0], np.float32), np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match="input 1 has a non-finite value .* at params/b"):
    agg.mean([good[0], bad, nan, good[1]])
  with pytest.raises(ValueError, match="input 1 has a non-finite value .* at params/a"):
    agg.median([good[0], nan, good[1]])
  with pytest.warns(UserWarning, match="input 1 at params/b, input 2 at params/a"):
    out = agg.mean([good[0], bad, nan, good[1]], weights=[1, 5, 5, 3], on_nonfinite="skip")
  equal_trees(out, agg.mean(good, weights=[1, 3]))
  with pytest.raises(ValueError, match="every input has a non-finite value"):
    agg.mean([bad, nan], on_nonfinite="skip")
  # A NaN in an input with weight 0 still counts: it is an input, and 0 * NaN is NaN.
  with pytest.raises(ValueError, match="input 0 has a non-finite value"):
    agg.mean([nan, good[0]], weights=[0, 1])


def test_new_weights_do_not_recompile():
  trees = [{"w": jnp.full(4, float(i)), "step": jnp.array(i, jnp.int32)} for i in range(3)]
  agg.mean(trees)
  compiled = agg._mean_leaves._cache_size()
  for weights in ([1, 2, 3], [0.5, 0, 7], [1e6, 1, 1]):
    agg.mean(trees, weights)
  assert agg._mean_leaves._cache_size() == compiled


def test_overflow_of_finite_inputs_is_named():
  big = np.finfo(np.float32).max
  trees = [{"w": jnp.array([1.0, big])}, {"w": jnp.array([2.0, big])}, {"w": jnp.array([3.0, big / 2])}]
  with pytest.raises(ValueError, match="weighted mean of finite inputs overflowed float32 at w"):
    agg.mean(trees)
  # The cheap check sums the result, which overflows here although the mean does not: the
  # closer look that follows must not raise.
  np.testing.assert_array_equal(agg.mean([{"w": jnp.full(4, big)}] * 2)["w"], np.full(4, big))


def test_weights_are_validated():
  trees = [tree_of(np.zeros(3, np.float32), np.zeros((2, 2), np.float32))] * 2
  for weights, message in (([1, -1], r"weights\[1\] is -1.0"), ([np.nan, 1], r"weights\[0\] is nan"),
                           ([1, np.inf], r"weights\[1\] is inf"), ([0, 0], "sum to 0"),
                           ([1, 2, 3], r"shape \(3,\); expected \(2,\)")):
    with pytest.raises(ValueError, match=message):
      agg.mean(trees, weights)


# --- Robust aggregates ------------------------------------------------------------------------


@SETTINGS
@given(float_trees(min_n=1, max_n=7))
def test_median_matches_numpy(trees):
  out = agg.median(trees)
  for key in SHAPES:
    stacked = np.stack([np.asarray(t["params"][key]) for t in trees])
    # Atol: the mean of two middle values may be subnormal, which XLA's CPU flushes to zero.
    np.testing.assert_allclose(out["params"][key], np.median(stacked, axis=0), rtol=1e-6,
                               atol=np.finfo(np.float32).tiny)
    if len(trees) % 2:  # The middle value itself: exact.
      np.testing.assert_array_equal(out["params"][key], np.median(stacked, axis=0))


@SETTINGS
@given(float_trees(min_n=1, max_n=7), st.floats(0, 0.499))
def test_trimmed_mean_matches_numpy(trees, fraction):
  n = len(trees)
  k = int(np.floor(fraction * n))
  for trim in (fraction, k):
    out = agg.trimmed_mean(trees, trim)
    for key in SHAPES:
      ordered = np.sort(np.stack([np.asarray(t["params"][key]) for t in trees]), axis=0)
      expected = ordered[k:n - k].mean(axis=0, dtype=np.float64)
      np.testing.assert_allclose(out["params"][key], expected, rtol=1e-5, atol=1e-3)


def test_trimmed_mean_hand_numbers_and_validation():
  trees = [{"w": jnp.array([v, -v])} for v in (1.0, 100.0, 2.0, 3.0, -50.0)]
  np.testing.assert_array_equal(agg.trimmed_mean(trees, 1)["w"], [2.0, -2.0])  # Mean of 1, 2, 3.
  np.testing.assert_array_equal(agg.trimmed_mean(trees, 0.2)["w"], [2.0, -2.0])  # floor(0.2 * 5) = 1.
  np.testing.assert_array_equal(agg.median(trees[:4])["w"], [2.5, -2.5])
  with pytest.raises(ValueError, match="drops 3 values at each end of 5"):
    agg.trimmed_mean(trees, 3)
  with pytest.raises(ValueError, match=r"trim is 0.5; a fraction must be in \[0, 0.5\)"):
    agg.trimmed_mean(trees, 0.5)
  with pytest.raises(TypeError, match="trim must be"):
    agg.trimmed_mean(trees, True)


# --- Soups and task arithmetic ----------------------------------------------------------------


def test_greedy_soup_keeps_only_candidates_that_do_not_hurt():
  target = np.array([1.0, 1.0])
  candidates = [{"w": jnp.array(v)} for v in ([0.5, 1.5], [3.0, -4.0], [1.5, 0.5], [0.0, 0.0])]
  evaluate = lambda tree: -float(np.sum((np.asarray(tree["w"]) - target) ** 2))
  soup, chosen, log = agg.greedy_soup(candidates, evaluate)
  # Own scores: -0.5, -29, -0.5, -2. Rank 0, 2, 3, 1. Soup {0, 2} = [1, 1] scores 0; adding 3 or 1
  # lowers it.
  assert chosen == [0, 2]
  np.testing.assert_array_equal(soup["w"], [1.0, 1.0])
  assert [e["candidate"] for e in log] == [0, 2, 3, 1]
  assert [e["kept"] for e in log] == [True, True, False, False]
  assert log[1]["soup_score"] == 0.0 and log[3]["score"] == -29.0
  with pytest.raises(ValueError, match="evaluate returned nan for candidate 0"):
    agg.greedy_soup(candidates, lambda tree: float("nan"))


def test_task_arithmetic_hand_numbers():
  base = {"w": jnp.array([1.0, 2.0]), "step": jnp.array(5, jnp.int32)}
  tasks = [{"w": jnp.array([2.0, 4.0]), "step": jnp.array(9, jnp.int32)},
           {"w": jnp.array([0.0, 1.0]), "step": jnp.array(1, jnp.int32)}]
  out = agg.task_arithmetic(base, tasks, scale=0.5)  # Deltas [1, 2] + [-1, -1] = [0, 1].
  np.testing.assert_array_equal(out["w"], [1.0, 2.5])
  assert int(out["step"]) == 5
  with pytest.raises(ValueError, match="tree 1 has a non-finite value .* at w"):
    agg.task_arithmetic(base, [tasks[0], {**tasks[1], "w": jnp.array([0.0, jnp.inf])}])
  with pytest.raises(ValueError, match=r"tree 0 differs from base at w: shape \(3,\)"):
    agg.task_arithmetic(base, [{"w": jnp.zeros(3), "step": jnp.array(0, jnp.int32)}])


# --- BatchNorm statistics ---------------------------------------------------------------------


def test_merge_batch_stats_equals_the_statistics_of_the_union():
  rng = np.random.RandomState(0)
  parts = [rng.randn(n, 5).astype(np.float32) * s + m for n, s, m in ((3, 1.0, 0.0), (7, 2.0, 3.0),
                                                                        (12, 0.5, -1.0))]
  stats = [{"Block_0": {"BatchNorm_0": {"mean": p.mean(0), "var": p.var(0)}}} for p in parts]
  merged = agg.merge_batch_stats(stats, counts=[len(p) for p in parts])
  union = np.concatenate(parts)
  np.testing.assert_allclose(merged["Block_0"]["BatchNorm_0"]["mean"], union.mean(0), rtol=1e-5)
  np.testing.assert_allclose(merged["Block_0"]["BatchNorm_0"]["var"], np.var(union, 0, ddof=0),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="BatchNorm module Block_0/BatchNorm_0 has 'mean' but no 'var'"):
    agg.merge_batch_stats([{"Block_0": {"BatchNorm_0": {"mean": parts[0].mean(0)}}}] * 2, [1, 1])
  with pytest.raises(ValueError, match="BatchNorm_0/scale is not a BatchNorm statistic"):
    agg.merge_batch_stats([{"BatchNorm_0": {"mean": np.zeros(2), "scale": np.ones(2)}}], [1])


def bn_input(variables, x):
  """The first BatchNorm's input of an fjt.MLP, computed by hand in float64."""
  dense = variables["params"]["Dense_0"]
  return np.asarray(x, np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])


def test_flax_batch_norm_tracks_the_population_variance():
  model = fjt.MLP(features=(16,), num_classes=10, momentum=0.9)
  x = digits.load().train["x"][:40]
  variables = fjt.init_variables(model, x[:1], jax.random.PRNGKey(0))
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  h = bn_input(variables, x)
  # Running var starts at 1: new = 0.9 * 1 + 0.1 * var(h, ddof=0), not ddof=1.
  np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["var"], 0.9 + 0.1 * h.var(0),
                             rtol=1e-5)


def test_recompute_batch_stats_gives_the_population_statistics():
  model = fjt.MLP(features=(16,), num_classes=10)
  data = digits.load().train["x"][:200]
  variables = fjt.init_variables(model, data[:1], jax.random.PRNGKey(1))
  batches = [data[:13], {"x": data[13:50]}, data[50:200]]
  out = agg.recompute_batch_stats(model, variables, batches)
  h = bn_input(variables, data)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], h.var(0), rtol=1e-5, atol=1e-6)
  assert out["params"] is variables["params"]
  with pytest.raises(ValueError, match="batches is empty"):
    agg.recompute_batch_stats(model, variables, [])


def test_recompute_batch_stats_of_a_cnn_reduces_over_batch_and_space():
  model = fjt.CNN(features=(4,), dense_features=(), num_classes=10)
  images = digits.load(layout="nhwc").train["x"][:30]
  variables = fjt.init_variables(model, images[:1], jax.random.PRNGKey(2))
  out = agg.recompute_batch_stats(model, variables, [images[:10], images[10:]])
  h = jax.lax.conv_general_dilated(
      jnp.asarray(images), variables["params"]["Conv_0"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + variables["params"]["Conv_0"]["bias"]
  h = np.asarray(h, np.float64).reshape(-1, 4)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], h.var(0), rtol=1e-5, atol=1e-6)


def test_aggregate_variables_of_two_mlps():
  a, b = mlp_variables((8,), seed=0), mlp_variables((8,), seed=1)
  rng = np.random.RandomState(0)
  parts = [rng.randn(n, 8).astype(np.float32) for n in (30, 10)]
  a["batch_stats"]["BatchNorm_0"] = {"mean": parts[0].mean(0), "var": parts[0].var(0)}
  b["batch_stats"]["BatchNorm_0"] = {"mean": parts[1].mean(0), "var": parts[1].var(0)}
  out = agg.aggregate_variables([a, b], counts=[30, 10])
  expected = jax.tree.map(lambda u, v: (30 * u + 10 * v) / 40, a["params"], b["params"])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
               out["params"], expected)
  union = np.concatenate(parts)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], union.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], union.var(0), rtol=1e-5)
  broken = {**b, "batch_stats": {"BatchNorm_0": {"mean": parts[1].mean(0)}}}
  with pytest.raises(ValueError, match="input 1 differs from input 0 in structure: "
                                       "batch_stats/BatchNorm_0/var is in input 0 but missing"):
    agg.aggregate_variables([a, broken], counts=[1, 1])
  with pytest.raises(ValueError, match="batch_stats/BatchNorm_0 has 'mean' but no 'var'"):
    agg.aggregate_variables([broken, broken], counts=[1, 1])
  nan = jax.tree.map(np.copy, b)
  nan["params"]["Dense_1"]["bias"][0] = np.nan
  with pytest.raises(ValueError, match="input 1 has a non-finite value .* at params/Dense_1/bias"):
    agg.aggregate_variables([a, nan], counts=[1, 1])
  with pytest.warns(UserWarning, match="input 1 at params/Dense_1/bias"):
    skipped = agg.aggregate_variables([a, nan], counts=[1, 1], on_nonfinite="skip")
  equal_trees(skipped["batch_stats"], jax.tree.map(jnp.asarray, a["batch_stats"]))


def test_greedy_soup_names_a_nan_candidate_by_its_index():
  trees = [{"w": np.full(3, float(i), np.float32)} for i in range(3)]
  trees[2]["w"][1] = np.nan
  scores = []
  with pytest.raises(ValueError) as info:
    agg.greedy_soup(trees, lambda t: scores.append(1) or 1.0)
  assert str(info.value) == "candidate 2 has a non-finite value (NaN or Inf) at w"
  assert scores == []  # Before any evaluation.
