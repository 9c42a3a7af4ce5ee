#!/usr/bin/env python
"""Convert CCViT's released k-means centroids (`centroids.npy`): `hf-mim convert-ccvit`. See `--help`.

    python scripts/convert_ccvit_to_hf_mim.py --centroids centroids.npy --output_dir ccvit-kmeans
"""

from hf_mim.cli import run_command
from hf_mim.convert.cli import ccvit_main as main

if __name__ == "__main__":
    run_command(main)
