"""Test launcher: `run_mim.main` where rank 1's clock says the time budget is spent from the first step on, as a
process whose clock runs ahead of the others' would. Every process must still stop at the same step."""

import os
import sys

from hf_mim.cli import run_command
from hf_mim.training import budget
from hf_mim.training.run_mim import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        budget.TimeBudgetCallback.elapsed_fraction = lambda self: 0.0 if self.start is None else 2.0
    run_command(main, sys.argv[1:])
