"""`--help` of the commands whose options come from dataclasses: a description with examples under a one-line usage,
hf_mim's options first in named groups, transformers' `TrainingArguments` last, each default said once; and the same
parsing as a plain `HfArgumentParser`."""

import importlib
import re

import pytest
from transformers import HfArgumentParser

from hf_mim import arguments
from hf_mim.cli import COMMANDS, main

# The commands that parse with `command_parser`: all but push, whose folder is positional and whose --dataset and --tag
# repeat (argparse's own parser).
DATACLASS_COMMANDS = [
    "pretrain", "train-tokenizer", "finetune", "probe", "knn", "export", "visualize", "demo",
    "convert-beit", "convert-ccvit", "convert-dalle", "convert-taming", "convert-vqkd",
]  # fmt: skip
TRAINING_COMMANDS = ["pretrain", "train-tokenizer", "finetune"]


def command_help(name, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def options_in_order(help_text: str) -> list[str]:
    """The options of a --help, in the order shown (an option's entry starts with two spaces; examples are
    indented further or start with the command)."""
    return re.findall(r"^  (--\w+)", help_text, flags=re.MULTILINE)


def option_entries(help_text: str) -> dict[str, str]:
    """Each option's entry (invocation and help, wrapped lines joined), by its first option string."""
    body = help_text[help_text.index("\noptions:\n") :]
    entries = re.split(r"\n(?=  -)|\n\n", body)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.startswith("  -")}


@pytest.fixture
def parsers(monkeypatch):
    """The parser each command builds, by command name, filled when its --help runs."""
    built = {}
    # The converters share one module: its spy files the parser under each of them (a test runs one command).
    names_of = {}
    for name in DATACLASS_COMMANDS:
        names_of.setdefault(COMMANDS[name].target.split(":")[0], []).append(name)

    def spy(names):
        def build(*args, **kwargs):
            parser = arguments.command_parser(*args, **kwargs)
            built.update(dict.fromkeys(names, parser))
            return parser

        return build

    for module_name, names in names_of.items():
        monkeypatch.setattr(importlib.import_module(module_name), "command_parser", spy(names))
    return built


def test_pretrain_help_starts_with_a_usage_line_then_its_description(capsys, monkeypatch):
    lines = command_help("pretrain", capsys, monkeypatch).splitlines()
    assert lines[0] == "usage: hf-mim pretrain [-h] [options]"
    assert lines[1] == "" and lines[2].startswith("Masked image modeling pre-training")


@pytest.mark.parametrize("name", DATACLASS_COMMANDS)
def test_every_command_describes_itself_with_examples(name, capsys, monkeypatch):
    out = command_help(name, capsys, monkeypatch)
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: hf-mim {name} [-h]") and usage.endswith("[options]") and "\n" not in usage
    description = rest[: rest.index("\noptions:\n")]
    assert "\nexamples:\n" in description and f"\n  hf-mim {name} --" in description


def test_pretrain_shows_hf_mim_options_first(capsys, monkeypatch):
    options = options_in_order(command_help("pretrain", capsys, monkeypatch))
    first_kmeans = min(options.index(option) for option in options if option.startswith("--kmeans_"))
    assert options.index("--model_type") < first_kmeans < options.index("--learning_rate")
    assert options.index("--model_type") < options.index("--train_dir") < options.index("--mask_ratio")
    for own in ("--max_train_seconds", "--skip_nonfinite_steps", "--overwrite_output_dir", "--remove_unused_columns"):
        assert options.index(own) < options.index("--output_dir") < options.index("--learning_rate"), own


def test_pretrain_groups_its_options(capsys, monkeypatch, parsers):
    command_help("pretrain", capsys, monkeypatch)
    parser = parsers["pretrain"]
    groups = {group.title: [action.dest for action in group._group_actions] for group in parser._action_groups}
    assert [title for title, dests in groups.items() if dests] == [
        "options", "model", "tokenizer", "k-means fit (--fit_tokenizer)", "data", "augmentation", "masking",
        arguments.HF_MIM_TRAINING_GROUP, arguments.TRANSFORMERS_TRAINING_GROUP,
    ]  # fmt: skip
    assert groups["options"] == ["help"]
    # hf_mim's new options before the TrainingArguments fields it re-declares with another default.
    hf_mim_training = groups[arguments.HF_MIM_TRAINING_GROUP]
    assert hf_mim_training[:3] == ["overwrite_output_dir", "skip_nonfinite_steps", "max_train_seconds"]
    assert {"dataloader_pin_memory", "prediction_loss_only", "label_names"} <= set(hf_mim_training)
    assert "learning_rate" in groups[arguments.TRANSFORMERS_TRAINING_GROUP]
    assert "max_train_samples" in groups["data"] and "kmeans_iterations" in groups["k-means fit (--fit_tokenizer)"]


@pytest.mark.parametrize("name", DATACLASS_COMMANDS)
def test_each_default_is_said_once(name, capsys, monkeypatch):
    out = command_help(name, capsys, monkeypatch)
    for line in out.splitlines():
        assert not ("(default " in line and "(default:" in line), line
    for option, entry in option_entries(out).items():
        # A help that states its own default ("(default 224)") gets no second one from the formatter.
        assert not ("(default " in entry and "(default:" in entry), entry
        assert "(default: None)" not in entry, entry
    if name in TRAINING_COMMANDS:
        assert "--max_train_seconds" in out and "--learning_rate" in out


@pytest.mark.parametrize("name", ["probe", "knn", "finetune"])
def test_commands_without_streaming_do_not_mention_it(name, capsys, monkeypatch):
    assert "--streaming" not in command_help(name, capsys, monkeypatch)


def test_the_no_switch_of_a_true_boolean_says_what_it_does(capsys, monkeypatch):
    entries = option_entries(command_help("pretrain", capsys, monkeypatch))
    assert entries["--no_exact_mask_count"].endswith("Same as --exact_mask_count false")
    assert "[true|false]" in entries["--exact_mask_count"] and "(default: True)" in entries["--exact_mask_count"]


def action_signature(parser) -> list[tuple]:
    # Types by name: a choice field's type is a closure made anew by each parser. hf_mim's float flags refuse nan and
    # inf (`finite_float`), as plain floats do not.
    from hf_mim.arguments import finite_float

    return [
        (
            tuple(action.option_strings), action.dest, repr(action.default),
            "float" if action.type is finite_float else getattr(action.type, "__qualname__", action.type), action.nargs,
            action.const, tuple(action.choices or ()), action.required, type(action),
        )
        for action in parser._actions
    ]  # fmt: skip


@pytest.mark.parametrize("name", DATACLASS_COMMANDS)
def test_the_options_parse_as_with_a_plain_hf_argument_parser(name, capsys, monkeypatch, parsers):
    command_help(name, capsys, monkeypatch)
    parser = parsers[name]
    plain = HfArgumentParser(parser.dataclass_types)
    assert action_signature(parser) == action_signature(plain)


def test_pretrain_parses_the_same_values(tmp_path, capsys, monkeypatch, parsers):
    from hf_mim.training import run_mim

    command_help("pretrain", capsys, monkeypatch)
    argv = [
        "--output_dir", str(tmp_path), "--model_type", "ccvit", "--fit_tokenizer", "--kmeans_iterations", "3",
        "--no_exact_mask_count", "--max_train_seconds", "5", "--streaming", "true", "--max_train_samples", "7",
        "--learning_rate", "1e-3", "--use_cpu", "--report_to", "none",
    ]  # fmt: skip
    model_args, data_args, training_args = run_mim.parse_args(argv)
    plain = HfArgumentParser(parsers["pretrain"].dataclass_types).parse_args_into_dataclasses(args=argv)
    assert (model_args, data_args) == plain[:2]
    assert model_args.fit_tokenizer and model_args.kmeans_iterations == 3 and data_args.streaming
    assert not data_args.exact_mask_count and data_args.max_train_samples == 7
    assert training_args.max_train_seconds == 5 and training_args.learning_rate == 1e-3
    assert (training_args.remove_unused_columns, training_args.prediction_loss_only) == (False, True)


def test_an_unknown_option_is_one_argparse_error_not_a_traceback(capsys):
    from hf_mim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--output_dir", "x", "--bogus_flag", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: hf-mim pretrain: unrecognized arguments: --bogus_flag 1" in err and "Traceback" not in err
