#!/usr/bin/env python
"""Convert a released BEiT or BEiT v2 pre-training checkpoint (unilm `.pth`) into an hf_mim folder.

    python scripts/convert_beit_to_hf_mim.py --checkpoint beitv2_base_patch16_224_pt1k.pth \
        --tokenizer_name_or_path vqkd-clip-3x --output_dir beitv2-base-pt1k

BEiT v2 checkpoints (with `cls_pt_layers`) become hf_mim_beitv2, BEiT ones hf_mim_beit. With a tokenizer (an
hf_mim folder, e.g. from scripts/convert_vqkd_to_hf_mim.py) the model computes its own targets and can continue
pre-training with run_mim.py --model_name_or_path.
"""

import argparse

from hf_mim.cli import run_command
from hf_mim.convert.unilm import convert_beit_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Path of the unilm .pth file")
    parser.add_argument("--output_dir", required=True, help="Folder to write the converted model to")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="hf_mim tokenizer to hold inside the model")
    parser.add_argument("--early_layers", type=int, default=None, help="BEiT v2: layer of the aggregated patches")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="Only for checkpoints without rel-pos bias")
    parser.add_argument("--image_mean", type=float, nargs=3, default=None, help="ViT view mean (default by version)")
    parser.add_argument("--image_std", type=float, nargs=3, default=None, help="ViT view std (default by version)")
    args = parser.parse_args(argv)
    model = convert_beit_checkpoint(
        args.checkpoint,
        args.output_dir,
        tokenizer_name_or_path=args.tokenizer_name_or_path,
        early_layers=args.early_layers,
        num_attention_heads=args.num_attention_heads,
        image_mean=args.image_mean,
        image_std=args.image_std,
    )
    print(f"Saved a {model.config.model_type} model ({model.config.num_hidden_layers} layers) to {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
