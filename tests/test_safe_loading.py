"""hf_mim.safe_loading: pickled files are read with every global chosen by the caller, and nothing in them runs."""

import os
import pickle
from collections import OrderedDict

import pytest
import torch

from hf_mim.safe_loading import StandIn, load_restricted, stand_in


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Record:
    """Pickled by class name and state (protocol 2's NEWOBJ + BUILD), as dataclasses such as TrainingArguments are."""

    def __init__(self):
        self.learning_rate = 0.1


def test_stand_in_carries_the_pickled_name_and_records_what_it_is_given():
    cls = stand_in("some.module.Callback")
    assert (cls.__module__, cls.__qualname__, cls.qualified_name) == ("some.module", "Callback", "some.module.Callback")
    instance = cls(1, 2)
    instance.__setstate__({"a": 3})
    assert isinstance(instance, StandIn) and instance.args == (1, 2) and instance.state == {"a": 3}
    assert repr(instance) == "<stand-in for some.module.Callback>"
    # Created without __init__ (NEWOBJ), it still has its (empty) arguments.
    assert cls.__new__(cls).args == ()


@pytest.mark.parametrize("zip_format", [True, False])
def test_every_global_goes_through_find_global_and_tensors_load(tmp_path, zip_format):
    path = tmp_path / "file.pt"
    torch.save({"weights": OrderedDict(w=torch.arange(3.0)), "ids": {1, 2}, "record": Record()}, path,
               _use_new_zipfile_serialization=zip_format)
    asked = []

    def find_global(module, name):
        asked.append((module, name))
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("builtins", "set"):
            return set
        if module == "torch._utils":
            return getattr(torch._utils, name)
        return stand_in(f"{module}.{name}")

    loaded = load_restricted(path, find_global)
    assert torch.equal(loaded["weights"]["w"], torch.arange(3.0)) and loaded["ids"] == {1, 2}
    # The test module's class is never imported: a record of its state stands in for it.
    assert isinstance(loaded["record"], StandIn) and loaded["record"].state == {"learning_rate": 0.1}
    assert loaded["record"].qualified_name == f"{__name__}.Record"
    # Protocol 2 names sets `__builtin__.set`: the caller is asked for the Python 3 name.
    assert ("builtins", "set") in asked and not any(module == "__builtin__" for module, _ in asked)


def test_a_refused_global_is_never_called(tmp_path):
    path = tmp_path / "exploit.pt"
    torch.save({"payload": Exploit(tmp_path / "owned")}, path)

    def refuse(module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")

    with pytest.raises(pickle.UnpicklingError, match=r"refused (posix|nt)\.system"):
        load_restricted(path, refuse)
    assert not (tmp_path / "owned").exists()
