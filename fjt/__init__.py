"""fjt: train networks whose whole state is a pytree; average, checkpoint, inspect it.

The public API, re-exported flat::

  import fjt
  config = fjt.load_config("configs/digits_mlp.py")
  summary = fjt.train_and_evaluate(config, "runs/digits_mlp")

Three words, three things: ``fjt.averaging`` averages one run's weights over time (EMA, SWA),
``fjt.aggregate`` combines several models' weights in memory (means, robust rules, soups,
merges), ``fjt.merge`` does that to checkpoints on disk (``scripts/average.py``).
"""

from fjt import (accelerators, activations, aggregate, averaging, checkpoint, checks, cli, data,
                 distributed, embeddings, lora, merge, models, optim, options, preemption,
                 replicas, runs, sharding, steps, summary, tasks)
from fjt.checkpoint import CheckpointError
from fjt.checks import NonFiniteLossError
from fjt.config import ConfigError, apply_overrides, load_config
from fjt.data import Dataset, get_batch, load_dataset
from fjt.data import register as register_dataset
from fjt.experiment import fit, train_and_evaluate
from fjt.interop import hf as _hf  # noqa: F401 (fills the Hugging Face architecture registry)
from fjt.interop.torch import StateDictMismatch
from fjt.models import CNN, GPT, Llama, MLP, MODELS, NNLM, ResNet, create_model
from fjt.models import register as register_model
from fjt.optim import create_learning_rate_fn, create_optimizer
from fjt.optim import register as register_optimizer
from fjt.options import AcceleratorOptions, RunOptions
from fjt.preemption import StoppedBySignal
from fjt.distributed import PeerLostError
from fjt.state import TrainState, create_from_config, create_train_state, fork, init_variables
from fjt.steps import evaluate, make_eval_step, make_train_step, train_step_fn
from fjt.tasks import TASKS, Task, register_task

__version__ = "0.1.0"

__all__ = [
    # Models and data.
    "CNN", "GPT", "Llama", "MLP", "MODELS", "NNLM", "ResNet", "create_model", "register_model",
    "Dataset", "get_batch", "load_dataset", "register_dataset",
    # Configs, options, training.
    "ConfigError", "apply_overrides", "load_config", "AcceleratorOptions", "RunOptions",
    "TASKS", "Task", "register_task", "create_learning_rate_fn", "create_optimizer",
    "register_optimizer", "TrainState", "create_from_config", "create_train_state", "fork",
    "init_variables", "evaluate", "make_eval_step", "make_train_step", "train_step_fn", "fit",
    "train_and_evaluate",
    # Errors a user catches.
    "CheckpointError", "NonFiniteLossError", "PeerLostError", "StateDictMismatch",
    "StoppedBySignal",
    # Modules.
    "accelerators", "activations", "aggregate", "averaging", "checkpoint", "checks", "cli", "data",
    "distributed", "embeddings", "lora", "merge", "models", "optim", "options", "preemption", "replicas",
    "runs", "sharding", "steps", "summary", "tasks",
]
