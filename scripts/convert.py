"""Convert weights between PyTorch files and fjt checkpoints.

  python scripts/convert.py model.pt OUT_DIR --config configs/digits_cnn.py      # torch -> fjt
  python scripts/convert.py runs/digits_cnn model.safetensors --config configs/digits_cnn.py  # fjt -> torch

IN is a .safetensors / .pt / .pth file (read weights-only) or an fjt checkpoint (a run
workdir, step or saved directory); OUT is the other kind.

A LoRA run (config key lora.rank > 0) with --lora: the merged model or the adapters alone as an
fjt checkpoint, or the adapters as a PEFT folder (GPT: for Hugging Face's GPT-2):

  python scripts/convert.py runs/text_gpt_lora OUT_DIR --lora merged   # or adapters, peft
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("input")
  parser.add_argument("output")
  parser.add_argument("--config", help="the config whose model the weights belong to "
                      "(required to import; to export, needed for the CNN's layout)")
  parser.add_argument("--lora", choices=("merged", "adapters", "peft"),
                      help="write a LoRA run's merged model, its adapters, or a PEFT adapter folder")
  args = parser.parse_args(argv)

  from fjt import cli  # After argument parsing, so --help is instant.
  from fjt.interop import convert

  def run() -> None:
    if args.lora:
      from fjt import lora
      written = lora.export(args.input, args.output, args.lora)
      print(f"{args.output}: {len(written)} LoRA {args.lora} tensors")
    elif convert.is_weights_file(args.input):
      if not args.config:
        parser.error("importing weights needs --config (the model they belong to)")
      report = convert.import_weights(args.input, args.output, args.config)
      print(f"{args.output}: {len(report.matched)} tensors imported "
            f"({len(report.reshaped)} transposed or permuted); unused: {list(report.unused)}")
    elif convert.is_weights_file(args.output):
      keys = convert.export_weights(args.input, args.output, args.config)
      print(f"{args.output}: {len(keys)} tensors with PyTorch keys and layouts")
    else:
      parser.error("one of INPUT and OUTPUT must be a .safetensors, .pt or .pth file")

  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
