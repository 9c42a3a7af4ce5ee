#!/usr/bin/env python
"""PNG figures of a MIM checkpoint: masks, token maps, tokenizer and predicted reconstructions, codebook usage,
training curves: `hf-mim visualize`. See `python scripts/visualize.py --help`.

    python scripts/visualize.py --model_name_or_path ./beit --images ./images/cat.jpg ./more_images \
        --output_dir ./figures --tokenizer_name_or_path ./my-dvae

MIM checkpoints hold their tokenizer without its decoder: `--tokenizer_name_or_path` (the standalone tokenizer the
model was pre-trained with) draws the reconstructions, which are left out without it.
"""

from hf_mim.cli import run_command
from hf_mim.visualization import main

if __name__ == "__main__":
    run_command(main)
