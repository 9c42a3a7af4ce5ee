"""The `hf-mim` command, and running any hf_mim command: a user's mistake ends the launch with one line and status 2,
not a traceback.

`hf-mim <command> [<args>...]` runs one of `COMMANDS`; `python -m hf_mim <command> ...` is the same (the form
`accelerate launch -m hf_mim pretrain ...` runs). A command's module is imported only when it runs, so
`hf-mim --help` costs no more than `import hf_mim`.
"""

import difflib
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from . import __version__
from .errors import UsageError

# Set to 1 to see the traceback of a UsageError too.
DEBUG_VARIABLE = "HF_MIM_DEBUG"
PROG = "hf-mim"


class Command(NamedTuple):
    """A subcommand: the `main(argv)` it runs, as "module:function" so it is imported only when it runs."""

    target: str
    description: str


COMMANDS = {
    "pretrain": Command(
        "hf_mim.training.run_mim:main", "Masked image modeling pre-training (BEiT, BEiT v2, mc-BEiT, CCViT)"
    ),
    "train-tokenizer": Command(
        "hf_mim.training.train_tokenizer:main", "Train a dVAE or VQ-KD tokenizer, or fit a (feature) k-means one"
    ),
    "finetune": Command(
        "hf_mim.training.run_image_classification:main", "Fine-tune a pretrained encoder for image classification"
    ),
    "probe": Command("hf_mim.evaluation.probe:main", "Linear probe of a frozen encoder"),
    "knn": Command("hf_mim.evaluation.knn:main", "Weighted k-NN classification on frozen features"),
    "export": Command("hf_mim.evaluation.export:main", "Export an encoder as a stock transformers BEiT checkpoint"),
    "push": Command("hf_mim.hub.push:main", "Upload a checkpoint folder to the Hub with its code and model card"),
    "visualize": Command(
        "hf_mim.visualization:main", "PNG figures of a checkpoint: masks, token maps, reconstructions, codebook usage"
    ),
    "demo": Command("hf_mim.demo:main", "The whole pipeline on images bundled with scikit-learn, no data needed"),
    "convert-beit": Command("hf_mim.convert.cli:beit_main", "Convert a released BEiT/BEiT v2 checkpoint (unilm .pth)"),
    "convert-ccvit": Command("hf_mim.convert.cli:ccvit_main", "Convert CCViT's k-means centroids (centroids.npy)"),
    "convert-dalle": Command("hf_mim.convert.cli:dalle_main", "Convert OpenAI's DALL-E dVAE (encoder/decoder.pkl)"),
    "convert-taming": Command("hf_mim.convert.cli:taming_main", "Convert a taming Gumbel VQGAN (mc-BEiT's tokenizer)"),
    "convert-vqkd": Command("hf_mim.convert.cli:vqkd_main", "Convert a released VQ-KD tokenizer (unilm .pth)"),
}


def is_main_launch_process() -> bool:
    """True in the first process of a launch (`accelerate launch`/`torchrun` set RANK), or in a lone process."""
    return os.environ.get("RANK", "0") == "0"


def one_process(command: str) -> Callable[[Callable], Callable]:
    """Decorates the `main` of `command`, which runs in one process: a launch that started several (`accelerate
    launch --num_processes N`, `torchrun`) ends in one line, since each process would do the whole job on the same
    GPU and write the same files at once."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv=None):
            # torchrun and accelerate launch give each process its LOCAL_RANK; a job that only exports WORLD_SIZE to
            # its containers (a lone command in a training job's pod) is not a launch of this command.
            launched = int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1
            asks_help = any(arg in ("-h", "--help") for arg in (sys.argv[1:] if argv is None else argv))
            if launched > 1 and not asks_help:
                raise UsageError(
                    f"`{PROG} {command}` runs in one process, and the launcher started {launched}: each would do the "
                    "whole job on the same GPU and write the same files at once; run it without accelerate launch "
                    "or torchrun (CUDA_VISIBLE_DEVICES picks its GPU)"
                )
            return main(argv)

        return run

    return decorate


def run_command(main: Callable, argv: list[str] | None = None):
    """Call `main(argv)`; on a `UsageError`, print `error: <message>` once per launch (rank 0) and exit with 2."""
    try:
        return main(argv)
    except UsageError as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if is_main_launch_process():
            close_progress_bars()
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        end_process_group()


def close_progress_bars() -> None:
    """Close the progress bars a mistake found mid-run interrupts (Trainer's training and evaluation bars), so that
    the error starts a line of its own instead of continuing a bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not replace the error being reported
            pass


def end_process_group() -> None:
    """Tear down the process group of a launch (`accelerate launch`) before the interpreter exits: left to shutdown,
    the communication threads of gloo (and NCCL) can abort a process whose work is done ("terminate called without
    an active exception", exit -6), failing the launch."""
    distributed = sys.modules.get("torch.distributed")  # not imported: no group to end
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def command_list(prog: str = PROG) -> str:
    """The help of `prog` itself: usage and the subcommands with one line each."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {prog} <command> [<args>...]",
        "",
        "Masked image modeling with visual tokenizers. `<command> --help` shows a command's options.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.description}" for name, command in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this list and exit",
        "  --version   show hf_mim's version and exit",
        "",
        "Several processes or GPUs: accelerate launch [<launch args>] -m hf_mim <command> [<args>...]",
    ]
    return "\n".join(lines)


def dispatch(argv: list[str], prog: str = PROG) -> None:
    """Run `argv[0]`'s command with the rest of `argv`; an unknown command is a `UsageError`."""
    name, *args = argv
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean `{prog} {close[0]}`? " if close else ""
        kind = "option" if name.startswith("-") else "command"
        raise UsageError(f"unknown {kind} {name!r}; {hint}`{prog} --help` lists the commands and options")
    module_name, function_name = COMMANDS[name].target.split(":")
    command_main = getattr(importlib.import_module(module_name), function_name)
    # The commands' parsers take their name (usage line, errors) from sys.argv[0]: make it `hf-mim pretrain`, not the
    # path of the hf-mim executable or of hf_mim/__main__.py.
    launch_argv = sys.argv
    sys.argv = [f"{prog} {name}", *args]
    try:
        command_main(args)
    finally:
        sys.argv = launch_argv


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The `hf-mim` command: `hf-mim <command> [<args>...]` (`argv`, default `sys.argv[1:]`).

    Returns None, never a command's results: console scripts exit with `main()`'s return value.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(command_list(prog))
        return
    if argv[:1] == ["--version"]:
        print(f"hf_mim {__version__}")
        return
    if not argv:
        # Nothing to run: the list, and the status of a usage error, so a script that lost its command fails.
        print(command_list(prog), file=sys.stderr)
        raise SystemExit(2)
    run_command(lambda args: dispatch(args, prog), argv)


__all__ = [
    "COMMANDS",
    "DEBUG_VARIABLE",
    "PROG",
    "Command",
    "close_progress_bars",
    "command_list",
    "dispatch",
    "end_process_group",
    "is_main_launch_process",
    "main",
    "one_process",
    "run_command",
]
