"""Generate text from a trained GPT or Llama run.

  python scripts/sample.py WORKDIR --prompt TEXT [--tokens N --temperature T --top_k K --seed S]

Reads WORKDIR/config.json, the newest checkpoint and the tokenizer of the run's data; the
tokens are drawn in one jitted loop with a key/value cache. The same seed gives the same text.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", help="the run's workdir")
  parser.add_argument("--prompt", default="", help="text to continue")
  parser.add_argument("--tokens", type=int, default=50, help="tokens to generate")
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the K likeliest (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  from fjt import cli  # After argument parsing, so --help is instant.
  from fjt.generate import sample_text

  return cli.run(lambda: print(sample_text(args.workdir, args.prompt, args.tokens,
                                           args.temperature, args.top_k, args.seed)))


if __name__ == "__main__":
  sys.exit(main())
