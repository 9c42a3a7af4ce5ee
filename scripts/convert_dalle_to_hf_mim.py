#!/usr/bin/env python
"""Convert OpenAI's DALL-E dVAE (`encoder.pkl`, optionally `decoder.pkl`) into an hf_mim_dvae checkpoint folder.

    python scripts/convert_dalle_to_hf_mim.py --encoder encoder.pkl --decoder decoder.pkl --output_dir dall-e-dvae

The pickles are read with an allow-list unpickler (no `dall_e` package needed, no pickled code executed).
"""

import argparse

from hf_mim.cli import run_command
from hf_mim.convert.dalle import convert_dalle_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="Path of encoder.pkl")
    parser.add_argument("--decoder", default=None, help="Path of decoder.pkl (optional; needed for decode())")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted checkpoint to")
    parser.add_argument("--image_size", type=int, default=112, help="Side of the tokenizer view (112 -> 14x14 tokens)")
    args = parser.parse_args(argv)
    convert_dalle_checkpoint(args.encoder, args.decoder, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted dVAE to {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
