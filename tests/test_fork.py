"""fjt.fork: branches of one state share no buffers with it or each other (issue 24)."""

import jax
import numpy as np
import optax
import pytest

import fjt


@pytest.fixture(scope="module")
def setup():
  model, data = fjt.MLP(features=(16,)), fjt.load_dataset({"name": "digits"})
  tx = optax.sgd(0.1)
  base = fjt.create_train_state(model, tx, data.train["x"][:1], jax.random.PRNGKey(0))
  return model, data, tx, base, fjt.make_train_step(model, tx)


def train(step, state, data, seed, steps=3):
  for i in range(steps):
    state, _ = step(state, fjt.get_batch(data.train, seed, i, 32))
  return state


def test_forks_of_one_base_train_independently_and_leave_it_whole(setup):
  _, data, tx, base, step = setup
  before = jax.tree.map(np.asarray, base)
  a = train(step, fjt.fork(base, tx, seed=1), data, seed=1)
  b = train(step, fjt.fork(base, tx, seed=1), data, seed=1)
  c = train(step, fjt.fork(base, tx, seed=2), data, seed=2)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)  # Same branch, same bits.
  assert int(a.step) == 3 and not np.array_equal(a.params["Dense_0"]["kernel"],
                                                 c.params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(c.rng, jax.random.PRNGKey(2))
  # Without a fork, the second branch steps a donated (deleted) base.
  spent = fjt.fork(base)
  train(step, spent, data, seed=1, steps=1)
  with pytest.raises((RuntimeError, ValueError), match="deleted"):
    train(step, spent, data, seed=2, steps=1)


def test_fork_of_variables(setup):
  _, data, tx, base, step = setup
  variables = fjt.fork(base.variables)
  assert variables["params"]["Dense_0"]["kernel"] is not base.params["Dense_0"]["kernel"]
  state = fjt.fork(base.variables, tx, seed=3)
  assert isinstance(state, fjt.TrainState) and int(state.step) == 0
  train(step, state, data, seed=3, steps=1)
  np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"],
                                base.params["Dense_0"]["kernel"])
