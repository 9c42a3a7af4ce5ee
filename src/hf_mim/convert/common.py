"""What the converters share: reading the file a user names, safely, with one-line errors that name it and the fix.

Every mistake about the input (no such file, a folder, a file of another kind, a pickle that needs more than tensors
and plain containers) is a [`UsageError`]: the conversion scripts print it as one `error: ...` line and exit with 2.
"""

import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import UsageError
from ..safe_loading import UNREADABLE_FILE_ERRORS

# Lines of torch's weights-only refusal that are advice for trusted files, not the reason.
_BOILERPLATE = (
    "Weights only load failed", "Re-running `torch.load`", "Please file an issue", "Check the documentation"
)


def require_file(path: str | Path, flag: str, what: str) -> Path:
    """`path` as a `Path`; a [`UsageError`] naming `flag` when it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file; pass {what}")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; pass {what}")
    return path


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def describe(loaded) -> str:
    """What a loaded file holds, for errors: "a dict with entries ['args', 'model']", "a list"."""
    if isinstance(loaded, dict):
        return f"a dict with entries {sorted(map(str, loaded))[:8]}"
    return f"a {type(loaded).__name__}"


def refusal_reason(error: pickle.UnpicklingError) -> tuple[bool, str]:
    """Why `torch.load(weights_only=True)` refused a file: `(True, "it pickles 'posix.system'")` when the pickle names
    an object outside the allow-list, `(False, reason)` when the file is not a pickle torch can read at all."""
    message = str(error)
    if match := re.search(r"GLOBAL (\S+)", message):
        return True, f"it pickles '{match[1]}'"
    lines = [line.strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_BOILERPLATE)]
    reason = lines[0] if lines else type(error).__name__
    return reason.startswith(("Trying to call reduce", "Can only", "Unsupported global")), reason


def load_weights_only(
    path: str | Path,
    flag: str,
    what: str,
    safe_globals: Iterable = (),
    allowed: str = "tensors and plain containers",
    weights_key: str = "model",
):
    """`torch.load(path, weights_only=True)` with `safe_globals` allowed (inert stand-ins, never code).

    Args:
        flag, what: the command-line flag and a description of the expected file, for the error messages.
        allowed: what the allow-list admits, in words, for the refusal message.
        weights_key: the checkpoint entry that holds the weights, for the "extract them yourself" hint.

    Raises:
        UsageError: the file is missing or a folder, is not a PyTorch checkpoint, or pickles an object outside the
            allow-list (refused before anything it names is imported or called).
    """
    path = require_file(path, flag, what)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused, reason = refusal_reason(error)
        if refused:
            raise UsageError(
                f"{flag} {path}: torch.load(weights_only=True) refused it: {reason}, and only {allowed} are read; "
                "nothing from the file was run. If you trust the file, extract its weights with the code that wrote "
                f"it, e.g. `torch.save(torch.load(path, weights_only=False)['{weights_key}'], 'weights.pth')`, and "
                "convert weights.pth"
            ) from error
        raise UsageError(f"{flag} {path} is not a PyTorch checkpoint ({reason}); pass {what}") from error
    except UNREADABLE_FILE_ERRORS as error:
        raise UsageError(f"{flag} {path} is not a PyTorch checkpoint ({first_line(error)}); pass {what}") from error


__all__ = ["describe", "first_line", "load_weights_only", "refusal_reason", "require_file"]
