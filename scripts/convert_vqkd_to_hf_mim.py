#!/usr/bin/env python
"""Convert a released BEiT v2 VQ-KD tokenizer (unilm `.pth`) into an hf_mim_vqkd checkpoint folder.

    python scripts/convert_vqkd_to_hf_mim.py \
        --checkpoint vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --output_dir vqkd-clip-3x

The file is read with torch.load(weights_only=True); the converted codebook is marked initialised, so it is never
overwritten by k-means.
"""

import argparse

from hf_mim.cli import run_command
from hf_mim.convert.unilm import convert_vqkd_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Path of the unilm VQ-KD .pth file")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted tokenizer to")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="Encoder heads (default: width / 64)")
    parser.add_argument("--decoder_attention_heads", type=int, default=None, help="Decoder heads (default: width / 64)")
    args = parser.parse_args(argv)
    model = convert_vqkd_checkpoint(
        args.checkpoint, args.output_dir, args.num_attention_heads, args.decoder_attention_heads
    )
    config = model.config
    print(
        f"Saved a VQ-KD tokenizer ({config.codebook_size} codes of dim {config.codebook_dim}, {config.grid_size}x"
        f"{config.grid_size} tokens, {config.decoder_layers}-layer decoder) to {args.output_dir}"
    )


if __name__ == "__main__":
    run_command(main)
