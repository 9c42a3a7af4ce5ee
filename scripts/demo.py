"""End-to-end CCViT demo with no data arguments: `python scripts/demo.py` or `hf-mim demo` (see `hf_mim.demo`)."""

from hf_mim.cli import run_command
from hf_mim.demo import main

if __name__ == "__main__":
    run_command(main)
