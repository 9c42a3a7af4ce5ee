"""Every command the README and the commands' `--help` examples show parses with today's flags: a recipe that names a flag that no longer exists, or a
combination the commands refuse at launch (a schedule's kwargs it does not read, validation images without
--do_eval, ...), fails here rather than for the user who copies it."""

import contextlib
import importlib
import io
import re
import shlex

import pytest
from test_run_mim import REPO

# The README's name of a command (its hf-mim subcommand or script) -> the module whose parse_args reads its flags.
PARSERS = {
    "pretrain": "hf_mim.training.run_mim",
    "run_mim.py": "hf_mim.training.run_mim",
    "train-tokenizer": "hf_mim.training.train_tokenizer",
    "train_tokenizer.py": "hf_mim.training.train_tokenizer",
    "finetune": "hf_mim.training.run_image_classification",
    "run_image_classification.py": "hf_mim.training.run_image_classification",
    "probe": "hf_mim.evaluation.probe",
    "run_linear_probe.py": "hf_mim.evaluation.probe",
    "knn": "hf_mim.evaluation.knn",
    "run_knn.py": "hf_mim.evaluation.knn",
    "export": "hf_mim.evaluation.export",
    "export_to_transformers.py": "hf_mim.evaluation.export",
    "push": "hf_mim.hub.push",
    "push_to_hub.py": "hf_mim.hub.push",
}
TRAINING = {"hf_mim.training.run_mim", "hf_mim.training.train_tokenizer", "hf_mim.training.run_image_classification"}


def command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(command name, its arguments) of every command line of `text` (continuation lines joined) that runs an
    hf_mim command; lines that elide flags with `...` are left out."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip().startswith(("hf-mim ", "python ", "accelerate launch ", "HF_")):
            continue
        words = shlex.split(line, comments=True)
        for index, word in enumerate(words):
            if word.endswith("hf-mim") or word == "$(which":
                name, args = words[index + 1], words[index + 2 :]
            elif word == "-m" and words[index + 1 : index + 2] == ["hf_mim"]:
                name, args = words[index + 2], words[index + 3 :]
            elif word.startswith("scripts/") and word.endswith(".py"):
                name, args = word.split("/")[-1], words[index + 1 :]
            else:
                continue
            if name.endswith(")"):  # accelerate launch $(which hf-mim) <command>
                name, args = args[0], args[1:]
            if "..." not in args:
                commands.append((name, args))
            break
    return commands


def readme_commands() -> list[tuple[str, list[str]]]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return [command for block in blocks for command in command_lines(block)]


def help_commands() -> list[tuple[str, list[str]]]:
    """The usage examples of every parsed command's `--help`."""
    commands = []
    for module_name in sorted(set(PARSERS.values())):
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
            importlib.import_module(module_name).parse_args(["--help"])
        commands += command_lines(shown.getvalue())
    return commands


COMMANDS = [command for command in readme_commands() + help_commands() if command[0] in PARSERS]


def test_the_readme_shows_every_parsed_command():
    assert {PARSERS[name] for name, _ in readme_commands() if name in PARSERS} == set(PARSERS.values())


@pytest.mark.parametrize("name, args", COMMANDS, ids=[f"{name} {' '.join(args)[:60]}" for name, args in COMMANDS])
def test_a_readme_command_parses(name, args):
    module = importlib.import_module(PARSERS[name])
    # The recipes are for GPUs (--bf16): on this machine, the same flags on the CPU.
    module.parse_args([*args, "--use_cpu"] if PARSERS[name] in TRAINING else args)
