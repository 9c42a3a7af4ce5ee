#!/usr/bin/env python
"""Fine-tune a pretrained encoder for image classification: `hf-mim finetune`. See `--help`.

    accelerate launch scripts/run_image_classification.py --model_name_or_path ./beit --train_dir ./train \
        --validation_dir ./val --output_dir ./beit-finetuned --do_train --do_eval --layer_decay 0.65 \
        --mixup 0.8 --cutmix 1.0 --label_smoothing 0.1 --drop_path_rate 0.1
"""

from hf_mim.cli import run_command
from hf_mim.training.run_image_classification import main

if __name__ == "__main__":
    run_command(main)
