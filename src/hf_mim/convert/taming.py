"""Convert a taming-transformers Gumbel VQGAN checkpoint (`last.ckpt`) into an `hf_mim_vqgan` checkpoint folder.

mc-BEiT's tokenizer is taming's `vqgan_gumbel_f8` (a PyTorch Lightning `last.ckpt` next to a `model.yaml`). Only
the encoder path is converted: `encoder.*`, `quant_conv.*` and the Gumbel quantiser's projection `quantize.proj.*`
(renamed `codebook_projection.*`); decoder, codebook embedding and loss weights are left out. The architecture is
read off the tensors, so `model.yaml` is not needed.

The file is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and refuses any
other pickled object; there is no fallback to unrestricted unpickling. The released `last.ckpt` was written by
PyTorch Lightning 1.0.x, which keys its callback state by the callback class (`pytorch_lightning.callbacks.
model_checkpoint.ModelCheckpoint`); such Lightning names, and Lightning's `AttributeDict` and `argparse.Namespace`
hyper-parameters, are read as inert stand-ins (`LIGHTNING_SAFE_GLOBALS`), so neither Lightning nor taming is needed
and nothing from the file runs. Only `state_dict` is used. `.safetensors` files and plain state dicts (`{name:
tensor}`, with or without Lightning's `state_dict` wrapper) are accepted too.
"""

import argparse
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..models.configuration_vqgan import VqganConfig
from ..models.image_processing_vqgan import VqganImageProcessor
from ..models.modeling_vqgan import VqganModel
from ..errors import UsageError
from ..hub.cards import write_model_card
from ..safe_loading import stand_in
from ..training.loading import require_output_dir_of
from .common import describe, first_line, load_weights_only, require_file

logger = logging.getLogger(__name__)

# taming name prefix -> VqganModel name prefix, for the parameters the tokenizer needs.
KEPT_PREFIXES = {"encoder.": "encoder.", "quant_conv.": "quant_conv.", "quantize.proj.": "codebook_projection."}


def _dict_stand_in(qualified_name: str) -> type:
    """A class named like a Lightning dict subclass that builds a plain `dict`: the weights-only unpickler fills only
    plain dicts with items."""
    module, name = qualified_name.rsplit(".", 1)

    def __new__(cls, *args, **kwargs):
        return dict(*args, **kwargs)

    return type(name, (), {"__module__": module, "__qualname__": name, "__new__": __new__})


# Callback classes whose state Lightning saves under `callbacks` (versions before 1.5 key it by the class itself).
_LIGHTNING_CALLBACKS = [
    f"{package}.callbacks.{module}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, name in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
        ("progress", "ProgressBar"),
        ("gpu_stats_monitor", "GPUStatsMonitor"),
    )
]
# Lightning's `hparams` container, a dict subclass: read as a plain dict.
_LIGHTNING_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
)
# What `torch.load(weights_only=True)` may build besides tensors and plain containers; each is matched by its
# `__module__` and `__qualname__`, the name the checkpoint pickled.
LIGHTNING_SAFE_GLOBALS = [
    *(stand_in(name) for name in _LIGHTNING_CALLBACKS),
    *(_dict_stand_in(name) for name in _LIGHTNING_DICTS),
    argparse.Namespace,
]
_CHECKPOINT = "a taming last.ckpt, a state dict file or a .safetensors file"


def load_taming_state_dict(path: str | Path, flag: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a taming checkpoint: Lightning's `state_dict` entry, or the whole file if it is a state dict.

    Lightning's callback classes, `AttributeDict` and `argparse.Namespace` are allowed as inert stand-ins (see
    `LIGHTNING_SAFE_GLOBALS`); everything else besides tensors and plain containers is refused unrun.

    Raises:
        UsageError: naming `flag` and the path, if the file is missing, is not a checkpoint, pickles an object outside
            the allow-list, or holds no state dict.
    """
    path = require_file(path, flag, _CHECKPOINT)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise UsageError(f"{flag} {path} is not a readable .safetensors file ({first_line(error)})") from error
    loaded = load_weights_only(
        path,
        flag,
        _CHECKPOINT,
        safe_globals=LIGHTNING_SAFE_GLOBALS,
        allowed="tensors, plain containers, Lightning callback state and AttributeDict/Namespace hyper-parameters",
        weights_key="state_dict",
    )
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not any(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise UsageError(
            f"{flag} {path} holds no state dict (expected a Lightning checkpoint with a 'state_dict' entry, or a "
            f"{{name: tensor}} dict); found {describe(loaded)}"
        )
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def convert_taming_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`encoder.*`, `quant_conv.*` and `quantize.proj.*` of a taming GumbelVQ state dict, in [`VqganModel`]'s names."""
    if "quantize.proj.weight" not in state_dict:
        found = "quantize.embedding.weight" in state_dict
        raise UsageError(
            "The checkpoint has no 'quantize.proj.weight': it is not a taming GumbelVQ model"
            + (" (it is a nearest-neighbour VectorQuantizer VQGAN, which has no code logits)" if found else "")
            + ". mc-BEiT's tokenizer is taming's vqgan_gumbel_f8."
        )
    converted, skipped = {}, set()
    for key, tensor in state_dict.items():
        for prefix, new_prefix in KEPT_PREFIXES.items():
            if key.startswith(prefix):
                converted[new_prefix + key[len(prefix) :]] = tensor
                break
        else:
            skipped.add(key.split(".", 1)[0])
    if skipped:
        logger.info(f"Left out the parts a tokenizer does not use: {', '.join(sorted(skipped))}")
    return converted


def vqgan_config_from_state_dict(state_dict: dict[str, torch.Tensor], image_size: int = 112) -> VqganConfig:
    """The [`VqganConfig`] of a converted state dict (see [`convert_taming_state_dict`]), read off the tensors.

    GroupNorm groups and epsilon are not stored in a checkpoint; taming always uses 32 and 1e-6 (the defaults).
    """
    for key in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "codebook_projection.weight"):
        if key not in state_dict:
            raise UsageError(f"The checkpoint has no '{key}'; it is not a taming VQGAN encoder")
    levels = sorted({int(m[1]) for key in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    if levels != list(range(len(levels))) or not levels:
        raise UsageError(f"The checkpoint's encoder levels {levels} are not numbered 0..n-1; it is not a taming VQGAN")
    blocks = {int(m[1]) for key in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    hidden_size = state_dict["encoder.conv_in.weight"].shape[0]
    multipliers = []
    for level in levels:
        key = f"encoder.down.{level}.block.0.conv1.weight"
        if key not in state_dict:
            raise UsageError(f"The checkpoint has no '{key}'; it is not a taming VQGAN encoder")
        width = state_dict[key].shape[0]
        if width % hidden_size:
            raise UsageError(f"Level {level} is {width} wide, not a multiple of the stem's {hidden_size} channels")
        multipliers.append(width // hidden_size)
    try:
        return VqganConfig(
            image_size=image_size,
            num_channels=state_dict["encoder.conv_in.weight"].shape[1],
            codebook_size=state_dict["codebook_projection.weight"].shape[0],
            hidden_size=hidden_size,
            channel_multipliers=multipliers,
            num_res_blocks=len(blocks),
            attention_levels=[level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in state_dict],
            z_channels=state_dict["encoder.conv_out.weight"].shape[0],
            embed_dim=state_dict["quant_conv.weight"].shape[0],
        )
    except ValueError as error:
        # Sizes come from the file except the view: name --image_size when it is the culprit.
        culprit = f"--image_size {image_size}" if "image_size" in str(error) else "the checkpoint's layout"
        raise UsageError(f"{culprit}: {error}") from error


def vqgan_from_taming_state_dict(
    state_dict: dict[str, torch.Tensor], image_size: int = 112, device: str | torch.device | None = None
) -> VqganModel:
    """A [`VqganModel`] in eval mode holding the encoder weights of a taming GumbelVQ state dict.

    Args:
        state_dict: taming's names (`encoder.down.0.block.0.conv1.weight`, `quantize.proj.weight`, ...); parts a
            tokenizer does not use (decoder, loss, codebook embedding) are left out.
        image_size: side of the tokenizer view (112 gives mc-BEiT's 14x14 grid with an f=8 VQGAN).
        device: where to build the model; `"meta"` checks names and shapes without allocating the weights.

    Raises:
        UsageError: naming the missing, unexpected or mis-shaped parameters if the checkpoint does not match the
            architecture read off its own tensors (it is not a taming GumbelVQ), or a bad `image_size`.
    """
    state_dict = convert_taming_state_dict(state_dict)
    config = vqgan_config_from_state_dict(state_dict, image_size=image_size)
    with torch.device(device or "cpu"):
        model = VqganModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"The checkpoint does not match the taming encoder layout read off its tensors: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UsageError(
                f"Shape mismatch for {key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
            )
    weights = {key: tensor.to(device=expected[key].device, dtype=torch.float32) for key, tensor in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def convert_taming_checkpoint(
    checkpoint_path: str | Path, output_dir: str | Path | None = None, image_size: int = 112
) -> VqganModel:
    """Build a [`VqganModel`] from a taming GumbelVQ checkpoint (`last.ckpt`, a state dict, or `.safetensors`).

    Args:
        checkpoint_path: the checkpoint file.
        output_dir: when given, the model (safetensors + config) and a [`VqganImageProcessor`] are saved there.
        image_size: side of the tokenizer view (112 gives mc-BEiT's 14x14 grid with an f=8 VQGAN).
    """
    state_dict = load_taming_state_dict(checkpoint_path)
    try:
        model = vqgan_from_taming_state_dict(state_dict, image_size=image_size)
    except UsageError as error:
        if str(error).startswith("--"):  # already names its flag (--image_size)
            raise
        raise UsageError(f"--checkpoint {checkpoint_path}: {error}") from error
    if output_dir is not None:
        require_output_dir_of(output_dir, model.config.model_type)
        model.save_pretrained(output_dir)
        VqganImageProcessor.for_config(model.config).save_pretrained(output_dir)
        write_model_card(output_dir)
    return model


__all__ = [
    "KEPT_PREFIXES",
    "LIGHTNING_SAFE_GLOBALS",
    "convert_taming_checkpoint",
    "convert_taming_state_dict",
    "load_taming_state_dict",
    "vqgan_config_from_state_dict",
    "vqgan_from_taming_state_dict",
]
