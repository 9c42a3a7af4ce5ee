"""The exception of a user's mistake, which command-line entry points report as one line instead of a traceback."""


class UsageError(ValueError):
    """A mistake of the user's (a bad path, flag value or launch, a wrong kind of checkpoint, an impossible setting).

    Its message names the offending path or flag and the fix. The command-line entry points
    (`hf_mim.cli.run_command`) print it as one line on the main process and exit with status 2; programming errors
    keep their tracebacks. A `ValueError`, so library callers can catch it as before.
    """


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (libraries write several), or its type's name when it has none: the reason
    a one-line `UsageError` quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["UsageError", "first_line"]
