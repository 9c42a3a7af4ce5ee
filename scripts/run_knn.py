#!/usr/bin/env python
"""Weighted k-NN (DINO) on frozen features: `hf-mim knn`. See `python scripts/run_knn.py --help`.

    python scripts/run_knn.py --model_name_or_path ./beit --train_dir ./train --validation_dir ./val \
        --ks 10 20 100 200 --temperature 0.07
"""

from hf_mim.cli import run_command
from hf_mim.evaluation.knn import main

if __name__ == "__main__":
    run_command(main)
