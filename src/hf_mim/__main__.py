"""`python -m hf_mim <command> ...`: the `hf-mim` command without its executable, as `accelerate launch -m hf_mim
pretrain ...` runs it."""

from .cli import main

if __name__ == "__main__":
    main(prog="python -m hf_mim")
