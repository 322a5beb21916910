"""Print the state table of a checkpoint, a run, or a config's fresh state.

  python scripts/summary.py runs/digits_cnn [--stats]
  python scripts/summary.py configs/digits_cnn.py
  python scripts/summary.py --diff runs/digits_cnn configs/digits_finetune.py
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", nargs="?", help="a run workdir, checkpoint directory or config file")
  parser.add_argument("--stats", action="store_true", help="also mean, std, min, max, NaN/Inf count")
  parser.add_argument("--freeze", action="append", default=[], help="path pattern of frozen params")
  parser.add_argument("--diff", nargs=2, metavar=("A", "B"),
                      help="report what loading A onto B would find missing, unexpected, mismatched")
  args = parser.parse_args(argv)
  if bool(args.source) == bool(args.diff):
    parser.error("give either SOURCE or --diff A B")

  from fjt import summary  # After argument parsing, so --help is instant.
  from fjt.checkpoint import CheckpointError
  from fjt.config import ConfigError

  try:
    if args.diff:
      report = summary.diff(*args.diff)
      print(report)
      return 0 if not (report.missing or report.unexpected or report.mismatched) else 1
    print(summary.format_table(summary.state_table(args.source, args.stats, args.freeze)))
  except (CheckpointError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
