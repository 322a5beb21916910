"""Average the weights of runs or checkpoints into one checkpoint.

  python scripts/average.py --out runs/soup runs/seed0 runs/seed1 runs/seed2 --config configs/digits_mlp.py

Params are averaged (--method mean|median|trimmed|greedy, --weights per input), BatchNorm
statistics merged exactly. The result is a checkpoint that fjt.checkpoint.load and the train
CLI's --config.init_from read. With --config, every input and the result are evaluated on
that config's test split and printed as a table.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", help="run workdirs or checkpoint directories")
  parser.add_argument("--out", required=True, help="the new checkpoint directory")
  parser.add_argument("--weights", nargs="+", type=float, help="one weight per input (default equal)")
  parser.add_argument("--method", default="mean", choices=("mean", "median", "trimmed", "greedy"))
  parser.add_argument("--trim", type=float, default=0.2, help="fraction cut at each end (trimmed)")
  parser.add_argument("--config", help="evaluate inputs and result on this config's test split")
  parser.add_argument("--recompute_batch_stats", action="store_true",
                      help="re-estimate BatchNorm statistics on the config's training data")
  args = parser.parse_args(argv)

  import fjt  # After argument parsing, so --help is instant.
  from fjt import merge

  def average() -> None:
    config = fjt.load_config(args.config) if args.config else None
    result = merge.average_checkpoints(args.inputs, args.out, args.weights, args.method, args.trim,
                                       config, args.recompute_batch_stats)
    print(merge.format_rows(result))

  return fjt.cli.run(average)


if __name__ == "__main__":
  sys.exit(main())
