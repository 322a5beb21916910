"""Merge fine-tunes of one base language model and compare validation perplexity per group.

  python scripts/merge_demo.py --base runs/text_gpt --finetuned runs/ft_web runs/ft_async \
      runs/ft_pkg --multitask runs/ft_all --density 0.2

Each fine-tune's group of packages is its run's ``data.sources`` (configs/text_gpt_finetune.py).
Rows: the base, each fine-tune, the multi-task fine-tune (all groups at once) and the merges of
the fine-tunes by fjt.aggregate (mean, task arithmetic at each --scales, TIES and DARE-TIES at
--density, DARE seeded by --seed); columns: validation perplexity on each group's files and on
all groups' files together.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="the run the fine-tunes started from")
  parser.add_argument("--finetuned", nargs="+", required=True, help="fine-tuned runs, one per group")
  parser.add_argument("--multitask", help="a run fine-tuned on all the groups at once")
  parser.add_argument("--density", type=float, default=0.2, help="TIES and DARE-TIES (default 0.2)")
  parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0],
                      help="task arithmetic's scales (default 0.5 1.0)")
  parser.add_argument("--seed", type=int, default=0, help="DARE's seed")
  args = parser.parse_args(argv)

  import fjt
  from fjt import aggregate, checkpoint, merge, runs

  def demo() -> None:
    params = lambda path: checkpoint.load_variables(path)["params"]
    base, tuned = params(args.base), [params(p) for p in args.finetuned]
    groups = [tuple(runs.run_config(p).data.sources) for p in args.finetuned]
    models = [("base", base)] + [(f"fine-tune g{i}", t) for i, t in enumerate(tuned, 1)]
    if args.multitask:
      models.append(("multi-task fine-tune", params(args.multitask)))
    models.append(("mean", aggregate.mean(tuned)))
    models += [(f"task arithmetic x{s:g}", aggregate.task_arithmetic(base, tuned, s))
               for s in args.scales]
    models.append((f"TIES d={args.density:g}", aggregate.ties(base, tuned, density=args.density)))
    models.append((f"DARE-TIES d={args.density:g}", aggregate.dare(
        base, tuned, density=args.density, seed=args.seed, consensus="sum")))
    columns = [(f"g{i}", g) for i, g in enumerate(groups, 1)]
    columns.append(("all", tuple(s for g in groups for s in g)))
    evaluators = []
    for _, sources in columns:
      config = runs.run_config(args.finetuned[0])
      config.data.sources = sources
      evaluators.append(merge.make_evaluator(config)[0])
    for name, sources in columns[:-1]:
      print(f"{name}: {', '.join(sources)}")
    print("validation perplexity")
    print(f"{'model':<24}" + "".join(f"{name:>9}" for name, _ in columns))
    for label, tree in models:
      row = [evaluate({"params": tree, "batch_stats": {}})["perplexity"] for evaluate in evaluators]
      print(f"{label:<24}" + "".join(f"{p:>9.2f}" for p in row), flush=True)

  return fjt.cli.run(demo)


if __name__ == "__main__":
  sys.exit(main())
