#!/usr/bin/env python
"""Visual tokenizer training: `hf-mim train-tokenizer`. See `python scripts/train_tokenizer.py --help`.

    accelerate launch scripts/train_tokenizer.py --tokenizer_type dvae --train_dir ./images \
        --output_dir ./dvae --do_train --max_steps 20000 --learning_rate 1e-3
"""

from hf_mim.cli import run_command
from hf_mim.training.train_tokenizer import main

if __name__ == "__main__":
    run_command(main)
