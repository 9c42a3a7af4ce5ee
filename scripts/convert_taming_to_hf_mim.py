#!/usr/bin/env python
"""Convert a taming-transformers Gumbel VQGAN (`last.ckpt`, e.g. mc-BEiT's vqgan_gumbel_f8) into an hf_mim_vqgan folder.

    python scripts/convert_taming_to_hf_mim.py --checkpoint last.ckpt --output_dir vqgan-gumbel-f8

The checkpoint is read with torch.load(weights_only=True): no pickled code is executed, and a file that needs more
is refused with an explanation rather than loaded unsafely. Only the encoder path (the code logits) is converted.
"""

import argparse

from hf_mim.cli import run_command
from hf_mim.convert.taming import convert_taming_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="taming last.ckpt, a state dict file or .safetensors")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted tokenizer to")
    parser.add_argument("--image_size", type=int, default=112, help="Side of the tokenizer view (112 -> 14x14 tokens)")
    args = parser.parse_args(argv)
    convert_taming_checkpoint(args.checkpoint, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the converted VQGAN tokenizer to {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
