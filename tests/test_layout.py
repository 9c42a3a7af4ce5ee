"""The design card's rules for the remote-code closure, checked on the source."""

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

CLOSURE = pathlib.Path(__file__).resolve().parents[1] / "src" / "hf_mim" / "models"
ALLOWED_TOP_LEVEL = {"torch", "transformers", "numpy", "PIL", "safetensors", "huggingface_hub"}
CLOSURE_FILES = sorted(path for path in CLOSURE.glob("*.py") if path.name != "__init__.py")


@pytest.mark.parametrize("path", CLOSURE_FILES, ids=lambda path: path.name)
def test_closure_imports_only_flat_siblings_and_allowed_packages(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                # Only `from .sibling import name` is copied with a checkpoint.
                assert node.level == 1 and node.module and "." not in node.module, ast.unparse(node)
                assert (CLOSURE / f"{node.module}.py").exists(), ast.unparse(node)
            else:
                assert node.module.split(".")[0] in ALLOWED_TOP_LEVEL | set(sys.stdlib_module_names), ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, ast.unparse(node)


@pytest.mark.parametrize("path", CLOSURE_FILES, ids=lambda path: path.name)
def test_closure_file_names_shadow_no_module(path):
    # Checkpoint folders hold these files flat; a name like `tokenizers.py` would shadow the real
    # package for any script run from inside the folder.
    assert path.stem not in sys.stdlib_module_names
    assert importlib.util.find_spec(path.stem) is None, f"{path.name} shadows an installed module"


def test_no_torchvision_anywhere():
    root = CLOSURE.parents[2]
    for path in [*root.joinpath("src").rglob("*.py"), *root.joinpath("scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(name.split(".")[0] == "torchvision" for name in names), f"{path}: {ast.unparse(node)}"
    code = "import sys, hf_mim, hf_mim.data, hf_mim.training.run_mim; assert 'torchvision' not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_no_file_of_the_remote_code_closure_is_there_for_trainers_only():
    # The closure travels with checkpoints: each file is a config, model or image processor, or one of them imports
    # it. Code that serves only trainers, evaluation or figures (e.g. the codebook metrics) lives outside it.
    from transformers.dynamic_module_utils import get_relative_imports

    files = {path.name: path for path in CLOSURE.glob("*.py") if path.name != "__init__.py"}
    imported = {f"{module}.py" for path in files.values() for module in get_relative_imports(str(path))}
    entry_points = {name for name in files if name.startswith(("configuration_", "modeling_", "image_processing_"))}
    assert set(files) - entry_points - imported == set()
