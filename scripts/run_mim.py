#!/usr/bin/env python
"""Masked image modeling pre-training: `hf-mim pretrain`. See `python scripts/run_mim.py --help`.

    accelerate launch scripts/run_mim.py --model_type beit --tokenizer_name_or_path ./dvae \
        --train_dir ./images --output_dir ./beit --do_train
"""

from hf_mim.cli import run_command
from hf_mim.training.run_mim import main

if __name__ == "__main__":
    run_command(main)
