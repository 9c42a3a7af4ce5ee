"""What an hf_mim checkpoint folder holds, besides what `save_pretrained` writes: its one home.

A MIM checkpoint (`hf-mim pretrain`, `hf-mim convert-beit`) keeps the image processor of its tokenizer's view in the
`tokenizer/` subfolder (`TOKENIZER_SUBFOLDER`), next to its own at the root. A folder that is uploaded holds every code
file its `auto_map`s need at the root, where transformers looks for remote code, also for an image processor loaded
from a subfolder (`complete_code_files`); the code comes from `CODE_DIR`, the remote-code closure.
"""

import json
import logging
import shutil
from pathlib import Path

from safetensors import safe_open
from transformers import AutoImageProcessor
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import UsageError, first_line

logger = logging.getLogger(__name__)

TOKENIZER_SUBFOLDER = "tokenizer"
PROCESSOR_CONFIG = "preprocessor_config.json"
# The files that travel with checkpoints (`hf_mim.models`).
CODE_DIR = Path(__file__).resolve().parent / "models"


def save_tokenizer_image_processor(folder, tokenizer_image_processor) -> None:
    """Save the image processor of a MIM checkpoint's tokenizer view into the checkpoint `folder` (saved already),
    with its code at the root, where `trust_remote_code=True` looks for it (`complete_code_files`)."""
    tokenizer_image_processor.save_pretrained(Path(folder) / TOKENIZER_SUBFOLDER)
    complete_code_files(folder)


def load_tokenizer_image_processor(name_or_path: str, **kwargs):
    """The tokenizer view's image processor of the MIM checkpoint `name_or_path` (a folder or Hub id); `kwargs` go
    to `AutoImageProcessor.from_pretrained`."""
    return AutoImageProcessor.from_pretrained(name_or_path, subfolder=TOKENIZER_SUBFOLDER, **kwargs)


def has_tokenizer_image_processor(folder) -> bool:
    return (Path(folder) / TOKENIZER_SUBFOLDER / PROCESSOR_CONFIG).is_file()


def require_tokenizer_image_processor(name_or_path: str, flag: str, fix: str) -> None:
    """A one-line error when the MIM checkpoint folder `name_or_path` (given as `--flag`) lacks its tokenizer view's
    image processor (a Hub id is left to the loader): `fix` says what to pass instead."""
    if Path(name_or_path).is_dir() and not has_tokenizer_image_processor(name_or_path):
        raise UsageError(f"--{flag} {name_or_path} has no {TOKENIZER_SUBFOLDER}/{PROCESSOR_CONFIG}; {fix}")


def checkpoint_weight_names(folder) -> set[str] | None:
    """The names of the tensors in a checkpoint folder's safetensors weights (one file or shards), or None if it has
    none."""
    index = Path(folder) / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    weights = Path(folder) / SAFE_WEIGHTS_NAME
    if not weights.is_file():
        return None
    with safe_open(weights, framework="pt") as file:
        return set(file.keys())


def unreadable_weights(folder) -> tuple[Path, str] | None:
    """The first `*.safetensors` file of `folder` whose header cannot be read (a truncated or corrupt copy), with the
    reason; None when all can be."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            return path, first_line(error)
    return None


def _auto_map_modules(config_path: Path) -> set[str]:
    """Module names the `auto_map` of a config or processor file refers to (code stored in this repo)."""
    if not config_path.is_file():
        return set()
    modules = set()
    for reference in (json.loads(config_path.read_text()).get("auto_map") or {}).values():
        if isinstance(reference, dict):
            references = reference.values()
        elif isinstance(reference, (list, tuple)):
            references = reference
        else:
            references = [reference]
        for ref in references:
            # "other/repo--module.Class" points at code in another repo.
            if ref and "--" not in ref:
                modules.add(ref.rsplit(".", 1)[0])
    return modules


def complete_code_files(folder) -> list[str]:
    """Copy into `folder` every code file its `auto_map`s need that is missing there; returns the copied names.

    transformers loads remote code from the repo root, also for an image processor loaded from a
    subfolder (`subfolder="tokenizer"`), and then follows the files' `from .x import y` imports. A
    missing file is taken from a subfolder that has it, else from the installed hf_mim.
    """
    folder = Path(folder)
    subfolders = [path.parent for path in folder.glob(f"*/{PROCESSOR_CONFIG}")]
    pending = set()
    for config_path in [folder / "config.json", folder / PROCESSOR_CONFIG, *(sub / PROCESSOR_CONFIG for sub in subfolders)]:
        pending |= {f"{module}.py" for module in _auto_map_modules(config_path)}
    seen, copied = set(), []
    while pending:
        name = pending.pop()
        seen.add(name)
        target = folder / name
        if not target.is_file():
            sources = [sub / name for sub in subfolders] + [CODE_DIR / name]
            source = next((path for path in sources if path.is_file()), None)
            if source is None:
                raise FileNotFoundError(
                    f"{folder} needs the code file {name} (named in an auto_map or imported by one) but neither the "
                    "folder nor the installed hf_mim has it; re-save the model with hf_mim installed (save_pretrained)"
                )
            shutil.copyfile(source, target)
            copied.append(name)
        pending |= {f"{module}.py" for module in get_relative_imports(target)} - seen
    if copied:
        logger.info("Added the code files %s to %s", sorted(copied), folder)
    return sorted(copied)


__all__ = [
    "CODE_DIR",
    "PROCESSOR_CONFIG",
    "TOKENIZER_SUBFOLDER",
    "checkpoint_weight_names",
    "complete_code_files",
    "has_tokenizer_image_processor",
    "load_tokenizer_image_processor",
    "require_tokenizer_image_processor",
    "save_tokenizer_image_processor",
    "unreadable_weights",
]
