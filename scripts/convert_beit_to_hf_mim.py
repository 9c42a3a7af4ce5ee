#!/usr/bin/env python
"""Convert a released BEiT or BEiT v2 checkpoint (unilm `.pth`): `hf-mim convert-beit`. See `--help`.

    python scripts/convert_beit_to_hf_mim.py --checkpoint beitv2_base_patch16_224_pt1k.pth \
        --tokenizer_name_or_path vqkd-clip-3x --output_dir beitv2-base-pt1k
"""

from hf_mim.cli import run_command
from hf_mim.convert.cli import beit_main as main

if __name__ == "__main__":
    run_command(main)
