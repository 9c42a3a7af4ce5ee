"""Reading pickled files from anywhere (released checkpoints, a downloaded `training_args.bin`) without running them.

A pickle names the classes and functions it needs, and unpickling normally imports and calls them. Here the caller
decides what each name becomes: an allow-listed object, an inert [`StandIn`] that only records what the pickle
passes, or a refusal raised before anything is imported or called. The converters and the model cards read through
these helpers.
"""

import _compat_pickle
import pickle
import types
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

# What torch.load raises on a file that is not a checkpoint it can read: truncated archives, text files (the legacy
# reader's KeyError on the magic number), empty files, pickles of something else, a truncated .safetensors file.
UNREADABLE_FILE_ERRORS = (RuntimeError, EOFError, KeyError, ValueError, AttributeError, TypeError, SafetensorError)


class StandIn:
    """Inert stand-in for a class a pickle names: records the arguments and the state the pickle passes and runs
    none of the class's code. `qualified_name` is the pickled `module.name`."""

    qualified_name = ""
    # A pickle may create the object without calling __init__ (protocol 2's NEWOBJ).
    args = ()
    # Read by torch's legacy loader when it compares pickled module source; never write patch files.
    dump_patches = False

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stand-in for {self.qualified_name}>"


def stand_in(qualified_name: str) -> type[StandIn]:
    """A [`StandIn`] subclass for the pickled class `qualified_name` (`"module.Name"`), carrying that module and name,
    which is how `torch.load(weights_only=True)` matches its `safe_globals`."""
    module, name = qualified_name.rsplit(".", 1)
    attributes = {"__module__": module, "__qualname__": name, "qualified_name": qualified_name}
    return type(name, (StandIn,), attributes)


def load_restricted(path: str | Path, find_global: Callable[[str, str], object]):
    """`torch.load(path)` (the zip format and the legacy one) in which every global the pickle names is resolved
    only by `find_global(module, name)`, which returns what to use instead or raises; tensors are loaded onto the
    CPU. Module names of Python 2 pickles (`__builtin__.set`, torch.save's protocol 2) are translated first.

    Raises:
        What `find_global` raises, and torch's errors for a file it cannot read (see `UNREADABLE_FILE_ERRORS`,
        `pickle.UnpicklingError`).
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[module, name]
            return find_global(_compat_pickle.IMPORT_MAPPING.get(module, module), name)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    # torch.load's `pickle_module`: it unpickles every part of the file (zip and legacy formats) with this Unpickler.
    pickle_module = types.ModuleType("hf_mim_restricted_pickle")
    pickle_module.Unpickler = Unpickler
    pickle_module.load = load
    return torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)


__all__ = ["UNREADABLE_FILE_ERRORS", "StandIn", "load_restricted", "stand_in"]
