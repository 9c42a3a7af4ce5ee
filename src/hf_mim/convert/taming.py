"""Convert a taming-transformers Gumbel VQGAN checkpoint (`last.ckpt`) into an `hf_mim_vqgan` checkpoint folder.

mc-BEiT's tokenizer is taming's `vqgan_gumbel_f8` (a PyTorch Lightning `last.ckpt` next to a `model.yaml`). Only
the encoder path is converted: `encoder.*`, `quant_conv.*` and the Gumbel quantiser's projection `quantize.proj.*`
(renamed `codebook_projection.*`); decoder, codebook embedding and loss weights are left out. The architecture is
read off the tensors, so `model.yaml` is not needed.

The file is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and refuses any
other pickled object; there is no fallback to unrestricted unpickling. `.safetensors` files and plain state dicts
(`{name: tensor}`, with or without Lightning's `state_dict` wrapper) are accepted too.
"""

import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.configuration_vqgan import VqganConfig
from ..models.image_processing_vqgan import VqganImageProcessor
from ..models.modeling_vqgan import VqganModel
from ..hub.cards import write_model_card

logger = logging.getLogger(__name__)

# taming name prefix -> VqganModel name prefix, for the parameters the tokenizer needs.
KEPT_PREFIXES = {"encoder.": "encoder.", "quant_conv.": "quant_conv.", "quantize.proj.": "codebook_projection."}


def load_taming_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a taming checkpoint: Lightning's `state_dict` entry, or the whole file if it is a state dict.

    Raises:
        ValueError: if `torch.load(weights_only=True)` refuses the file (it pickles objects other than tensors and
            plain containers), or the file holds no state dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"torch.load(weights_only=True) refused {path}: it pickles objects besides tensors and plain containers "
            "(often Lightning hyper-parameters or callback state). hf_mim never unpickles arbitrary objects. If you "
            "trust the file, extract its weights yourself, e.g. `torch.save(torch.load(path, weights_only=False)"
            "['state_dict'], 'state_dict.pt')`, and convert that file. The refusal was:\n" + str(error)
        ) from error
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not any(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(
            f"{path} holds no state dict (expected a Lightning checkpoint with a 'state_dict' entry, or a "
            f"{{name: tensor}} dict); found {type(loaded).__name__}"
        )
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def convert_taming_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`encoder.*`, `quant_conv.*` and `quantize.proj.*` of a taming GumbelVQ state dict, in [`VqganModel`]'s names."""
    if "quantize.proj.weight" not in state_dict:
        found = "quantize.embedding.weight" in state_dict
        raise ValueError(
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
            raise ValueError(f"The checkpoint has no '{key}'; it is not a taming VQGAN encoder")
    levels = sorted({int(m[1]) for key in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"The checkpoint's encoder levels {levels} are not numbered 0..n-1")
    blocks = {int(m[1]) for key in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    hidden_size = state_dict["encoder.conv_in.weight"].shape[0]
    multipliers = []
    for level in levels:
        width = state_dict[f"encoder.down.{level}.block.0.conv1.weight"].shape[0]
        if width % hidden_size:
            raise ValueError(f"Level {level} is {width} wide, not a multiple of the stem's {hidden_size} channels")
        multipliers.append(width // hidden_size)
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
        ValueError: naming the missing, unexpected or mis-shaped parameters if the checkpoint does not match the
            architecture read off its own tensors.
    """
    state_dict = convert_taming_state_dict(state_dict)
    config = vqgan_config_from_state_dict(state_dict, image_size=image_size)
    with torch.device(device or "cpu"):
        model = VqganModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not match the taming encoder layout read off its tensors: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
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
    model = vqgan_from_taming_state_dict(load_taming_state_dict(checkpoint_path), image_size=image_size)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        size = {"height": image_size, "width": image_size}
        VqganImageProcessor(size=size, crop_size=size).save_pretrained(output_dir)
        write_model_card(output_dir)
    return model


__all__ = [
    "KEPT_PREFIXES",
    "convert_taming_checkpoint",
    "convert_taming_state_dict",
    "load_taming_state_dict",
    "vqgan_config_from_state_dict",
    "vqgan_from_taming_state_dict",
]
