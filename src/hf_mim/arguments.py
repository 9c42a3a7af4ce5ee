"""The parsers of the hf_mim commands: transformers' `HfArgumentParser` with a description and usage examples, a
one-line usage, and the options in named groups, hf_mim's own first and transformers' `TrainingArguments` last.

    parser = command_parser(
        (ModelArguments, DataArguments, MimTrainingArguments),
        description=DESCRIPTION,
        groups=[("model", [ModelArguments]), ("data", [ImageDatasetArguments]), ("masking", ["masking", ...])],
    )

Only `--help` (and the usage line of a flag error) changes: the options, their types, defaults and dataclasses are
`HfArgumentParser`'s, so every command parses exactly what it parsed before.

An option goes to the group that names its field, else to the group of a dataclass that declares or inherits the
field (`CommandArgumentParser.group_title`). A field declared by `TrainingArguments` goes to "transformers
TrainingArguments", one declared (or re-declared with another default) by an hf_mim subclass of it to "hf_mim
training"; those two groups come after the command's own, in that order.
"""

import argparse
import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import get_type_hints

from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from .errors import UsageError

HF_MIM_TRAINING_GROUP = "hf_mim training"
TRANSFORMERS_TRAINING_GROUP = "transformers TrainingArguments"

BOOLEAN_NOTE = (
    "A boolean option [true|false] takes an optional value: `--flag` and `--flag true` set it, `--flag false`\n"
    "clears it (as does `--no_flag`, for one that defaults to true)."
)
JSON_NOTE = "Instead of options, a single JSON file of {option: value} may be given: %(prog)s args.json"
BOOLEAN_METAVAR = "true|false"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` of the hf_mim commands.

    - The description and epilog are printed as written, so usage examples keep their lines.
    - An option's default follows its help as `(default: X)`, except when it is None (unset: the help says what
      happens then) or the option already shows it (`%(default)s`), and for `--no_*` switches.
    - An option and its alias share one metavar: `--model_type, --model-type MODEL_TYPE`.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            "%(default)" in help_text
            or not action.option_strings
            or action.default is None
            or action.default is argparse.SUPPRESS
            or isinstance(action, (argparse._StoreFalseAction, argparse._StoreTrueAction))
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def _read_json_object(path: str) -> dict:
    """The JSON object in the file `path`, or a one-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as file:
            options = json.load(file)
    except OSError as error:
        raise UsageError(f"{path}: cannot read this options file ({error.strerror}); pass an existing JSON file or the "
                         "options as flags") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); it holds one object of {{option: value}}") from error
    if not isinstance(options, dict):
        raise UsageError(f"{path} holds a JSON {type(options).__name__}; it holds one object of {{option: value}}")
    return options


def _declaring_class(dtype: type, name: str) -> type:
    """The class of `dtype`'s MRO whose own annotations declare the field `name` (the last to re-declare it)."""
    for cls in dtype.__mro__:
        if name in inspect.get_annotations(cls):
            return cls
    return dtype


def finite_float(text: str) -> float:
    """A float flag's value: float() also reads "nan" and "inf", which every range check (`x <= 0`) lets through."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value



class OneLineErrorParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (a missing, unknown or malformed flag) are a `UsageError`: one line,
    printed once per launch by `run_command`, where argparse would print its usage line too, on every rank."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; `{self.prog} --help` lists the options")


class CommandArgumentParser(HfArgumentParser, OneLineErrorParser):
    """`HfArgumentParser` whose options are shown in named groups, in the order of `groups`, then hf_mim's training
    options, then transformers' `TrainingArguments`.

    Args:
        dataclass_types: As for `HfArgumentParser`; parsing is unchanged.
        groups: `(title, selectors)` pairs in the order `--help` shows them; a selector is a field name, or a
            dataclass: the fields it declares or inherits, unless a class closer to a field's declaration (or the
            field's name) is selected too.
        kwargs: Passed to `argparse.ArgumentParser` (description, epilog, usage, ...).
    """

    def __init__(self, dataclass_types, groups: Sequence[tuple[str, Iterable[type | str]]] = (), **kwargs):
        titles = [title for title, _ in groups]
        titles += [title for title in (HF_MIM_TRAINING_GROUP, TRANSFORMERS_TRAINING_GROUP) if title not in titles]
        self._group_rank = {title: rank for rank, title in enumerate(titles)}
        self._field_groups: dict[str, str] = {}
        self._class_groups: dict[type, str] = {}
        for title, selectors in groups:
            for selector in selectors:
                if isinstance(selector, str):
                    self._field_groups[selector] = title
                else:
                    self._class_groups[selector] = title
        self._groups_by_title: dict[str, argparse._ArgumentGroup] = {}
        self._action_order: dict[argparse.Action, tuple] = {}
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        # -h first, then the groups in their order (argparse shows `_action_groups` in list order).
        named = sorted(self._groups_by_title.values(), key=lambda group: self._group_rank.get(group.title, len(titles)))
        self._action_groups = [self._positionals, self._optionals, *named]
        # Within a group, options in the order of their declarations, base classes first: a field re-declared by a
        # subclass (another default) stays at its base class's place in the dataclass, after the subclass's new ones.
        for group in named:
            group._group_actions.sort(key=lambda action: self._action_order[action])
        if self.usage is None:
            required = [
                f"{action.option_strings[0]} {self._get_formatter()._format_args(action, action.dest.upper())}"
                for action in self._actions
                if action.required and action.option_strings
            ]
            self.usage = " ".join(["%(prog)s [-h]", *required, "[options]"])

    def group_title(self, dtype: type, name: str) -> str | None:
        """The title of the group that shows the field `name` of `dtype`; None for the plain "options"."""
        if name in self._field_groups:
            return self._field_groups[name]
        owner = _declaring_class(dtype, name)
        # The selected class closest to the field's declaration: the declaring class or the first selected subclass
        # of it in `dtype`'s hierarchy (a base class's field goes with the command's dataclass that selects it)...
        for cls in reversed(dtype.__mro__):
            if cls in self._class_groups and issubclass(cls, owner):
                return self._class_groups[cls]
        # ... else the nearest selected base class of the declaring class.
        for cls in owner.__mro__:
            if cls in self._class_groups:
                return self._class_groups[cls]
        if issubclass(owner, TrainingArguments):
            from_transformers = owner.__module__.split(".")[0] == "transformers"
            return TRANSFORMERS_TRAINING_GROUP if from_transformers else HF_MIM_TRAINING_GROUP
        return None

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        # HfArgumentParser raises a ValueError (a traceback) for options it does not know; argparse's own error is the
        # one line with the usage that a mistyped flag deserves (exit status 2).
        if return_remaining_strings:
            return super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        *parsed, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(parsed)

    def parse_command_line(self, argv: Sequence[str] | None = None) -> tuple:
        """The dataclasses of the command line `argv` (default `sys.argv[1:]`); a lone `.json` argument is read as a
        file of options."""
        argv = sys.argv[1:] if argv is None else list(argv)
        if len(argv) == 1 and argv[0].endswith(".json"):
            return self.parse_json_options(argv[0])
        return self.parse_args_into_dataclasses(args=argv)

    def parse_json_options(self, path: str) -> tuple:
        """The dataclasses of the JSON file `path` of options (`{option: value}`), each parsed, converted and checked
        as the flag that gives it, so an unknown option, a bad value or a missing required one is argparse's one-line
        error (naming the file). A list for an option of one value (`report_to`, `fsdp`, which the command line
        takes as one string) is the field's value as it is, and `null` leaves an option that defaults to None unset.
        """
        options = _read_json_object(path)
        # `--no_<field>` switches share their field's dest; the field's own option holds its default and nargs.
        actions = {
            action.dest: action
            for action in self._actions
            if action.option_strings and not isinstance(action, argparse._StoreFalseAction)
        }
        argv, whole = [], {}
        for name, value in options.items():
            action = actions.get(name)
            if action is None:
                # Not "--name": argparse would read a hyphenated alias (do-train) or a --no_ switch without its value.
                raise UsageError(f"{path}: unknown option {name!r}; the options are the command's flags without '--' "
                                 "and with underscores (e.g. do_train), each with its value")
            elif value is None:
                if action.default is not None:
                    raise UsageError(f"{path}: {name} is null, but it defaults to {action.default!r}; give it a value "
                                     "or leave it out")
            elif isinstance(value, list) and (action.nargs not in ("+", "*") or not value):
                if action.nargs not in ("+", "*") and action.type not in (str, None):
                    raise UsageError(f"{path}: {name} takes one value, got the list {json.dumps(value)}")
                whole[name] = value
            else:
                values = value if isinstance(value, list) else [value]
                argv += [f"--{name}", *(self._json_value_as_flag(item) for item in values)]
        try:
            namespace, remaining = self.parse_known_args(argv)
            if remaining:
                self.error(f"unrecognized arguments: {' '.join(remaining)}")
            return self.parse_dict({**vars(namespace), **whole})
        except UsageError as error:
            raise UsageError(f"{path}: {error}") from error

    @staticmethod
    def _json_value_as_flag(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            # What a flag such as --lr_scheduler_kwargs takes on the command line.
            return json.dumps(value)
        return str(value)

    def _container(self, title: str | None):
        if title is None:
            return self
        if title not in self._groups_by_title:
            self._groups_by_title[title] = self.add_argument_group(title)
        return self._groups_by_title[title]

    def _add_dataclass_arguments(self, dtype):
        # HfArgumentParser's, with each field added to its group instead of one group per dataclass.
        type_hints = get_type_hints(dtype)
        base_first = list(reversed(dtype.__mro__))
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = type_hints[field.name]
            num_actions = len(self._actions)
            self._parse_dataclass_field(self._container(self.group_title(dtype, field.name)), field)
            owner = _declaring_class(dtype, field.name)
            order = (
                self.dataclass_types.index(dtype),
                base_first.index(owner),
                list(inspect.get_annotations(owner)).index(field.name),
            )
            for index, action in enumerate(self._actions[num_actions:]):
                self._action_order[action] = (*order, index)
                if action.type is string_to_bool:
                    action.metavar = BOOLEAN_METAVAR
                if action.type is float:
                    action.type = finite_float
                # The `--no_<field>` switch HfArgumentParser adds for a boolean that defaults to true repeats the
                # field's help, which then reads as the opposite of what it does.
                if isinstance(action, argparse._StoreFalseAction):
                    action.help = f"Same as --{field.name} false"


def command_parser(
    dataclass_types,
    description: str | Sequence[str],
    groups: Sequence[tuple[str, Iterable[type | str]]] = (),
    epilog: str | None = None,
    json_file: bool = False,
) -> CommandArgumentParser:
    """The parser of an hf_mim command: `description` (dedented; usage examples included; several strings, such as
    a module docstring and examples, are dedented one by one and joined by blank lines) under the usage line,
    options in `groups` (see `CommandArgumentParser`), then `epilog`, how boolean options read (when it has any), and
    with `json_file` that a single `.json` argument holds the options (`parse_command_line` reads it).
    `description` and `epilog` may name the command as `%(prog)s` (then a literal percent sign is `%%`)."""
    parts = [description] if isinstance(description, str) else description
    description = "\n\n".join(inspect.cleandoc(part) for part in parts)
    parser = CommandArgumentParser(dataclass_types, groups=groups, description=description)
    notes = [inspect.cleandoc(epilog)] if epilog else []
    if any(action.metavar == BOOLEAN_METAVAR for action in parser._actions):
        notes.append(BOOLEAN_NOTE)
    if json_file:
        notes.append(JSON_NOTE)
    parser.epilog = "\n\n".join(notes) or None
    return parser


def flags_set(arguments, names: Iterable[str]) -> list[str]:
    """The flags among `names` whose value in the dataclass instance `arguments` differs from its declared default:
    those the user gave (or a default-valued flag's value changed), e.g. to refuse flags a setting would ignore."""
    declared = {field.name: field for field in dataclasses.fields(arguments)}

    def default(field):
        # A list flag's default comes from its factory.
        return field.default_factory() if field.default is dataclasses.MISSING else field.default

    return [name for name in names if getattr(arguments, name) != default(declared[name])]


__all__ = [
    "BOOLEAN_METAVAR",
    "BOOLEAN_NOTE",
    "HF_MIM_TRAINING_GROUP",
    "JSON_NOTE",
    "TRANSFORMERS_TRAINING_GROUP",
    "CommandArgumentParser",
    "HelpFormatter",
    "OneLineErrorParser",
    "command_parser",
    "finite_float",
    "flags_set",
]
