"""Train a model from a config file.

  python scripts/train.py --config configs/digits_cnn.py [--workdir DIR] [--config.train.steps=500]

Running again into a workdir resumes its run; a config that changes the result is refused
(listing each changed key), unless --restart moves the old run aside (DIR.previous-N) first.
SIGTERM or Ctrl-C saves the current step and exits with code 4; run the same command to resume.

exit codes (every fjt script: fjt.cli):
  0  the run finished (or a finished run was evaluated again)
  1  the run failed (a NaN loss, a damaged checkpoint, a failed save)
  2  bad config, input or usage (a config key, a changed config in a workdir, a workdir in use)
  3  a peer process of a multi-process run stopped answering
  4  stopped by SIGTERM/SIGINT after saving the current step
  128+N  a second signal N ended the run at once, without saving
"""

import argparse
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a Python file with get_config()")
  parser.add_argument("--workdir", help="output directory (default: runs/<config name>)")
  parser.add_argument("--restart", action="store_true",
                      help="move the run in --workdir aside (to DIR.previous-N; nothing is "
                      "deleted) and start over there")
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

  fjt.logs.one_line_errors()

  def train() -> int:
    config = fjt.apply_overrides(fjt.load_config(args.config), overrides)
    # XLA reads its flags when JAX starts its backends: before anything else touches them.
    fjt.accelerators.request_determinism(fjt.AcceleratorOptions.from_config(config).deterministic)
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in distributed) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
      timeout_s = fjt.options.DistributedOptions.from_config(config).timeout_s
      fjt.distributed.initialize_distributed(*distributed, timeout_s=int(timeout_s))
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.restart:
      fjt.runs.restart(workdir)
    summary = fjt.train_and_evaluate(config, workdir)
    print(f"{workdir}: step {summary['step']}, " +
          ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    return 0

  return fjt.cli.run(train)


if __name__ == "__main__":
  sys.exit(main())
