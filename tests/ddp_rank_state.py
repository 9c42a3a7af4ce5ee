"""Test launcher: `run_mim.main` that also writes each process's final weights to `rank_<N>.safetensors`.

Run under `accelerate launch`; DDP keeps replicas identical only if gradients are all-reduced and every rank
starts from the same weights, which the 2-process test checks on the saved files.
"""

import os
import sys

from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_mim.cli import run_command
from hf_mim.training.run_mim import main


class SaveRankState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        tensors = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
        save_file(tensors, os.path.join(args.output_dir, f"rank_{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    # As the real script: through run_command, which ends the process group before exit (left to interpreter
    # shutdown, gloo's threads can abort a finished rank: "terminate called without an active exception").
    run_command(lambda argv: main(argv, callbacks=[SaveRankState()]), sys.argv[1:])
