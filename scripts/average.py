"""Average the weights of runs or checkpoints into one checkpoint.

  python scripts/average.py --out runs/soup runs/seed0 runs/seed1 runs/seed2 --config configs/digits_mlp.py
  python scripts/average.py --method ties --base runs/base --density 0.2 --out runs/ties runs/ft_a runs/ft_b
  python scripts/average.py --config merge.yml --out runs/merged   # a mergekit-style YAML

Params are aggregated by --method (a rule of fjt.aggregate's registry, or greedy; --weights per
input), BatchNorm statistics merged exactly. The result is a checkpoint that fjt.checkpoint.load
and the train CLI's --config.init_from read. With --config, every input and the result are
evaluated on that config's test split and printed as a table. --plugin MODULE imports a module
that registers more rules (fjt.aggregate.register) before the flags are read. The LLM merges
(ties, dare, dare_ties) take --base, the checkpoint the inputs were fine-tuned from, and
--density; slerp takes two inputs (or --base and one) and --t. --config with a .yml/.yaml file
is a mergekit-style merge config (fjt.merge_config) instead of the inputs and --method.
"""

import argparse
import ast
import importlib
import sys


def _plugins(argv) -> list[str]:
  """The modules named by --plugin, read before the other flags (they add --method choices)."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--plugin", action="append", default=[])
  return parser.parse_known_args(argv)[0].plugin


def _param(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--param {text!r}: expected NAME=VALUE, e.g. trim=0.2")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv=None) -> int:
  for module in _plugins(argv):
    importlib.import_module(module)
  from fjt import merge  # The registry gives the --method choices and their help.

  parser = argparse.ArgumentParser(description=__doc__, epilog="methods:\n" + merge.describe_methods(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", help="run workdirs or checkpoint directories")
  parser.add_argument("--out", required=True, help="the new checkpoint directory")
  parser.add_argument("--weights", nargs="+", type=float, help="one weight per input (default equal)")
  parser.add_argument("--method", default="mean", choices=merge.methods(aliases=True),
                      help="an aggregation rule or greedy (see below)")
  parser.add_argument("--trim", type=float, default=0.2, help="fraction cut at each end (trimmed_mean; default 0.2)")
  parser.add_argument("--base", help="the checkpoint the inputs were fine-tuned from (ties, dare)")
  parser.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare)")
  parser.add_argument("--t", type=float, help="interpolation point (slerp; 0: the first model)")
  parser.add_argument("--seed", type=int, help="seed of DARE's random drop")
  parser.add_argument("--param", action="append", type=_param, default=[],
                      help="NAME=VALUE: a parameter of the rule (repeatable)")
  parser.add_argument("--plugin", action="append", default=[],
                      help="a module to import first, which registers rules (repeatable)")
  parser.add_argument("--config", help="a .py experiment config: evaluate inputs and result on "
                      "its test split; a .yml/.yaml: a mergekit-style merge config")
  parser.add_argument("--recompute_batch_stats", action="store_true",
                      help="re-estimate BatchNorm statistics on the config's training data")
  args = parser.parse_args(argv)

  import fjt
  from fjt.merge_config import load_merge_config

  flags = {k: v for k, v in (("density", args.density), ("t", args.t), ("seed", args.seed))
           if v is not None}

  def average() -> None:
    if args.config and args.config.endswith((".yml", ".yaml")):
      if args.inputs or args.base or args.weights:
        raise fjt.ConfigError(f"{args.config} names the models, base and weights; give no "
                              "inputs, --base or --weights with it")
      spec = load_merge_config(args.config)
      config, inputs, base, weights = None, spec.paths, spec.base, spec.weights
      method, params = spec.method, {**spec.params, **flags, **dict(args.param)}
    else:
      if not args.inputs:
        parser.error("give the inputs to merge (or --config merge.yml)")
      config = fjt.load_config(args.config) if args.config else None
      inputs, base, weights = args.inputs, args.base, args.weights
      method, params = args.method, {**flags, **dict(args.param)}
    result = merge.average_checkpoints(inputs, args.out, weights, method, args.trim, config,
                                       args.recompute_batch_stats, params=params, base=base)
    print(merge.format_rows(result))

  return fjt.cli.run(average)


if __name__ == "__main__":
  sys.exit(main())
