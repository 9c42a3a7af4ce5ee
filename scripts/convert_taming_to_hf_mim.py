#!/usr/bin/env python
"""Convert a taming-transformers Gumbel VQGAN (`last.ckpt`): `hf-mim convert-taming`. See `--help`.

    python scripts/convert_taming_to_hf_mim.py --checkpoint last.ckpt --output_dir vqgan-gumbel-f8
"""

from hf_mim.cli import run_command
from hf_mim.convert.cli import taming_main as main

if __name__ == "__main__":
    run_command(main)
