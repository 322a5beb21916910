"""Sampling from a decoder (``GPT``, ``Llama``) with its key/value cache, in one jitted loop;
text from a trained run."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fjt import checkpoint, runs
from fjt.data import load_dataset
from fjt.data.tokenizer import Tokenizer, load_tokenizer
from fjt.models import create_model
from fjt.models.transformer import init_cache

PyTree = Any


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """int32 ``(B,)`` token ids drawn from float ``(B, V)`` logits.

  ``temperature == 0`` takes the argmax; otherwise the ids are drawn from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits
  (``top_k == 0``: all of them).
  """
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k"))
def _generate(model: nn.Module, params: PyTree, prompt_ids: jax.Array, num_tokens: int,
              rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  decoder = model.clone(decode=True)
  cache = init_cache(model, prompt_ids.shape[0])

  def step(cache, tokens):
    logits, updates = decoder.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
    return updates["cache"], logits[:, -1]

  # The whole prompt in one call, then one token per iteration of the scan.
  cache, logits = step(cache, prompt_ids)
  first = sample_logits(logits, jax.random.fold_in(rng, 0), temperature, top_k)

  def body(carry, i):
    cache, token = carry
    cache, logits = step(cache, token[:, None])
    token = sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k)
    return (cache, token), token

  _, rest = jax.lax.scan(body, (cache, first), jnp.arange(1, num_tokens))
  return jnp.concatenate([prompt_ids, first[:, None], rest.T], axis=1)


def generate(model: nn.Module, params: PyTree, prompt_ids: jax.Array, num_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """The prompt followed by ``num_tokens`` sampled tokens: int32 ``(B, P + num_tokens)``.

  ``model`` is a decoder with a key/value cache: its ``clone(decode=True)`` keeps one in the
  ``"cache"`` collection (``GPT``, ``Llama``, or a user's model that does the same), and
  ``model.block_size`` is the longest sequence.

  ``prompt_ids`` is int ``(B, P)`` (or ``(P,)``, giving ``(1, P + num_tokens)``), ``P >= 1``.
  The prompt fills the key/value cache in one forward pass; then each token is drawn by
  ``sample_logits`` with key ``fold_in(rng, i)`` for the ``i``-th new token and fed back, all
  inside one ``jax.jit`` (a ``jax.lax.scan``; no Python per token), so the same ``rng`` gives
  the same tokens. Dropout is off. ``P + num_tokens`` must not exceed ``model.block_size``.
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids.ndim == 1:
    prompt_ids = prompt_ids[None]
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
    raise ValueError(f"generate: prompt_ids must be int (B, P) with P >= 1, got shape {prompt_ids.shape}")
  if num_tokens < 1:
    raise ValueError(f"generate: num_tokens must be >= 1, got {num_tokens}")
  if prompt_ids.shape[1] + num_tokens > model.block_size:
    raise ValueError(f"generate: a prompt of {prompt_ids.shape[1]} tokens plus {num_tokens} new "
                     f"tokens exceeds the model's block_size {model.block_size}")
  if not (math.isfinite(temperature) and temperature >= 0) or top_k < 0:
    raise ValueError(f"generate: temperature must be a finite number >= 0 and top_k >= 0, got "
                     f"{temperature} and {top_k}")
  return _generate(model, params, prompt_ids, int(num_tokens), rng, float(temperature), int(top_k))


def load_run(workdir: str) -> tuple[nn.Module, PyTree, Tokenizer]:
  """The model of run ``workdir`` (its ``config.json``, ``fjt.runs.run_config``), the params of
  its newest checkpoint and the tokenizer of its data (``dataset.info["tokenizer"]``)."""
  config = runs.run_config(workdir)
  model = create_model(config.model)
  if not (hasattr(model, "decode") and hasattr(model, "block_size")):
    raise ValueError(f"run {workdir!r} trained model {config.model.name!r}; sampling needs a "
                     "decoder with a key/value cache (a 'decode' and a 'block_size' attribute: "
                     "'gpt', 'llama')")
  runs.check_run_data(workdir, config)
  info = load_dataset(config.data).info
  if "tokenizer" not in info:
    raise ValueError(f"run {workdir!r}: dataset {config.data.name!r} records no tokenizer "
                     "(use data 'tokens', or 'text' with block_size)")
  tokenizer = load_tokenizer(info["tokenizer"])
  if model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"run {workdir!r}: model.vocab_size {model.vocab_size} is smaller than the "
                     f"{tokenizer.vocab_size} tokens of the data's tokenizer")
  return model, checkpoint.load_variables(workdir)["params"], tokenizer


def sample_text(workdir: str, prompt: str, num_tokens: int = 100, temperature: float = 1.0,
                top_k: int = 0, seed: int = 0) -> str:
  """The prompt and ``num_tokens`` tokens sampled from run ``workdir``, decoded to text.

  The prompt is encoded with the run's tokenizer and preceded by its document separator (as
  every document of the training stream is; nanoGPT's character vocabulary of ``meta.pkl``
  has none, and an empty prompt is then "\\n", as nanoGPT's sample.py starts); only its
  last ``block_size - num_tokens`` tokens are kept. The same ``seed`` gives the same text.
  """
  if not (math.isfinite(temperature) and temperature >= 0):  # Before the run is loaded.
    raise ValueError(f"--temperature: expected a finite number >= 0 (0: greedy), got {temperature}")
  model, params, tokenizer = load_run(workdir)
  if not 0 < num_tokens < model.block_size:
    raise ValueError(f"--tokens: expected 1 .. {model.block_size - 1} (block_size - 1), got {num_tokens}")
  separator = tokenizer.separator_id
  if separator is None:  # nanoGPT's characters: no separator; an empty prompt starts at "\n".
    ids = tokenizer.encode(prompt or "\n")
  else:
    ids = [separator, *tokenizer.encode(prompt)]
  ids = ids[-(model.block_size - num_tokens):]
  out = generate(model, params, jnp.asarray(ids), num_tokens, jax.random.PRNGKey(seed),
                 temperature, top_k)
  tokens = [int(i) for i in out[0]]
  return tokenizer.decode(tokens[1:] if separator is not None and ids[0] == separator else tokens)
