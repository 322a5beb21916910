"""Convert weights between PyTorch files and fjt checkpoints.

  python scripts/convert.py model.pt OUT_DIR --config configs/digits_cnn.py      # torch -> fjt
  python scripts/convert.py runs/digits_cnn model.safetensors --config configs/digits_cnn.py  # fjt -> torch

IN is a .safetensors / .pt / .pth / .bin file (read weights-only) or an fjt checkpoint (a run
workdir, step or saved directory); OUT is the other kind.

Hugging Face folders (config.json + model.safetensors, its sharded index or pytorch_model.bin):

  python scripts/convert.py --from HF_DIR OUT_DIR                # -> an fjt checkpoint
  python scripts/convert.py runs/gpt --to hf HF_DIR              # -> a folder transformers loads

A LoRA run (config key lora.rank > 0) exports merged (--to hf, weight files); with --lora: the
merged model or the adapters alone as an fjt checkpoint, or the adapters as a PEFT folder (GPT
and Llama: for Hugging Face's GPT-2 and Llama):

  python scripts/convert.py runs/text_gpt_lora OUT_DIR --lora merged   # or adapters, peft
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("input", nargs="?")
  parser.add_argument("output", nargs="?")
  parser.add_argument("--from", dest="from_hf", metavar="HF_DIR",
                      help="import a Hugging Face folder into the fjt checkpoint INPUT")
  parser.add_argument("--to", choices=["hf"], help="export INPUT as a Hugging Face folder OUTPUT")
  parser.add_argument("--config", help="the config whose model the weights belong to "
                      "(required to import; to export, needed for the CNN's layout)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUTPUT if it exists (never a training run's checkpoints)")
  parser.add_argument("--lora", choices=("merged", "adapters", "peft"),  # convert.LORA_EXPORTS
                      help="write a LoRA run's merged model, its adapters, or a PEFT adapter folder")
  args = parser.parse_intermixed_args(argv)  # IN --to hf OUT: positionals around options.

  from fjt import cli, runs  # After argument parsing, so --help is instant.
  from fjt.interop import convert

  def run() -> None:
    if args.lora:
      if not (args.input and args.output):
        parser.error("--lora needs INPUT (a LoRA run) and OUTPUT")
      runs.check_output(args.output, args.overwrite)
      written = convert.export_lora(args.input, args.output, args.lora)
      print(f"{args.output}: {len(written)} LoRA {args.lora} tensors")
    elif args.from_hf:
      out = args.output or args.input
      if not out:
        parser.error("--from HF_DIR needs the output checkpoint directory")
      runs.check_output(out, args.overwrite)
      report = convert.import_pretrained(args.from_hf, out)
      print(f"{out}: {report}")
    elif args.to == "hf":
      if not (args.input and args.output):
        parser.error("--to hf needs INPUT (an fjt checkpoint) and OUTPUT (a folder)")
      runs.check_output(args.output, args.overwrite)
      keys = convert.export_pretrained(args.input, args.output, args.config)
      print(f"{args.output}: config.json and model.safetensors ({len(keys)} tensors)")
    elif not (args.input and args.output):
      parser.error("expected INPUT and OUTPUT")
    elif convert.is_weights_file(args.input):
      runs.check_output(args.output, args.overwrite)
      if not args.config:
        parser.error("importing weights needs --config (the model they belong to)")
      report = convert.import_weights(args.input, args.output, args.config)
      print(f"{args.output}: {len(report.matched)} tensors imported "
            f"({len(report.reshaped)} transposed or permuted); unused: {list(report.unused)}")
    elif convert.is_weights_file(args.output):
      runs.check_output(args.output, args.overwrite)
      keys = convert.export_weights(args.input, args.output, args.config)
      print(f"{args.output}: {len(keys)} tensors with PyTorch keys and layouts")
    else:
      parser.error("one of INPUT and OUTPUT must be a .safetensors, .pt, .pth or .bin file")

  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
