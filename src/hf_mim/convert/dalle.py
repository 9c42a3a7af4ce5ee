"""Convert OpenAI's DALL-E dVAE (`encoder.pkl`, `decoder.pkl`) into an `hf_mim_dvae` checkpoint folder.

The released files are `torch.save`s of whole `dall_e.encoder.Encoder` / `dall_e.decoder.Decoder` modules, so
loading them normally needs the `dall_e` package and executes whatever the pickle asks for. Here they are read
with a restricted unpickler instead: every global the pickle names must be on an explicit allow-list; the
DALL-E and `torch.nn` classes become inert records of their pickled state, tensors are rebuilt without their
hooks, and anything else is refused before it is called. The `dall_e` package is not needed.
"""

import logging
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import UsageError
from ..models.configuration_dvae import DvaeConfig
from ..models.image_processing_dvae import DvaeImageProcessor
from ..models.modeling_dvae import DvaeModel
from ..hub.cards import write_model_card
from ..safe_loading import UNREADABLE_FILE_ERRORS, StandIn, load_restricted, stand_in
from ..training.loading import require_output_dir_of
from .common import first_line, require_file

logger = logging.getLogger(__name__)


class ForbiddenGlobalError(UsageError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing it names was imported or called.

    A [`UsageError`] (the user named a file that is not OpenAI's) and a `pickle.UnpicklingError`."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Hooks and metadata would attach pickled callables to the tensor; the weights are all we need.
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_STAND_IN_NAMES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.device",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
)

# (module, name) -> the object used instead. Storage classes (`torch.FloatStorage`) are resolved by torch.load
# itself before the unpickler is asked.
ALLOWED_GLOBALS = {
    **{tuple(name.rsplit(".", 1)): stand_in(name) for name in _STAND_IN_NAMES},
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _allowed_global(module: str, name: str):
    """What `ALLOWED_GLOBALS` puts where the pickle names `module.name`; a [`ForbiddenGlobalError`] for anything else."""
    try:
        return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
        raise ForbiddenGlobalError(
            f"Refusing to unpickle the global '{module}.{name}': a DALL-E dVAE checkpoint only references the "
            "dall_e Encoder/Decoder classes, torch.nn containers, torch tensor rebuilding and plain containers. "
            "The file is not an OpenAI encoder.pkl/decoder.pkl (or was modified); nothing from it was executed."
        ) from None


# The flag and file name of each pickled module, for the errors.
_FLAGS = {
    "dall_e.encoder.Encoder": ("--encoder", "encoder.pkl"),
    "dall_e.decoder.Decoder": ("--decoder", "decoder.pkl"),
}


def load_dalle_state_dict(path: str | Path, expected_class: str) -> tuple[dict[str, torch.Tensor], set[float]]:
    """The `w`/`b` parameters of a pickled DALL-E module, keyed as its `state_dict()` would be, and the residual
    gains (`post_gain`) its blocks recorded. A plain state dict is accepted too (no gains then).

    Raises:
        UsageError: naming the flag and path, when the file is missing, is not a pickle, holds another object than
            `expected_class`, or (`ForbiddenGlobalError`) names a global outside the allow-list (nothing is run).
    """
    flag, name = _FLAGS.get(expected_class, ("--encoder", "encoder.pkl"))
    what = f"OpenAI's {name} (https://cdn.openai.com/dall-e/{name})"
    path = require_file(path, flag, what)
    try:
        with warnings.catch_warnings():
            # The legacy format compares each module class's source with the pickled one; stand-ins have none.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            loaded = load_restricted(path, _allowed_global)
    except ForbiddenGlobalError as error:
        raise ForbiddenGlobalError(f"{flag} {path}: {error}") from None
    except (pickle.UnpicklingError, *UNREADABLE_FILE_ERRORS) as error:
        raise UsageError(f"{flag} {path} is not a readable pickle ({first_line(error)}); pass {what}") from error
    if isinstance(loaded, dict) and loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return dict(loaded), set()
    if not isinstance(loaded, StandIn) or loaded.qualified_name != expected_class:
        found = loaded.qualified_name if isinstance(loaded, StandIn) else type(loaded).__name__
        raise UsageError(
            f"{flag} {path} holds a {found}, not a pickled {expected_class}; pass encoder.pkl as --encoder and "
            "decoder.pkl as --decoder"
        )

    parameters, post_gains = {}, set()

    def collect(node: StandIn, prefix: str) -> None:
        state = getattr(node, "state", {})
        if "post_gain" in state:
            post_gains.add(state["post_gain"])
        for name, tensor in state.get("_parameters", {}).items():
            if tensor is not None:
                parameters[prefix + name] = tensor
        for name, child in state.get("_modules", {}).items():
            if isinstance(child, StandIn):
                collect(child, f"{prefix}{name}.")

    collect(loaded, "")
    return parameters, post_gains


# DALL-E module paths (without the trailing `.w`/`.b`) -> DvaeModel submodule paths (without `encoder.`/`decoder.`).
_KEY_PATTERNS = (
    (re.compile(r"blocks\.input"), lambda m: "input_conv"),
    (re.compile(r"blocks\.output\.conv"), lambda m: "output_conv"),
    (
        re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.id_path"),
        lambda m: f"groups.{int(m[1]) - 1}.{int(m[2]) - 1}.id_path",
    ),
    (
        re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.res_path\.conv_(\d)"),
        lambda m: f"groups.{int(m[1]) - 1}.{int(m[2]) - 1}.conv_{m[3]}",
    ),
)
_PARAMETER_NAMES = {"w": "weight", "b": "bias"}


def rename_dalle_keys(parameters: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """DALL-E names (`blocks.group_1.block_1.res_path.conv_1.w`) -> ours (`encoder.groups.0.0.conv_1.weight`)."""
    renamed = {}
    for key, tensor in parameters.items():
        module_path, _, parameter = key.rpartition(".")
        for pattern, rename in _KEY_PATTERNS:
            match = pattern.fullmatch(module_path)
            if match and parameter in _PARAMETER_NAMES:
                renamed[f"{prefix}.{rename(match)}.{_PARAMETER_NAMES[parameter]}"] = tensor
                break
        else:
            raise UsageError(f"Unexpected parameter '{key}' in a DALL-E checkpoint; cannot map it to DvaeModel")
    return renamed


def _architecture(parameters: dict[str, torch.Tensor], what: str) -> dict:
    """Group count, blocks per group and the input/output conv shapes, read off the tensors."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in parameters:
            raise UsageError(f"The DALL-E {what} checkpoint has no '{key}'; is it an {what}.pkl?")
    groups = {int(m[1]) for key in parameters if (m := re.match(r"blocks\.group_(\d+)\.", key))}
    blocks = {int(m[1]) for key in parameters if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", key))}
    return {
        "num_groups": len(groups),
        "num_blocks_per_group": len(blocks),
        "input_shape": tuple(parameters["blocks.input.w"].shape),
        "output_shape": tuple(parameters["blocks.output.conv.w"].shape),
    }


def _read_module(path: str | Path, expected_class: str) -> tuple[dict, set, dict, dict]:
    """Parameters, residual gains, architecture and renamed state dict of `encoder.pkl` or `decoder.pkl`; a layout
    error names the flag and path."""
    parameters, gains = load_dalle_state_dict(path, expected_class)
    flag, name = _FLAGS[expected_class]
    what = name.removesuffix(".pkl")
    try:
        return parameters, gains, _architecture(parameters, what), rename_dalle_keys(parameters, what)
    except UsageError as error:
        raise UsageError(f"{flag} {path}: {error}") from error


def convert_dalle_checkpoint(
    encoder_path: str | Path,
    decoder_path: str | Path | None = None,
    output_dir: str | Path | None = None,
    image_size: int = 112,
) -> DvaeModel:
    """Build a [`DvaeModel`] from OpenAI's `encoder.pkl` (and optionally `decoder.pkl`).

    Args:
        encoder_path: the pickled `dall_e.encoder.Encoder` (or its `state_dict()`).
        decoder_path: the pickled `dall_e.decoder.Decoder`; without it the model is built without a decoder
            and `decode()` raises.
        output_dir: when given, the model (safetensors + config) and a [`DvaeImageProcessor`] are saved there.
        image_size: side of the tokenizer view (112 gives BEiT's 14x14 grid; the dVAE itself is size-agnostic).
    """
    encoder_parameters, post_gains, encoder_shape, state_dict = _read_module(encoder_path, "dall_e.encoder.Encoder")
    hidden_size, num_channels = encoder_shape["input_shape"][:2]
    config_kwargs = {
        "image_size": image_size,
        "num_channels": num_channels,
        "codebook_size": encoder_shape["output_shape"][0],
        "hidden_size": hidden_size,
        "num_groups": encoder_shape["num_groups"],
        "num_blocks_per_group": encoder_shape["num_blocks_per_group"],
    }

    if decoder_path is not None:
        _, decoder_gains, decoder_shape, decoder_state_dict = _read_module(decoder_path, "dall_e.decoder.Decoder")
        decoder_hidden_size, codebook_size = decoder_shape["input_shape"][:2]
        decoder_view = {
            "codebook_size": codebook_size,
            "num_channels": decoder_shape["output_shape"][0] // 2,
            "hidden_size": decoder_shape["output_shape"][1],
            "num_groups": decoder_shape["num_groups"],
            "num_blocks_per_group": decoder_shape["num_blocks_per_group"],
        }
        mismatched = {k: (config_kwargs[k], v) for k, v in decoder_view.items() if config_kwargs[k] != v}
        if mismatched:
            raise UsageError(
                f"--encoder {encoder_path} and --decoder {decoder_path} do not belong together; (encoder, decoder) "
                f"values: {mismatched}"
            )
        config_kwargs["decoder_hidden_size"] = decoder_hidden_size
        state_dict.update(decoder_state_dict)
        post_gains |= decoder_gains

    # Without decoder.pkl there is no decoder to convert: a random one would decode to noise without a word.
    try:
        config = DvaeConfig(**config_kwargs, with_decoder=decoder_path is not None)
    except ValueError as error:
        culprit = f"--image_size {image_size}" if "image_size" in str(error) else f"--encoder {encoder_path}"
        raise UsageError(f"{culprit}: {error}") from error
    expected_gain = 1.0 / (config.num_groups * config.num_blocks_per_group) ** 2
    if any(abs(gain - expected_gain) > 1e-12 for gain in post_gains):
        raise UsageError(
            f"--encoder {encoder_path}: the checkpoint's residual gains {sorted(post_gains)} differ from "
            f"1/(groups*blocks)^2 = {expected_gain}; "
            "DvaeModel cannot represent this architecture"
        )
    model = DvaeModel(config)
    expected = model.state_dict()
    if decoder_path is None:
        logger.warning("No decoder checkpoint given: the tokenizer is converted without a decoder (it cannot decode).")
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            flag, path = ("--decoder", decoder_path) if key.startswith("decoder.") else ("--encoder", encoder_path)
            raise UsageError(
                f"{flag} {path}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)} vs model "
                f"{tuple(expected[key].shape)}; "
                "the checkpoint's layout differs from the DALL-E architecture"
            )
    model.load_state_dict({key: tensor.float() for key, tensor in state_dict.items()}, strict=True)
    model.eval()
    if output_dir is not None:
        require_output_dir_of(output_dir, config.model_type)
        model.save_pretrained(output_dir)
        DvaeImageProcessor.for_config(config).save_pretrained(output_dir)
        write_model_card(output_dir)
    return model


__all__ = [
    "ALLOWED_GLOBALS",
    "ForbiddenGlobalError",
    "convert_dalle_checkpoint",
    "load_dalle_state_dict",
    "rename_dalle_keys",
]
