"""Loading what a user names on the command line (a checkpoint folder or Hub id), with errors that name the flag."""

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from ..checkpoint_folder import unreadable_weights
from ..errors import UsageError, first_line


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path, not a Hub id."""
    # A Hub id is "name" or "owner/name"; anything else (./x, /x, ~/x, a/b/c) can only be a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _not_found_or_unreachable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says a Hub repo does not exist or the Hub could not be reached, rather
    than that a repo that was found could not be used (gated, remote code, an unknown model type)."""
    names = {"RepositoryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
             "ConnectionError", "ConnectTimeout", "HFValidationError"}  # fmt: skip
    while error is not None:
        if any(cls.__name__ in names for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def pretrained(load, name_or_path: str, flag: str, **kwargs):
    """`load(name_or_path, **kwargs)` (a `from_pretrained`), with a one-line `UsageError` naming `--flag` when
    `name_or_path` is neither a folder here nor a loadable Hub repository."""
    if not os.path.isdir(name_or_path) and (looks_local(name_or_path) or os.path.exists(name_or_path)):
        raise UsageError(f"--{flag} {name_or_path}: no such folder; pass the folder of a saved checkpoint or a Hub id")
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        if isinstance(error, UsageError):
            raise
        unreadable = unreadable_weights(name_or_path) if os.path.isdir(name_or_path) else None
        if unreadable is not None:
            raise UsageError(
                f"--{flag} {name_or_path}: {unreadable[0]} is unreadable ({unreadable[1]}), a truncated or corrupt "
                "copy: copy or download the checkpoint again"
            ) from error
        if not os.path.exists(name_or_path) and _not_found_or_unreachable(error):
            # "runs/beit" is a Hub id as much as a relative path: say it is neither.
            raise UsageError(
                f"--{flag} {name_or_path}: no such folder here, and as a Hub id it could not be loaded "
                f"({first_line(error)}); check the path, or the Hub id and the network"
            ) from error
        raise UsageError(f"--{flag} {name_or_path} could not be loaded: {first_line(error)}") from error


def require_folder_path(flag: str, path: str | None) -> None:
    """A one-line error when `--flag`, a folder the command writes into, names an existing file or a place where
    nothing can be written (a read-only file system, no permission): found at launch, not when a run that may have
    taken hours writes its first file. Only a file made and removed in the folder, or in its nearest existing parent,
    tells (permission bits do not bind root, and a read-only mount leaves them as they were)."""
    if path is None:
        return
    if os.path.isfile(path):
        raise UsageError(f"--{flag} {path} is a file; pass a folder (new or existing)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            # A drive or network share that does not exist (Windows): its root is its own parent.
            raise UsageError(f"--{flag} {path}: {existing} does not exist; pass a folder on a drive you can write to")
        existing = parent
    if not os.path.isdir(existing):
        raise UsageError(f"--{flag} {path}: {existing} is a file, so no folder can be made there; pass another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"--{flag} {path}: nothing can be written in {existing} ({error.strerror}); pass a folder you can write to"
        ) from error


def is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def require_outside_image_folders(flag: str, path: str | None, image_folders: list[tuple[str, str | None]]) -> None:
    """A one-line error when `--flag`, a folder the command writes into, is one of the image folders it reads
    (`image_folders`: (flag name, folder) pairs) or lies inside one: the next run over those images would read what
    this one wrote there (figures, a model's files) as images or classes."""
    if path is None:
        return
    for name, folder in image_folders:
        if folder is not None and os.path.isdir(folder) and is_within(path, folder):
            raise UsageError(
                f"--{flag} {path} is inside --{name} {folder}: the next run over those images would read what this one "
                "writes there; pass a folder outside it"
            )


def require_new_output_dir(output_dir: str, model_name_or_path: str) -> None:
    """Refuse an `--output_dir` that is a file, or the folder of `--model_name_or_path`, which writing the new
    checkpoint would overwrite (the source's heads and tokenizer with it)."""
    require_folder_path("output_dir", output_dir)
    if os.path.isdir(model_name_or_path) and os.path.realpath(output_dir) == os.path.realpath(model_name_or_path):
        raise UsageError(
            f"--output_dir {output_dir} is the folder of --model_name_or_path, which the new checkpoint would "
            "overwrite: pass another folder"
        )


def require_output_dir_of(output_dir: str, model_type: str, architecture: str | None = None) -> None:
    """A one-line error when `--output_dir` holds a checkpoint of another model type than the `model_type` the command
    writes (or, given `architecture`, of the same type with another head: a stock BEiT encoder and a classifier are
    both `beit`): its config and weights would be replaced and the rest of its files (code, trainer state, tokenizer
    view, labels) left beside them, a folder of neither model (`--overwrite_output_dir` removes an earlier run's
    checkpoints, state and results, not its weights and config)."""
    config = _saved_config(output_dir)
    saved = config.get("model_type")
    saved_architecture = (config.get("architectures") or [None])[0]
    if saved is not None and saved != model_type:
        kind = saved
    elif architecture is not None and saved_architecture not in (None, architecture):
        kind, model_type = f"{saved} {saved_architecture}", f"{model_type} {architecture}"
    else:
        return
    raise UsageError(
        f"--output_dir {output_dir} holds a {kind} checkpoint, and this run would write a {model_type} one over it, "
        "leaving the rest of its files beside: pass another folder, or empty this one"
    )


def saved_model_type(name_or_path: str) -> str | None:
    """The `model_type` of a local checkpoint folder's config.json (None for Hub ids or folders without one)."""
    return _saved_config(name_or_path).get("model_type")


def _saved_config(name_or_path: str) -> dict:
    """A local checkpoint folder's config.json ({} for Hub ids or folders without one)."""
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as file:
            config = json.load(file)
    except ValueError as error:
        # E.g. a run killed while it saved.
        raise UsageError(f"{path} is not a JSON config ({first_line(error)}): save the model again, or remove it") from error
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON config (it holds a {type(config).__name__}): save the model again, or "
                         "remove it")
    return config


def require_tokenizer(tokenizer, name_or_path: str, flag: str = "tokenizer_name_or_path") -> None:
    """A one-line error when the model loaded from `--flag` is not a visual tokenizer (no codebook to predict)."""
    if callable(getattr(tokenizer, "get_codebook_indices", None)) and hasattr(tokenizer.config, "codebook_size"):
        return
    model_type = getattr(tokenizer.config, "model_type", type(tokenizer).__name__)
    if hasattr(tokenizer.config, "tokenizer_config"):
        fix = "it is a MIM checkpoint, which holds its tokenizer: pass it as --model_name_or_path"
    else:
        fix = "train one with scripts/train_tokenizer.py (dvae, vqkd, kmeans) or convert a released one"
    raise UsageError(f"--{flag} {name_or_path} is a {model_type} model, not an hf_mim visual tokenizer; {fix}")


__all__ = [
    "is_within",
    "looks_local",
    "pretrained",
    "require_folder_path",
    "require_new_output_dir",
    "require_output_dir_of",
    "require_outside_image_folders",
    "require_tokenizer",
    "saved_model_type",
]
