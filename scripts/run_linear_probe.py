#!/usr/bin/env python
"""Linear probe of a frozen encoder: `hf-mim probe`. See `python scripts/run_linear_probe.py --help`.

    python scripts/run_linear_probe.py --model_name_or_path ./beit --train_dir ./train --validation_dir ./val \
        --layers 6 9 12 --pooling cls+mean --feature_cache_dir ./features
"""

from hf_mim.cli import run_command
from hf_mim.evaluation.probe import main

if __name__ == "__main__":
    run_command(main)
