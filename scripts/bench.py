"""Benchmark fjt against baselines measured in the same run, and print the table.

  python scripts/bench.py [--quick] [--out bench.json]

Rows are ratios: the fjt train step against PyTorch on the same model and threads and against a
float32 matmul peak; fjt.aggregate.mean against a copy of the same bytes and a PyTorch loop;
the peak memory of averaging checkpoints on disk; checkpoint save and restore against
torch.save and torch.load. --quick runs tiny sizes (a smoke test, not numbers to report).
Needs PyTorch: pip install -e '.[torch]'.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, well under a minute")
  parser.add_argument("--out", help="write the rows to this JSON file")
  parser.add_argument("--only", nargs="+", metavar="GROUP",
                      help="run only these groups: train gpt2 remat aggregate stream checkpoint sharded lora "
                           "(gpt2, GPT-2 124M, runs on a GPU only)")
  parser.add_argument("--cnn_config", default=os.path.join(ROOT, "configs", "digits_cnn.py"),
                      help="the config whose model is the CNN of train_step_cnn_vs_torch")
  args = parser.parse_args(argv)

  sys.path.insert(0, ROOT)  # fjt from this checkout; benchmarks from this script's folder.
  # JAX would take 75% of a GPU's memory at start, leaving the PyTorch baselines in this process
  # too little (GPT-2 124M's ran out of memory on an H100 that way).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import fjt  # After argument parsing, so --help is instant.
  from benchmarks import machine, rows as table, suite, timing

  try:
    machine.require_torch()
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = machine.machine()
  info["mode"] = "quick: tiny sizes, a smoke test, not numbers to report" if args.quick else "full"
  info["precision"] = machine.full_float32()
  print(", ".join(f"{k}: {v}" for k, v in info.items()), file=sys.stderr)
  sizes = table.QUICK if args.quick else table.FULL if info["backend"] == "cpu" else table.GPU
  before = timing.background_load()
  unknown = sorted(set(args.only or ()) - set(suite.GROUPS))
  if unknown:
    parser.error(f"--only: unknown groups {unknown}; expected some of {list(suite.GROUPS)}")
  rows = suite.run(sizes, fjt.load_config(args.cnn_config),
                   progress=lambda line: print(line, file=sys.stderr, flush=True), only=args.only)
  loads = [f"{x:.1f}" if x is not None else "?" for x in (before, timing.background_load())]
  info["CPUs busy with other work before/after"] = " / ".join(loads)
  if args.out:
    table.write_json(rows, args.out)
  print(table.format_table(rows, info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
