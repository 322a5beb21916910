"""GPT-2 small (124M parameters) on a token directory, for accelerators.

Make the data first, e.g. ``python scripts/prepare_text.py my_texts/ --out data/my_tokens
--tokenizer bpe --vocab_size 50257``, then train with ``--config.data.path=data/my_tokens``.
A global batch of 512 sequences of 1024 tokens (about 0.5M tokens, GPT-2's) is 16 micro-batches
of 32; compute in bfloat16, params and optimizer state in float32.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({"name": "tokens", "path": "", "block_size": 1024})
  config.model = ml_collections.ConfigDict({
      "name": "gpt", "vocab_size": 50257, "block_size": 1024, "num_layers": 12, "num_heads": 12,
      "embed_dim": 768, "dropout_rate": 0.0, "dtype": "bfloat16", "param_dtype": "float32"})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 6e-4, "weight_decay": 0.1, "decay_mask": "gpt",
      "schedule": "warmup_cosine", "warmup_steps": 700, "final_lr_fraction": 0.1,
      "grad_clip_norm": 1.0})
  config.train = ml_collections.ConfigDict({
      "steps": 20000, "batch_size": 512, "grad_accum_steps": 16, "eval_every": 1000,
      "log_every": 10, "eval_batch_size": 64})
  config.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 1000, "max_to_keep": 2, "best_metric": "perplexity", "best_mode": "min",
       "fallback": False})
  return config
