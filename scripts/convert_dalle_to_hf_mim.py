#!/usr/bin/env python
"""Convert OpenAI's DALL-E dVAE (`encoder.pkl`, `decoder.pkl`): `hf-mim convert-dalle`. See `--help`.

    python scripts/convert_dalle_to_hf_mim.py --encoder encoder.pkl --decoder decoder.pkl --output_dir dall-e-dvae
"""

from hf_mim.cli import run_command
from hf_mim.convert.cli import dalle_main as main

if __name__ == "__main__":
    run_command(main)
