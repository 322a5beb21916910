import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fjt
from fjt.config import ConfigError


def shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def init(model, x):
  return jax.eval_shape(lambda: fjt.init_variables(model, x, jax.random.PRNGKey(0)))


def test_seed_fully_connected_layer_500_to_100():
  model = fjt.create_model({"name": "mlp", "features": (), "num_classes": 100})
  variables = init(model, jnp.zeros((1, 500)))
  assert shapes(variables) == {"params": {"Dense_0": {"kernel": (500, 100), "bias": (100,)}},
                               "batch_stats": {}}


def test_mlp_collections_and_shapes():
  model = fjt.create_model({"name": "mlp", "features": (32, 16), "num_classes": 10})
  variables = init(model, jnp.zeros((1, 64)))
  assert shapes(variables) == {
      "params": {
          "Dense_0": {"kernel": (64, 32), "bias": (32,)},
          "BatchNorm_0": {"scale": (32,), "bias": (32,)},
          "Dense_1": {"kernel": (32, 16), "bias": (16,)},
          "BatchNorm_1": {"scale": (16,), "bias": (16,)},
          "Dense_2": {"kernel": (16, 10), "bias": (10,)},
      },
      "batch_stats": {
          "BatchNorm_0": {"mean": (32,), "var": (32,)},
          "BatchNorm_1": {"mean": (16,), "var": (16,)},
      },
  }


def test_cnn_collections_and_shapes():
  model = fjt.create_model({"name": "cnn", "features": (8, 16), "dense_features": (32,),
                            "num_classes": 10})
  variables = init(model, jnp.zeros((1, 8, 8, 1)))
  assert shapes(variables) == {
      "params": {
          "Conv_0": {"kernel": (3, 3, 1, 8), "bias": (8,)},
          "BatchNorm_0": {"scale": (8,), "bias": (8,)},
          "Conv_1": {"kernel": (3, 3, 8, 16), "bias": (16,)},
          "BatchNorm_1": {"scale": (16,), "bias": (16,)},
          "Dense_0": {"kernel": (2 * 2 * 16, 32), "bias": (32,)},  # Two 2x2 pools: 8 -> 2.
          "Dense_1": {"kernel": (32, 10), "bias": (10,)},
      },
      "batch_stats": {
          "BatchNorm_0": {"mean": (8,), "var": (8,)},
          "BatchNorm_1": {"mean": (16,), "var": (16,)},
      },
  }


def test_nnlm_has_the_seed_word_embedding():
  model = fjt.create_model({"name": "nnlm", "vocab_size": 700, "hidden": 64})
  variables = init(model, jnp.zeros((1, 3), jnp.int32))
  assert shapes(variables) == {
      "params": {
          "Embed_0": {"embedding": (700, 300)},
          "Dense_0": {"kernel": (3 * 300, 64), "bias": (64,)},
          "BatchNorm_0": {"scale": (64,), "bias": (64,)},
          "Dense_1": {"kernel": (64, 700), "bias": (700,)},
      },
      "batch_stats": {"BatchNorm_0": {"mean": (64,), "var": (64,)}},
  }
  logits = model.apply(fjt.init_variables(model, jnp.zeros((1, 3), jnp.int32), jax.random.PRNGKey(0)),
                       jnp.array([[1, 2, 3], [4, 5, 6]]), train=False)
  assert logits.shape == (2, 700)


def test_batch_norm_statistics_update_in_training_only():
  model = fjt.create_model({"name": "mlp", "features": (16,), "num_classes": 3})
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 5)) * 3.0 + 2.0
  variables = fjt.init_variables(model, x, jax.random.PRNGKey(0))
  before = variables["batch_stats"]
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  after = updates["batch_stats"]["BatchNorm_0"]
  # Running mean moves by (1 - momentum) toward the batch mean of the pre-BN activations.
  h = x @ variables["params"]["Dense_0"]["kernel"] + variables["params"]["Dense_0"]["bias"]
  np.testing.assert_allclose(after["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  assert not np.array_equal(after["var"], before["BatchNorm_0"]["var"])
  # In eval mode the statistics are used, not updated.
  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, eval_updates["batch_stats"], before)
  # And eval outputs use the running averages: equal for any batch split.
  full = model.apply(variables, x, train=False)
  halves = jnp.concatenate([model.apply(variables, x[:16], train=False),
                            model.apply(variables, x[16:], train=False)])
  np.testing.assert_array_equal(full, halves)


def test_unknown_model_name_lists_known_models():
  with pytest.raises(ConfigError, match=r"unknown model 'vgg'; known models: \['cnn', .*'mlp', 'nnlm', 'resnet'\]"):
    fjt.create_model({"name": "vgg"})


def test_unknown_model_attribute_is_named():
  with pytest.raises(ConfigError, match=r"'model.widths' is not an attribute of MLP"):
    fjt.create_model({"name": "mlp", "widths": (3,)})


@pytest.mark.parametrize("config, x, param_dtype", [
    ({"name": "mlp", "features": (16,)}, jnp.ones((4, 64)), "bfloat16"),
    ({"name": "cnn", "features": (4,), "dense_features": (8,)}, jnp.ones((4, 8, 8, 1)), "float32"),
    ({"name": "resnet", "stage_sizes": (1, 1), "widths": (4, 8), "stem": "small", "stem_width": 4,
      "num_classes": 10}, jnp.ones((4, 8, 8, 1)), "bfloat16"),
    ({"name": "nnlm", "vocab_size": 10, "embed_dim": 8, "hidden": 16}, jnp.ones((4, 4), jnp.int32),
     "float32"),
], ids=["mlp", "cnn", "resnet", "nnlm"])
def test_bf16_compute_with_float32_batch_stats_and_loss(config, x, param_dtype):
  model = fjt.create_model({**config, "dtype": "bfloat16", "param_dtype": param_dtype})
  variables = fjt.init_variables(model, x, jax.random.PRNGKey(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(param_dtype)}
  x = x + jax.random.randint(jax.random.PRNGKey(1), x.shape, 0, 3).astype(x.dtype)
  batch = {"x": x, "y": jnp.arange(4) % 10}

  def loss(params):
    logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"])
    return fjt.TASKS["classification"].loss(logits, batch), (logits, updates)

  (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  assert value.dtype == logits.dtype == jnp.float32 and np.isfinite(float(value))
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(param_dtype)}
  for stats in (variables["batch_stats"], updates["batch_stats"]):
    assert {leaf.dtype for leaf in jax.tree.leaves(stats)} <= {jnp.dtype(jnp.float32)}
  exact = model.clone(dtype="float32").apply(variables, x, train=False)
  approx = model.apply(variables, x, train=False)
  assert float(jnp.abs(approx - exact).max()) <= 0.05 * float(jnp.abs(exact).max()) + 1e-3
