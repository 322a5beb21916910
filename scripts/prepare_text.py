"""Turns text files into a token directory for ``data.name="tokens"``.

  python scripts/prepare_text.py SRC... --out DIR [--tokenizer word|bpe] [--vocab_size N]
  python scripts/prepare_text.py SRC... --out DIR --vocab_from runs/text_gpt   # its words' ids

SRC are text files or folders of them (UTF-8); with none, the English docstrings of the
Python standard library. Writes DIR/train.bin, DIR/val.bin (token ids, uint16 or uint32),
DIR/tokenizer.json and DIR/meta.json; train with
``--config.data.name=tokens --config.data.path=DIR``.
"""

import argparse
import json
import sys

from fjt import cli
from fjt.data.tokens import TOKENIZERS, prepare_text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sources", nargs="*", metavar="SRC", help="text files or folders")
  parser.add_argument("--out", required=True, help="token directory to write")
  parser.add_argument("--tokenizer", choices=TOKENIZERS, default="word")
  parser.add_argument("--vocab_size", type=int, default=5000)
  parser.add_argument("--validation_percent", type=int, default=10)
  parser.add_argument("--vocab_from", metavar="RUN", help="use the word vocabulary of this run "
                      "(or config) instead of building one, e.g. to fine-tune it on new text")
  args = parser.parse_args(argv)
  def prepare() -> None:
    vocab = None
    if args.vocab_from:
      from fjt.runs import run_vocabulary
      vocab = run_vocabulary(args.vocab_from)
    meta = prepare_text(args.sources, args.out, args.tokenizer, args.vocab_size,
                        args.validation_percent, vocab=vocab)
    print(json.dumps(meta, indent=2))

  return cli.run(prepare)


if __name__ == "__main__":
  sys.exit(main())
