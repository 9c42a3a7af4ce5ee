#!/usr/bin/env python
"""Convert a released BEiT v2 VQ-KD tokenizer (unilm `.pth`): `hf-mim convert-vqkd`. See `--help`.

    python scripts/convert_vqkd_to_hf_mim.py \
        --checkpoint vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --output_dir vqkd-clip-3x
"""

from hf_mim.cli import run_command
from hf_mim.convert.cli import vqkd_main as main

if __name__ == "__main__":
    run_command(main)
