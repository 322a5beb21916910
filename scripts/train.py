"""Train a model from a config file.

  python scripts/train.py --config configs/digits_cnn.py [--workdir DIR] [--config.train.steps=500]
"""

import argparse
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a Python file with get_config()")
  parser.add_argument("--workdir", help="output directory (default: runs/<config name>)")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0, for a multi-process run "
                      "(or JAX_COORDINATOR_ADDRESS / a cluster JAX detects)")
  parser.add_argument("--num_processes", type=int, help="number of processes in the run")
  parser.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes-1")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r}; overrides look like --config.train.steps=100")
    overrides.append(item[len("--config."):])

  import fjt  # After argument parsing, so --help is instant.
  from fjt.checkpoint import CheckpointError, CheckpointMismatchError

  try:
    config = fjt.apply_overrides(fjt.load_config(args.config), overrides)
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in distributed) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
      # Before anything else touches JAX's backends.
      fjt.sharding.initialize_distributed(*distributed, timeout_s=int(config.distributed.timeout_s))
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    summary = fjt.train_and_evaluate(config, workdir)
  except fjt.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (fjt.NonFiniteLossError, CheckpointError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{workdir}: step {summary['step']}, " +
        ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
