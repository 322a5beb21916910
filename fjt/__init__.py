"""fjt: train networks whose whole state is a pytree; average, checkpoint, inspect it.

The public API, re-exported flat::

  import fjt
  config = fjt.load_config("configs/digits_mlp.py")
  summary = fjt.train_and_evaluate(config, "runs/digits_mlp")
"""

from fjt import (accelerators, activations, aggregate, averaging, checkpoint, data, distributed,
                 embeddings, merge, models, preemption, replicas, runs, sharding, steps, summary,
                 tasks)
from fjt.config import ConfigError, apply_overrides, load_config
from fjt.data import Dataset, get_batch, load_dataset
from fjt.experiment import train_and_evaluate
from fjt.models import CNN, MLP, MODELS, NNLM, create_model
from fjt.optim import create_learning_rate_fn, create_optimizer
from fjt.options import AcceleratorOptions
from fjt.preemption import StoppedBySignal
from fjt.state import TrainState, create_from_config, create_train_state, init_variables
from fjt.steps import evaluate, make_eval_step, make_train_step, train_step_fn
from fjt.tasks import TASKS, Task, register_task
from fjt.train import NonFiniteLossError, fit

__version__ = "0.1.0"

__all__ = [
    "AcceleratorOptions", "CNN", "ConfigError", "Dataset", "MLP", "MODELS", "NNLM", "NonFiniteLossError", "StoppedBySignal", "TASKS",
    "Task", "TrainState", "aggregate", "apply_overrides", "averaging", "checkpoint",
    "create_from_config", "create_learning_rate_fn", "create_model", "create_optimizer",
    "create_train_state", "data", "evaluate", "fit", "get_batch", "init_variables",
    "load_config", "load_dataset", "make_eval_step", "make_train_step", "merge", "models",
    "accelerators", "preemption", "register_task", "replicas", "runs", "sharding", "steps", "summary", "tasks", "train_and_evaluate",
    "train_step_fn",
]
