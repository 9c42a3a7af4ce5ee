"""Running an hf_mim command: a user's mistake ends the launch with one line and status 2, not a traceback."""

import os
import sys
from collections.abc import Callable

from .errors import UsageError

# Set to 1 to see the traceback of a UsageError too.
DEBUG_VARIABLE = "HF_MIM_DEBUG"


def is_main_launch_process() -> bool:
    """True in the first process of a launch (`accelerate launch`/`torchrun` set RANK), or in a lone process."""
    return os.environ.get("RANK", "0") == "0"


def run_command(main: Callable, argv: list[str] | None = None):
    """Call `main(argv)`; on a `UsageError`, print `error: <message>` once per launch (rank 0) and exit with 2."""
    try:
        return main(argv)
    except UsageError as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if is_main_launch_process():
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


__all__ = ["DEBUG_VARIABLE", "is_main_launch_process", "run_command"]
