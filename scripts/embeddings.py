"""Word vectors of a language-model run's embedding table, and their nearest neighbours.

  python scripts/embeddings.py runs/text_nnlm return file list [--neighbors 8]
  python scripts/embeddings.py runs/text_nnlm return --full --out return.npy

The vocabulary is rebuilt from the run's config.json (its dataset must carry info["vocab"]). A
word not in it is reported as such (exit status 1), never given the <unk> vector.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run", help="a run workdir, or a checkpoint inside one")
  parser.add_argument("words", nargs="+", metavar="WORD")
  parser.add_argument("--neighbors", type=int, default=8, help="nearest words by cosine similarity")
  parser.add_argument("--dims", type=int, default=8, help="leading dimensions shown (default 8)")
  parser.add_argument("--full", action="store_true", help="show every dimension")
  parser.add_argument("--out", metavar="F.npy", help="save the known words' vectors, (words, dim)")
  parser.add_argument("--table", help="path of the embedding table, e.g. params/wte/embedding")
  args = parser.parse_args(argv)
  if args.neighbors < 0 or args.dims < 1:
    parser.error("--neighbors must be >= 0 and --dims >= 1")

  import numpy as np  # After argument parsing, so --help is instant.

  from fjt import checkpoint, embeddings, runs
  from fjt.checkpoint import CheckpointError
  from fjt.config import ConfigError

  try:
    vocab = runs.run_vocabulary(args.run)
    variables = checkpoint.load_variables(args.run)
    path, table = embeddings.embedding_table(variables, len(vocab), args.table)
    found = embeddings.embedding(variables, vocab, args.words, args.neighbors, path)
  except (CheckpointError, ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{path}: {table.shape} {table.dtype}, vocabulary of {len(vocab)} words")
  options = np.get_printoptions()
  np.set_printoptions(precision=4, suppress=True, threshold=sys.maxsize if args.full else 1000,
                      linewidth=100)
  width = max(len(w) for w in args.words)
  for w in found:
    if w.index is None:
      hint = f" (did you mean {w.word.lower()!r}?)" if w.word.lower() in vocab else ""
      print(f"{w.word:<{width}}  not in the vocabulary{hint}")
      continue
    shown = w.vector if args.full else w.vector[:args.dims]
    note = "" if len(shown) == len(w.vector) else f" first {len(shown)} of {len(w.vector)} dims"
    print(f"{w.word:<{width}}  id {w.index}{note}: {shown}")
    if w.neighbors:
      print(f"{'':<{width}}  nearest: " + ", ".join(f"{n} {c:.3f}" for n, c in w.neighbors))
  np.set_printoptions(**options)
  known = [w for w in found if w.index is not None]
  if args.out:
    np.save(args.out, np.stack([w.vector for w in known]) if known else table[:0])
    print(f"wrote {args.out}: {len(known)} vectors ({', '.join(w.word for w in known)})")
  return 0 if len(known) == len(found) else 1


if __name__ == "__main__":
  sys.exit(main())
