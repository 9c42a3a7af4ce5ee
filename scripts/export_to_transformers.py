#!/usr/bin/env python
"""Export a pretrained hf_mim encoder as a stock transformers BEiT checkpoint: `hf-mim export`. See `--help`.

    python scripts/export_to_transformers.py --model_name_or_path ./beit --output_dir ./beit-transformers
"""

from hf_mim.cli import run_command
from hf_mim.evaluation.export import main

if __name__ == "__main__":
    run_command(main)
