#!/usr/bin/env python
"""Upload an hf_mim checkpoint folder to the Hub with its code files, image processors and model card.

    python scripts/push_to_hub.py ./beit-out --repo_id you/beit-tiny --dataset ILSVRC/imagenet-1k
    python scripts/push_to_hub.py ./beit-out --repo_id you/beit-tiny --dry_run ./upload   # look first

The same as `hf-mim push`; see `python scripts/push_to_hub.py --help`.
"""

from hf_mim.cli import run_command
from hf_mim.hub.push import main

if __name__ == "__main__":
    run_command(main)
