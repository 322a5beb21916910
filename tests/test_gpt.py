"""GPT model, cached decoding, sampling, bf16 compute, and token data (tiny sizes: seconds)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import ROOT
from fjt import checkpoint
from fjt.data import eval_batches, get_batch, load_dataset, text
from fjt.data.tokenizer import load_tokenizer
from fjt.data.windows import TokenWindows
from fjt.generate import generate, sample_text
from fjt.models import GPT, create_model
from fjt.optim import create_optimizer, decay_mask
from fjt.tree import unbox

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prepare_text  # noqa: E402
import sample  # noqa: E402

TINY = {"name": "gpt", "vocab_size": 37, "block_size": 16, "num_layers": 2, "num_heads": 2,
        "embed_dim": 16, "dropout_rate": 0.1}


@pytest.fixture(autouse=True)
def _full_precision():
  with jax.default_matmul_precision("highest"):  # Exact comparisons on a GPU too (no TF32).
    yield


def tiny_gpt(**overrides) -> tuple[GPT, dict]:
  model = create_model({**TINY, **overrides})
  params = unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return model, params


def test_param_names_and_shapes_follow_hugging_face_gpt2():
  model, params = tiny_gpt()
  shapes = {"/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert shapes["wte/embedding"] == (37, 16) and shapes["wpe/embedding"] == (16, 16)
  assert shapes["h_1/attn/c_attn/kernel"] == (16, 48) and shapes["h_1/attn/c_attn/bias"] == (48,)
  assert shapes["h_0/mlp/c_fc/kernel"] == (16, 64) and shapes["h_0/mlp/c_proj/kernel"] == (64, 16)
  assert shapes["ln_f/scale"] == (16,) and "lm_head" not in str(shapes)  # The head is wte.
  assert len(shapes) == 2 + 2 * 12 + 2
  # GPT-2 initialisation: residual projections scaled by 1 / sqrt(2 * num_layers).
  big = GPT(vocab_size=50, block_size=8, num_layers=2, num_heads=4, embed_dim=256)
  p = unbox(big.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))["params"]
  assert abs(float(jnp.std(p["h_0"]["mlp"]["c_fc"]["kernel"])) - 0.02) < 1e-3
  assert abs(float(jnp.std(p["h_0"]["mlp"]["c_proj"]["kernel"])) - 0.01) < 1e-3
  assert float(jnp.abs(p["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0.0


def test_logits_are_causal_and_float32():
  model, params = tiny_gpt()
  x = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 37
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 12, 37) and logits.dtype == jnp.float32
  changed = model.apply({"params": params}, x.at[:, 7].set(0))
  np.testing.assert_array_equal(logits[:, :7], changed[:, :7])  # The future is not seen.
  assert not np.allclose(logits[:, 7:], changed[:, 7:])


def test_dropout_needs_an_rng_only_in_training():
  model, params = tiny_gpt()
  x = jnp.ones((2, 8), jnp.int32)
  a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply({"params": params}, x),
                                model.apply({"params": params}, x, train=False))


def test_cached_decode_gives_the_logits_of_the_full_model_on_the_growing_sequence():
  model, params = tiny_gpt()
  x = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 37)
  full = model.apply({"params": params}, x)
  decoder = model.clone(decode=True)
  from fjt.models.gpt import init_cache
  cache = init_cache(model, 2)
  logits, upd = decoder.apply({"params": params, "cache": cache}, x[:, :5], mutable=["cache"])
  pieces = [logits]
  for t in range(5, 16):  # Then one token per call, as generate does.
    logits, upd = decoder.apply({"params": params, "cache": upd["cache"]}, x[:, t:t + 1],
                                mutable=["cache"])
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, rtol=0, atol=2e-6)
  assert int(upd["cache"]["cache_index"]) == 16


def test_greedy_generation_is_the_argmax_of_the_full_model():
  model, params = tiny_gpt()
  out = generate(model, params, jnp.array([[3, 1, 4], [1, 5, 9]]), 8, jax.random.PRNGKey(0),
                 temperature=0.0)
  assert out.shape == (2, 11) and out.dtype == jnp.int32
  # Causal: the logits at t of the padded sequence are those of the sequence up to t.
  logits_fn = jax.jit(lambda seq: model.apply({"params": params}, seq))
  seq = jnp.zeros((2, 11), jnp.int32).at[:, :3].set(jnp.array([[3, 1, 4], [1, 5, 9]]))
  for t in range(3, 11):
    seq = seq.at[:, t].set(jnp.argmax(logits_fn(seq)[:, t - 1], -1).astype(jnp.int32))
  np.testing.assert_array_equal(out, seq)


def test_same_seed_same_sample_and_top_k_restricts_it():
  model, params = tiny_gpt()
  draw = lambda seed, top_k=0: np.asarray(generate(
      model, params, jnp.array([1, 2]), 12, jax.random.PRNGKey(seed), 1.0, top_k))
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))
  assert (draw(0, top_k=1) == np.asarray(generate(model, params, jnp.array([1, 2]), 12,
                                                  jax.random.PRNGKey(7), 0.0))).all()
  with pytest.raises(ValueError, match="exceeds the model's block_size 16"):
    generate(model, params, jnp.array([1, 2]), 15, jax.random.PRNGKey(0))


def test_bf16_compute_keeps_float32_params_and_optimizer_state():
  model, params = tiny_gpt(dropout_rate=0.0)
  bf16 = model.clone(dtype="bfloat16")
  assert jax.tree.leaves(bf16.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))[0].dtype \
      == jnp.float32
  x = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 37)
  y = jnp.roll(x, -1, 1)
  tx = create_optimizer({"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.1,
                         "decay_mask": "gpt"}, 10)

  def loss_fn(p, m):
    return optax.softmax_cross_entropy_with_integer_labels(m.apply({"params": p}, x), y).mean()

  jit_loss = jax.jit(loss_fn, static_argnums=1)
  loss32, loss16 = jit_loss(params, model), jit_loss(params, bf16)
  assert loss16.dtype == jnp.float32
  assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)  # bf16: 8 mantissa bits.
  grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, bf16)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves((grads, params, opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_gpt_decay_mask_skips_biases_norms_and_embeddings():
  _, params = tiny_gpt()
  mask = decay_mask(params, "gpt")
  assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["h_1"]["mlp"]["c_proj"]["kernel"]
  assert not mask["h_0"]["attn"]["c_attn"]["bias"] and not mask["h_0"]["ln_1"]["scale"]
  assert not mask["wte"]["embedding"] and not mask["wpe"]["embedding"]
  assert decay_mask(params)["wte"]["embedding"]  # The default decays every matrix.


def test_token_windows_index_lazily_and_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint16)
  train, test = TokenWindows(tokens, 8, 1), TokenWindows(tokens, 8, 8)
  assert train["x"].shape == (992, 8) and test["y"].shape == (124, 8)
  np.testing.assert_array_equal(test["x"][[0, 2]], [np.arange(8), np.arange(16, 24)])
  np.testing.assert_array_equal(test["y"][-1:], [np.arange(985, 993)])
  a, b = get_batch(train, 3, 17, 6), get_batch(train, 3, 17, 6)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert a["x"].dtype == np.int32 and a["x"].shape == (6, 8)
  np.testing.assert_array_equal(a["y"], a["x"] + 1)  # y is x shifted by one token.
  assert not np.array_equal(a["x"], get_batch(train, 3, 18, 6)["x"])
  assert not np.array_equal(a["x"], get_batch(train, 4, 17, 6)["x"])
  np.testing.assert_array_equal(get_batch(train, 3, 17, 6, slice(2, 4))["x"], a["x"][2:4])
  batches = list(eval_batches(test, 50))  # Every validation window once, in order.
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:124], test["x"][:124])
  assert sum(b["mask"].sum() for b in batches) == 124


def test_sliding_evaluation_windows_score_every_target_once():
  tokens = np.arange(1000, dtype=np.int32)
  test = TokenWindows(tokens, 8, 4, score_once=True)
  assert test.num_windows == 248 and test.columns == ("x", "y", "mask")
  # The first window scores its 8 targets; every later one its last 4, those not yet scored,
  # each with at least 4 tokens of context.
  np.testing.assert_array_equal(test["mask"][:3], [[1] * 8, [0] * 4 + [1] * 4, [0] * 4 + [1] * 4])
  y, mask = test["y"][:], test["mask"][:]
  np.testing.assert_array_equal(np.sort(y[mask > 0]), np.arange(1, 8 + 4 * 247 + 1))
  # With separators (ignore_id) both masks apply; stride == block_size needs no mask column.
  both = TokenWindows(tokens % 10, 8, 4, ignore_id=0, score_once=True)
  np.testing.assert_array_equal(both["y"][1], [5, 6, 7, 8, 9, 0, 1, 2])
  np.testing.assert_array_equal(both["mask"][1], [0, 0, 0, 0, 1, 0, 1, 1])
  assert TokenWindows(tokens, 8, 8, score_once=True).columns == ("x", "y")
  with pytest.raises(ValueError, match="'data.eval_stride'"):
    TokenWindows(tokens, 8, 9, score_once=True)


def test_stdlib_text_in_blocks_has_the_vocabulary_and_split_of_text_nnlm():
  blocks, windows = text.load(block_size=32), text.load(context=4)
  assert blocks.num_classes == windows.num_classes == 5000
  assert blocks.info["tokenizer"]["vocab"][:2] == ["<s>", "<unk>"]
  # The streams' targets, the <s> before each docstring left out, are the windows dataset's.
  for split, n in (("train_tokens", windows.info["train_tokens"]),
                   ("validation_tokens", windows.info["validation_tokens"])):
    assert blocks.info[split] == n
  assert blocks.info["unigram_perplexity"] == windows.info["unigram_perplexity"]
  x, y = blocks.test["x"][:3], blocks.test["y"][:3]
  assert x.shape == (3, 32) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  np.testing.assert_array_equal(blocks.test["mask"][:3] == 0, y == 0)  # <s> targets not scored.
  assert len(blocks.test["x"]) == (len(blocks.test.tokens) - 1 - 32) // 32 + 1


def write_texts(folder) -> None:
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat while dogs ran after cars in the rain".split()
  folder.mkdir()
  for i in range(3):
    lines = [" ".join(rng.choice(words, 10)).capitalize() + "." for _ in range(150)]
    (folder / f"doc{i}.txt").write_text("\n".join(lines), encoding="utf-8")


def test_prepare_text_bpe_writes_token_files_that_load(tmp_path, capsys):
  write_texts(tmp_path / "texts")
  out = tmp_path / "tokens"
  assert prepare_text.main([str(tmp_path / "texts"), "--out", str(out), "--tokenizer", "bpe",
                            "--vocab_size", "300"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["tokenizer_kind"] == "bpe"
  assert os.path.getsize(out / "train.bin") == 2 * meta["train_tokens"]
  assert os.path.getsize(out / "val.bin") == 2 * meta["validation_tokens"]
  dataset = load_dataset({"name": "tokens", "path": str(out), "block_size": 16})
  assert isinstance(dataset.train.tokens, np.memmap) and dataset.info["task"] == "language_model"
  assert dataset.num_classes == 300
  tokenizer = load_tokenizer(dataset.info["tokenizer"])
  assert tokenizer.decode(tokenizer.encode("The cat sat on a mat.")) == "The cat sat on a mat."
  batch = get_batch(dataset.train, 0, 0, 4)
  assert batch["x"].shape == (4, 16) and int(batch["x"].max()) < 300
  assert prepare_text.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
  assert "matches no file or folder" in capsys.readouterr().err


def test_a_2gb_token_file_is_memory_mapped_not_read(tmp_path):
  def rss_mb():
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
  for name in ("train.bin", "val.bin"):  # Sparse: 2 GB on paper, no blocks on disk.
    with open(tmp_path / name, "wb") as f:
      f.truncate(2 * 1024 ** 3)
  (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50257}))
  before = rss_mb()
  dataset = load_dataset({"name": "tokens", "path": str(tmp_path), "block_size": 1024})
  assert isinstance(dataset.train.tokens, np.memmap) and dataset.info["train_tokens"] == 1024 ** 3
  batch = get_batch(dataset.train, 0, 123, 8)
  first_eval = next(eval_batches(dataset.test, 8))
  assert batch["x"].shape == first_eval["x"].shape == (8, 1024)
  assert rss_mb() - before < 100  # Reading the file whole would add 2048 MB.


def test_sample_cli_prints_text_from_a_run(tmp_path, capsys):
  tokens = tmp_path / "tokens"
  write_texts(tmp_path / "texts")
  prepare_text.main([str(tmp_path / "texts"), "--out", str(tokens), "--tokenizer", "word",
                     "--vocab_size", "20"])
  capsys.readouterr()
  vocab_size = json.loads((tokens / "meta.json").read_text())["vocab_size"]  # 13 words + 2.
  config = ml_collections.ConfigDict({
      "model": {**TINY, "vocab_size": vocab_size},
      "data": {"name": "tokens", "path": str(tokens), "block_size": 16}})
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json())
  model, params = tiny_gpt(vocab_size=vocab_size)
  checkpoint.save(workdir / "checkpoints" / "5", {"params": params})
  args = [str(workdir), "--prompt", "the cat", "--tokens", "6", "--seed", "3"]
  assert sample.main(args) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("the cat ") and len(printed[:-1].split(" ")) == 2 + 6
  assert sample_text(str(workdir), "the cat", 6, seed=3) + "\n" == printed
  assert sample.main([str(tmp_path), "--prompt", "x"]) == 2


def test_train_a_gpt_on_prepared_bpe_tokens_then_sample_from_the_run(tmp_path, capsys):
  import fjt
  write_texts(tmp_path / "texts")
  prepare_text.main([str(tmp_path / "texts"), "--out", str(tmp_path / "tokens"), "--tokenizer",
                     "bpe", "--vocab_size", "300"])
  config = fjt.load_config(os.path.join(ROOT, "configs", "text_gpt.py"))
  config = fjt.apply_overrides(config, [
      "data.name=tokens", f"data.path={tmp_path / 'tokens'}", "data.block_size=16",
      "model.vocab_size=300", "model.block_size=16", "model.embed_dim=16", "model.num_heads=2",
      "train.steps=4", "train.eval_every=4", "train.log_every=2", "checkpoint.every_steps=4",
      "optimizer.warmup_steps=1"])
  summary = fjt.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == 4 and 1 < summary["eval"]["perplexity"] < 600
  split = load_dataset(config.data).test
  first = jax.tree.map(lambda v: v[:1], split)  # What the loop does to a split: plain arrays.
  assert set(first) == {"x", "y"} and first["x"].shape == (1, 16)
  capsys.readouterr()
  assert sample.main([str(tmp_path / "run"), "--prompt", "The cat", "--tokens", "5"]) == 0
  assert capsys.readouterr().out.startswith("The cat")


def test_attention_auto_is_xla_on_the_cpu_and_names_are_checked():
  from fjt.models.gpt import attention_implementation
  # cuDNN's fused kernel only on a GPU in 16-bit floats; the CPU and float32 use XLA's.
  expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert attention_implementation("auto", jnp.bfloat16, 64) == expected
  assert attention_implementation("auto", jnp.float32, 64) == "xla"
  assert attention_implementation("auto", jnp.bfloat16, 12) == "xla"  # Head width not 8k.
  assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention_implementation("flash", jnp.bfloat16, 64)


def test_attention_auto_on_a_gpu_avoids_cudnn_under_deterministic_ops(monkeypatch):
  from fjt.models import gpt
  monkeypatch.setattr(gpt.jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  assert gpt.attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert gpt.attention_implementation("auto", jnp.bfloat16, 64) == "xla"
