"""Print the state table of a checkpoint, a run, or a config's fresh state.

  python scripts/summary.py runs/digits_cnn [--stats]
  python scripts/summary.py configs/digits_cnn.py
  python scripts/summary.py configs/text_nnlm.py --mesh data=2,fsdp=4   # shardings, bytes per device
  python scripts/summary.py --diff runs/digits_cnn configs/digits_finetune.py
  python scripts/summary.py runs/digits_mlp --activations [--batch 256] [--plot acts.png]
"""

import argparse
import sys


def mesh_sizes(text: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``."""
  try:
    return {name.strip(): int(size) for name, size in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected AXIS=SIZE,... (e.g. data=2,fsdp=4), got {text!r}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", nargs="?", help="a run workdir, checkpoint directory or config file")
  parser.add_argument("--stats", action="store_true", help="also mean, std, min, max, NaN/Inf count")
  parser.add_argument("--freeze", action="append", default=[], help="path pattern of frozen params")
  parser.add_argument("--mesh", type=mesh_sizes, metavar="AXIS=SIZE,...",
                      help="lay a config's state out on this mesh (axes data, fsdp, model): "
                           "each leaf's PartitionSpec and bytes per device")
  parser.add_argument("--diff", nargs=2, metavar=("A", "B"),
                      help="report what loading A onto B would find missing, unexpected, mismatched")
  parser.add_argument("--activations", action="store_true",
                      help="the outputs of every layer for a batch of the run's validation data")
  parser.add_argument("--batch", type=int, default=256, help="examples in that batch (default 256)")
  parser.add_argument("--plot", metavar="FILE.png", help="with --activations: one histogram per layer")
  args = parser.parse_args(argv)
  if bool(args.source) == bool(args.diff):
    parser.error("give either SOURCE or --diff A B")
  if args.mesh and not (args.source or "").endswith(".py"):
    parser.error("--mesh lays out a config file's state: give a config file as SOURCE")
  if args.plot and not args.activations:
    parser.error("--plot draws the activations: add --activations")
  if args.batch < 1:
    parser.error(f"--batch must be positive, got {args.batch}")

  from fjt import activations, runs, summary  # After argument parsing, so --help is instant.
  from fjt.checkpoint import CheckpointError
  from fjt.config import ConfigError

  try:
    if args.diff:
      report = summary.diff(*args.diff)
      print(report)
      return 0 if not (report.missing or report.unexpected or report.mismatched) else 1
    if args.activations:
      model, variables, config = runs.load_model(args.source)
      batch = activations.validation_batch(config, args.batch)
      captured = activations.capture(model, variables, batch)
      print(activations.format_activations(activations.activation_rows(captured)))
      if args.plot:
        activations.plot_activations(captured, args.plot)
        print(f"wrote {args.plot}")
      return 0
    print(summary.format_table(summary.state_table(args.source, args.stats, args.freeze,
                                                   args.mesh)))
  except (CheckpointError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
