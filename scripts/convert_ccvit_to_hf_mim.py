#!/usr/bin/env python
"""Convert CCViT's released k-means centroids (`centroids.npy`, 8192 x 768) into an hf_mim_kmeans tokenizer folder.

    python scripts/convert_ccvit_to_hf_mim.py --centroids centroids.npy --output_dir ccvit-kmeans

The array is read without pickle support, so the file cannot execute code.
"""

import argparse

from hf_mim.cli import run_command
from hf_mim.convert.ccvit import convert_ccvit_centroids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--centroids", required=True, help="CCViT's centroids.npy")
    parser.add_argument("--output_dir", required=True, help="Folder to write the tokenizer to")
    parser.add_argument("--image_size", type=int, default=224, help="Side of the view the centroids tokenize")
    args = parser.parse_args(argv)
    convert_ccvit_centroids(args.centroids, output_dir=args.output_dir, image_size=args.image_size)
    print(f"Saved the k-means tokenizer to {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
