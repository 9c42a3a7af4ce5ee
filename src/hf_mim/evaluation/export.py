"""Export a pretrained hf_mim encoder as a stock transformers BEiT checkpoint.

hf_mim encoders are transformers' `BeitModel` under an `hf_mim_*` model type, so exporting is a matter of
writing a plain `BeitConfig` (no `auto_map`, no code files) with the same weights. The result loads with
`BeitModel`, `BeitForImageClassification`, `BeitBackbone` and `pipeline("image-feature-extraction")` and
needs neither hf_mim nor `trust_remote_code`.

Two choices the export makes explicit:

- `pooling`: `"mean"` (BEiT's fine-tuning recipe: `use_mean_pooling=True`, the pooled patch tokens go
  through `pooler.layernorm`, unilm's `fc_norm`) or `"cls"` (`use_mean_pooling=False`: the MIM head's
  final LayerNorm becomes `beit.layernorm` and the pooler returns the [CLS] token, e.g. for BEiT v2's
  patch-aggregation [CLS]). A LayerNorm that the source does not have is written as the identity
  (weight 1, bias 0), which is how the reference fine-tuning code initialises `fc_norm`; so nothing is
  missing when a task model loads the checkpoint, and only its head is new.
- `per_layer_relative_position_bias`: pre-training shares one relative position bias table across
  layers; BEiT fine-tuning gives every layer its own table, initialised as a copy of the shared one
  (unilm `run_class_finetuning.py`). Both give identical outputs at the pre-training resolution.

A new `image_size` (fine-tuning at 384 px from 224 px pre-training) resizes the relative position bias tables
as BEiT's fine-tuning code does when it grows them: the learnt offsets are spread over the larger offset range
with geometrically growing gaps, so offsets 0 and +-1 keep their values and the extreme offsets land on the new
extremes, and the table is read from the bicubic spline through them (unilm's `interp2d(kind="cubic")`). The three
[CLS] entries are copied. The image processor's sizes scale with it.

The mask token is left out: it only exists for pre-training, and an unused parameter in a fine-tuned
model breaks DistributedDataParallel.
"""

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskedImageModeling,
    BeitConfig,
    BeitImageProcessorPil,
    BeitModel,
)

from ..arguments import command_parser
from ..checkpoint_folder import PROCESSOR_CONFIG, TOKENIZER_SUBFOLDER
from ..cli import one_process
from ..errors import UsageError
from ..families import TOKENIZERS
from ..models.image_processing_mim import MimImageProcessor
from ..training.loading import pretrained, require_new_output_dir, require_output_dir_of

# What the exported `BeitModel`'s pooler returns (its `use_mean_pooling`): see `pooling` in the module docstring.
BEIT_POOLERS = ("mean", "cls")

# Config entries that describe an hf_mim checkpoint rather than the encoder architecture.
_NON_ARCHITECTURE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")

# Preprocessing fields shared by MimImageProcessor and transformers' BeitImageProcessor.
_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def resolve_encoder(model: nn.Module) -> BeitModel:
    """The `BeitModel` inside an hf_mim MIM model, an hf_mim encoder, or any transformers BEiT model."""
    if isinstance(model, BeitModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, BeitModel):
        return base
    raise TypeError(
        f"Expected a BEiT encoder (an hf_mim MIM model, its AutoModel encoder, or a transformers BeitModel / "
        f"BeitFor* model), got {type(model).__name__}"
    )


# Why `final_layer_norm` can be None.
NO_FINAL_NORM = "has no LayerNorm after its last block (a mean-pooling encoder normalises in its pooler instead)"


def final_layer_norm(model: nn.Module, encoder: BeitModel) -> nn.LayerNorm | None:
    """The LayerNorm that follows the last layer: the encoder's own, else the MIM head's (`layernorm`)."""
    if isinstance(encoder.layernorm, nn.LayerNorm):
        return encoder.layernorm
    head_norm = getattr(model, "layernorm", None) if model is not encoder else None
    return head_norm if isinstance(head_norm, nn.LayerNorm) else None


def load_pretrained_beit(model_name_or_path: str, **kwargs) -> nn.Module:
    """Load a checkpoint with the class that keeps its final LayerNorm: the MIM model for MIM checkpoints.

    Works for hf_mim MIM checkpoints (their final norm sits in the MIM head), hf_mim encoders, and stock
    transformers BEiT checkpoints of any head. `kwargs` go to `from_pretrained` (revision, token, ...). A path or
    Hub id that does not load, or a checkpoint of another kind (a tokenizer, a ViT), is a `UsageError` naming
    `--model_name_or_path`, raised from the config before any weight is read.
    """
    flag = "model_name_or_path"
    parent = os.path.dirname(os.path.normpath(model_name_or_path)) or "."
    if (
        os.path.basename(os.path.normpath(model_name_or_path)) == TOKENIZER_SUBFOLDER
        and not os.path.isfile(os.path.join(model_name_or_path, "config.json"))
        and os.path.isfile(os.path.join(parent, "config.json"))
    ):
        # transformers would only say the folder has no model_type.
        raise UsageError(
            f"--{flag} {model_name_or_path} holds only the tokenizer view of the MIM checkpoint {parent}; pass {parent}"
        )
    config = pretrained(AutoConfig.from_pretrained, model_name_or_path, flag, **kwargs)
    # Every BEiT encoder's config, hf_mim's MIM families included, is a BeitConfig.
    if not isinstance(config, BeitConfig):
        kind = " (a visual tokenizer)" if hasattr(config, "codebook_size") else ""
        raise UsageError(
            f"--{flag} {model_name_or_path} holds a {config.model_type} model{kind}, not a BEiT encoder; pass an "
            "hf_mim MIM checkpoint (the output_dir of `hf-mim pretrain`), its encoder, or a transformers BEiT checkpoint"
        )
    architecture = (config.architectures or [""])[0]
    if config.model_type == "beit":
        # transformers keeps BEiT out of AutoModelForMaskedImageModeling (its head predicts tokens, not pixels).
        model_class = transformers.BeitForMaskedImageModeling if architecture == "BeitForMaskedImageModeling" else AutoModel
    elif architecture.endswith("ForMaskedImageModeling"):
        model_class = AutoModelForMaskedImageModeling
    else:
        model_class = AutoModel
    return pretrained(model_class.from_pretrained, model_name_or_path, flag, config=config, **kwargs)


def load_image_processor(model_name_or_path: str, image_processor_name: str | None = None, **kwargs):
    """The image processor of `--image_processor_name`, else the one saved with `--model_name_or_path`, with a
    one-line `UsageError` naming the flag when it does not load; `kwargs` go to `from_pretrained`."""
    if image_processor_name is not None:
        processor = pretrained(AutoImageProcessor.from_pretrained, image_processor_name, "image_processor_name", **kwargs)
        tokenizers = (family for family in TOKENIZERS.values() if type(processor) is family.image_processor_class)
        tokenizer = next(tokenizers, None)
        if tokenizer is not None:
            # Its view is the tokenizer's (e.g. unnormalised [0, 1] pixels): the encoder would read other inputs.
            raise UsageError(
                f"--image_processor_name {image_processor_name} is the view of a {tokenizer.title} tokenizer "
                f"({type(processor).__name__}), not of a ViT encoder; pass the processor the encoder was trained with "
                "(by default its checkpoint's own)"
            )
        return processor
    if os.path.isdir(model_name_or_path) and not os.path.isfile(os.path.join(model_name_or_path, PROCESSOR_CONFIG)):
        raise UsageError(
            f"--model_name_or_path {model_name_or_path} has no {PROCESSOR_CONFIG}; pass the processor the encoder "
            "was trained with as --image_processor_name"
        )
    return pretrained(AutoImageProcessor.from_pretrained, model_name_or_path, "model_name_or_path", **kwargs)


def check_processor_size(
    processor,
    image_size: int,
    model_name_or_path: str,
    image_processor_name: str | None = None,
    processor_flag: str = "image_processor_name",
    reader: str = "the model",
):
    """A one-line error naming the flag that gave `processor` (`--<processor_flag>`, else `--model_name_or_path`)
    when it produces other than the `image_size` square images `reader` takes (a processor without `output_size`,
    such as a stock one, is not checked)."""
    size = getattr(processor, "output_size", None)
    if size is None or tuple(size) == (image_size, image_size):
        return
    flag, name = (
        (processor_flag, image_processor_name) if image_processor_name else ("model_name_or_path", model_name_or_path)
    )
    raise UsageError(
        f"--{flag} {name} gives {size[0]}x{size[1]} images but {reader} takes {image_size}x{image_size}; pass an "
        f"image processor of that size"
    )


def beit_config_for_export(
    config, pooling: str = "mean", per_layer_relative_position_bias: bool = False, **overrides
) -> BeitConfig:
    """A plain `BeitConfig` with the architecture of `config` (an hf_mim or transformers BEiT config).

    Args:
        config: The source encoder's config.
        pooling: `"mean"` or `"cls"`, see the module docstring.
        per_layer_relative_position_bias: Give each layer its own relative position bias table instead of a
            shared one (for fine-tuning).
        overrides: Further `BeitConfig` fields, e.g. `num_labels`, `drop_path_rate`.
    """
    if pooling not in BEIT_POOLERS:
        raise ValueError(f"pooling must be one of {BEIT_POOLERS}, got {pooling!r}")
    source = config.to_dict()
    fields = {key: source[key] for key in BeitConfig().to_dict() if key in source and key not in _NON_ARCHITECTURE_KEYS}
    uses_relative_bias = config.use_shared_relative_position_bias or config.use_relative_position_bias
    fields.update(
        use_mask_token=False,
        use_mean_pooling=pooling == "mean",
        use_shared_relative_position_bias=config.use_shared_relative_position_bias and not per_layer_relative_position_bias,
        use_relative_position_bias=config.use_relative_position_bias or (per_layer_relative_position_bias and uses_relative_bias),
        architectures=["BeitModel"],
    )
    fields.update(overrides)
    return BeitConfig(**fields)


def _identity_layer_norm(prefix: str, hidden_size: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.ones(hidden_size, dtype=like.dtype), f"{prefix}.bias": torch.zeros(hidden_size, dtype=like.dtype)}


def _image_sides(config) -> tuple[int, int]:
    size = config.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _window(config) -> tuple[int, int]:
    height, width = _image_sides(config)
    return height // config.patch_size, width // config.patch_size


def geometric_offset_positions(source_radius: int, target_radius: int) -> np.ndarray:
    """Where the learnt offsets `-n..n` (`n = source_radius`) sit on the axis of offsets `-t..t` (`t = target_radius`).

    Growing (BEiT's `run_class_finetuning.py`): offsets 0 and +-1 stay in place and the gap after offset i is
    `q**i`, with `q` chosen so that offset n lands on t; nearby offsets, which matter most, keep their learnt
    biases. Shrinking, or a source with a single offset per side, scales the positions uniformly.
    """
    offsets = np.arange(-source_radius, source_radius + 1, dtype=np.float64)
    if target_radius == source_radius or source_radius == 0:
        return offsets
    if target_radius < source_radius or source_radius == 1:
        return offsets * target_radius / source_radius
    low, high = 1.0, float(target_radius)  # 1 + q + ... + q**(n-1) is n < t at q = 1 and >= t at q = t
    for _ in range(100):
        q = (low + high) / 2
        low, high = (q, high) if np.sum(q ** np.arange(source_radius)) < target_radius else (low, q)
    gaps = q ** np.arange(source_radius)
    positive = np.cumsum(gaps)
    return np.concatenate([-positive[::-1], [0.0], positive])


def _cubic_spline_matrix(positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`(len(targets), len(positions))` weights evaluating, at `targets`, the not-a-knot cubic spline through values
    at `positions`: the interpolant of unilm's `interp2d(..., kind="cubic")` (FITPACK's interpolating spline) along
    one axis. With fewer than four positions the spline is the polynomial through them."""
    count = len(positions)
    values = np.eye(count)
    if count < 4:
        return np.vander(targets, count) @ np.linalg.solve(np.vander(positions, count), values)
    # Second derivatives at the positions (one column per unit value): continuity of the first derivative inside,
    # a continuous third derivative at the second and second-to-last positions (not-a-knot).
    gaps = np.diff(positions)
    system, right_side = np.zeros((count, count)), np.zeros((count, count))
    for i in range(1, count - 1):
        system[i, i - 1 : i + 2] = gaps[i - 1], 2 * (gaps[i - 1] + gaps[i]), gaps[i]
        right_side[i, i - 1 : i + 2] = 6 / gaps[i - 1], -6 / gaps[i - 1] - 6 / gaps[i], 6 / gaps[i]
    system[0, :3] = gaps[1], -(gaps[0] + gaps[1]), gaps[0]
    system[-1, -3:] = gaps[-1], -(gaps[-2] + gaps[-1]), gaps[-2]
    curvatures = np.linalg.solve(system, right_side)
    left = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, count - 2)
    width = gaps[left]
    after = (targets - positions[left]) / width
    before = 1 - after
    return (
        before[:, None] * values[left]
        + after[:, None] * values[left + 1]
        + ((before**3 - before) * width**2 / 6)[:, None] * curvatures[left]
        + ((after**3 - after) * width**2 / 6)[:, None] * curvatures[left + 1]
    )


def _axis_matrix(old: int, new: int) -> torch.Tensor:
    """`(2 new - 1, 2 old - 1)` weights taking one axis of a table from an `old`-patch grid's offsets to a `new` one's."""
    if new == 1:  # a single patch has only offset 0, which keeps its learnt value
        return torch.from_numpy(np.eye(2 * old - 1)[old - 1 : old])
    positions = geometric_offset_positions(old - 1, new - 1)
    return torch.from_numpy(_cubic_spline_matrix(positions, np.arange(1 - new, new, dtype=np.float64)))


def resize_relative_position_bias_table(
    table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """A relative position bias table `((2H-1)(2W-1) + 3, heads)` of an `old_window` patch grid, for `new_window`.

    The learnt offsets sit at `geometric_offset_positions` on each axis and the new offsets are read from the bicubic
    spline through them, as unilm's fine-tuning code does; the last three rows ([CLS] to patch, patch to [CLS],
    [CLS] to [CLS]) do not depend on the grid and are copied.
    """
    old_height, old_width = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    if table.shape[0] != old_height * old_width + 3:
        raise ValueError(
            f"A relative position bias table of a {old_window[0]}x{old_window[1]} patch grid has "
            f"{old_height * old_width + 3} rows, got {table.shape[0]}"
        )
    if tuple(old_window) == tuple(new_window):
        return table.clone()
    rows, columns = (_axis_matrix(old, new).to(table.device) for old, new in zip(old_window, new_window))
    grid = table[:-3].T.reshape(-1, old_height, old_width).double()
    resized = rows @ grid @ columns.T
    resized = resized.reshape(resized.shape[0], -1).T.to(table.dtype)
    return torch.cat([resized, table[-3:]])


def export_state_dict(model: nn.Module, config: BeitConfig) -> dict[str, torch.Tensor]:
    """The weights of `model`'s encoder under stock `BeitModel(config, add_pooling_layer=True)` names; relative
    position bias tables are resized when `config` has another patch grid than the encoder."""
    encoder = resolve_encoder(model)
    if any(side <= 0 or side % config.patch_size for side in _image_sides(config)):
        raise ValueError(
            f"image_size {config.image_size} must be a positive multiple of the patch size {config.patch_size} "
            "(the patch embedding would drop the remainder)"
        )
    if config.patch_size != encoder.config.patch_size:
        raise ValueError(
            f"Cannot export patch size {encoder.config.patch_size} as {config.patch_size}: the patch embedding "
            "weights depend on it (change image_size instead)"
        )
    old_window, new_window = _window(encoder.config), _window(config)
    source = {name: tensor.detach().cpu() for name, tensor in encoder.state_dict().items()}
    for name, tensor in source.items():
        if name.endswith("relative_position_bias_table"):
            source[name] = resize_relative_position_bias_table(tensor, old_window, new_window)
    if "embeddings.position_embeddings" in source and old_window != new_window:
        raise ValueError(
            "This encoder has absolute position embeddings; exporting it at another image_size is not supported "
            "(BEiT's relative position bias is what resizes)"
        )
    like = source["embeddings.cls_token"]
    state = {
        name: tensor
        for name, tensor in source.items()
        if not name.startswith(("embeddings.mask_token", "layernorm.", "pooler.", "shared_position_bias."))
    }

    shared_key = "shared_position_bias.relative_position_bias_table"
    if shared_key in source and not config.use_shared_relative_position_bias:
        for index in range(config.num_hidden_layers):
            key = f"layers.{index}.relative_position_bias.relative_position_bias_table"
            # Both tables add to the same attention logits, so a layer that had its own keeps their sum.
            state[key] = source[shared_key].clone() + (source[key] if key in source else 0)
    elif shared_key in source:
        state[shared_key] = source[shared_key]

    hidden_size = config.hidden_size
    if config.use_mean_pooling:
        pooler = getattr(encoder.pooler, "layernorm", None) if encoder.pooler is not None else None
        if isinstance(pooler, nn.LayerNorm):
            state.update({f"pooler.layernorm.{key}": value.detach().cpu() for key, value in pooler.state_dict().items()})
        else:
            state.update(_identity_layer_norm("pooler.layernorm", hidden_size, like))
    else:
        norm = final_layer_norm(model, encoder)
        if norm is not None:
            state.update({f"layernorm.{key}": value.detach().cpu() for key, value in norm.state_dict().items()})
        else:
            state.update(_identity_layer_norm("layernorm", hidden_size, like))
    return state


def to_transformers_beit(
    model_or_path: nn.Module | str,
    pooling: str = "mean",
    per_layer_relative_position_bias: bool = False,
    **config_overrides,
) -> BeitModel:
    """A stock transformers `BeitModel` (with its pooler) holding the encoder weights of `model_or_path`.

    Args:
        model_or_path: An hf_mim MIM model or encoder, a transformers BEiT model, or a checkpoint folder / Hub id
            of any of these.
        pooling, per_layer_relative_position_bias, config_overrides: See [`beit_config_for_export`].
    """
    model = load_pretrained_beit(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    encoder = resolve_encoder(model)
    config = beit_config_for_export(encoder.config, pooling, per_layer_relative_position_bias, **config_overrides)
    state = export_state_dict(model, config)
    with torch.device("meta"):
        exported = BeitModel(config, add_pooling_layer=True)
    # strict=True: a missing or extra key here would silently leave a weight at its initial value downstream.
    exported.load_state_dict(state, strict=True, assign=True)
    return exported.eval()


def to_beit_image_processor(image_processor) -> BeitImageProcessorPil:
    """transformers' `BeitImageProcessor` (PIL backend) doing the same preprocessing as `image_processor`."""
    return BeitImageProcessorPil(**{name: getattr(image_processor, name) for name in _PROCESSOR_FIELDS})


def normalizes_inside(config) -> bool:
    """Whether a MIM model of `config` takes raw [0, 1] pixels and normalises them itself, with the `image_mean` /
    `image_std` its config carries (CCViT: centroid replacement works on pixels, before normalisation)."""
    return getattr(config, "image_mean", None) is not None and getattr(config, "image_std", None) is not None


def encoder_image_processor(image_processor, config) -> MimImageProcessor:
    """A `MimImageProcessor` producing what the encoder of `config` consumes, from the checkpoint's `image_processor`
    (an hf_mim processor or a stock one such as transformers' `BeitImageProcessor`).

    Encoders whose MIM model normalises its input itself carry that normalisation in their config as `image_mean` /
    `image_std` (CCViT, which replaces patches by centroid pixels in [0, 1] before normalising); a raw [0, 1]
    processor is completed with it, so the encoder never sees unnormalised pixels.
    """
    fields = {name: getattr(image_processor, name) for name in _PROCESSOR_FIELDS if getattr(image_processor, name, None) is not None}
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    normalized_inside = normalizes_inside(config)
    if normalized_inside and fields.get("do_normalize"):
        if not (np.allclose(fields["image_mean"], mean) and np.allclose(fields["image_std"], std)):
            raise ValueError(
                f"The image processor normalises with mean {list(fields['image_mean'])} / std {list(fields['image_std'])} "
                f"but the encoder was trained on inputs normalised with mean {list(mean)} / std {list(std)} (its config); "
                "use the checkpoint's own image processor"
            )
    elif normalized_inside:
        fields.update(do_normalize=True, image_mean=list(mean), image_std=list(std))
    elif isinstance(image_processor, MimImageProcessor):
        return image_processor
    return MimImageProcessor(**fields)


def image_processor_at_size(image_processor: MimImageProcessor, image_size: int) -> MimImageProcessor:
    """`image_processor` producing `image_size` square images, its resize scaled by the same factor (so a
    resize-then-crop view keeps its crop fraction)."""
    height, width = image_processor.output_size
    if height != width:
        raise ValueError(f"Expected a processor of square images to rescale, got {height}x{width}")
    fields = image_processor.to_dict()
    scale = image_size / height
    for name in ("size", "crop_size"):
        if fields.get(name):
            fields[name] = {key: round(value * scale) for key, value in fields[name].items()}
    if fields.get("do_center_crop"):
        fields["crop_size"] = {"height": image_size, "width": image_size}
    else:
        fields["size"] = {"height": image_size, "width": image_size}
    fields.pop("image_processor_type", None)
    return type(image_processor)(**fields)


def export_to_transformers(
    model_or_path: nn.Module | str,
    output_dir: str,
    image_processor=None,
    pooling: str = "mean",
    per_layer_relative_position_bias: bool = False,
    image_size: int | None = None,
) -> str:
    """Write the pretrained encoder as a stock transformers BEiT checkpoint (`model_type: beit`).

    The folder holds `config.json` (a plain `BeitConfig`, no `auto_map`), `model.safetensors` and a
    `preprocessor_config.json` for transformers' `BeitImageProcessor`, and no Python files.

    Args:
        model_or_path: An hf_mim MIM model or encoder, a transformers BEiT model, or a checkpoint folder / Hub id.
        output_dir: Where to write the checkpoint.
        image_processor: The encoder's image processor. Defaults to the one saved with `model_or_path` when it is a
            path; required for an in-memory model (its preprocessing is part of what the features mean).
        pooling: `"mean"` (BEiT fine-tuning) or `"cls"`, see the module docstring.
        per_layer_relative_position_bias: Expand the shared relative position bias into per-layer tables, as BEiT
            fine-tuning does.
        image_size: Export for another input size (e.g. 384 for fine-tuning at 384 px): relative position bias
            tables and the image processor are resized, see the module docstring.

    Returns:
        `output_dir`.
    """
    if image_processor is None:
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise ValueError(
                "Pass the model's image_processor (e.g. AutoImageProcessor.from_pretrained(<its checkpoint>)); an "
                "in-memory model does not record how its inputs were preprocessed"
            )
        image_processor = AutoImageProcessor.from_pretrained(model_or_path)
    model = load_pretrained_beit(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    overrides = {} if image_size is None else {"image_size": image_size}
    exported = to_transformers_beit(model, pooling, per_layer_relative_position_bias, **overrides)
    exported.save_pretrained(output_dir)
    view = encoder_image_processor(image_processor, resolve_encoder(model).config)
    if image_size is not None:
        view = image_processor_at_size(view, image_size)
    to_beit_image_processor(view).save_pretrained(output_dir)
    return str(output_dir)


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "An hf_mim MIM checkpoint or encoder (folder or Hub id)"})
    output_dir: str = field(metadata={"help": "Where to write the transformers BEiT checkpoint"})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor (default: the model's)"})
    pooling: str = field(default="mean", metadata={"help": "mean (BEiT fine-tuning) or cls ([CLS] token after the final norm)"})
    per_layer_relative_position_bias: bool = field(
        default=False, metadata={"help": "Copy the shared relative position bias into every layer (for fine-tuning)"}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Export for another input size (e.g. 384): resizes the relative position bias"}
    )
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})

    def __post_init__(self):
        if self.pooling not in BEIT_POOLERS:
            raise UsageError(f"--pooling must be one of {', '.join(BEIT_POOLERS)}, got {self.pooling!r}")
        if self.image_size is not None and self.image_size <= 0:
            raise UsageError(
                f"--image_size is the side in pixels of the exported model's input, got {self.image_size}; pass a "
                "positive multiple of the patch size (e.g. 384), or leave it out to keep the pre-training size"
            )


def _check_export_size(encoder_config, image_size: int | None, model_name_or_path: str) -> None:
    """Refuse an `--image_size` that the encoder of `model_name_or_path` cannot be exported at, before the export."""
    if image_size is None or image_size == encoder_config.image_size:
        return
    patch_size = encoder_config.patch_size
    if image_size % patch_size:
        multiple = max(patch_size, round(image_size / patch_size) * patch_size)
        raise UsageError(
            f"--image_size {image_size} is not a multiple of the patch size {patch_size} of {model_name_or_path} (the "
            f"patch embedding would drop the remainder); pass e.g. --image_size {multiple}"
        )
    if encoder_config.use_absolute_position_embeddings:
        raise UsageError(
            f"--image_size {image_size}: {model_name_or_path} has absolute position embeddings, which cannot be "
            "resized (only a relative position bias resizes); leave --image_size out to export at "
            f"{encoder_config.image_size}"
        )


def parse_args(argv=None) -> ExportArguments:
    parser = command_parser(
        ExportArguments,
        description=[
            __doc__,
            """
            examples:
              # For fine-tuning with transformers: mean pooling, one relative position bias table per layer
              hf-mim export --model_name_or_path ./beit --output_dir ./beit-transformers \\
                  --per_layer_relative_position_bias

              # BEiT v2's patch-aggregation [CLS] token, for fine-tuning at 384 px
              hf-mim export --model_name_or_path ./beitv2 --output_dir ./beitv2-384 --pooling cls --image_size 384
            """,
        ],
        json_file=True,
    )
    (args,) = parser.parse_command_line(argv)
    return args


@one_process("export")
def main(argv=None) -> str:
    args = parse_args(argv)
    require_new_output_dir(args.output_dir, args.model_name_or_path)
    require_output_dir_of(args.output_dir, BeitConfig.model_type, "BeitModel")
    model = load_pretrained_beit(args.model_name_or_path, token=args.token)
    architectures = model.config.architectures or []
    if any(name.endswith("ForImageClassification") for name in architectures):
        # The export is an encoder: a fine-tuned classifier's head and classes would be lost without a word.
        print(
            f"warning: --model_name_or_path {args.model_name_or_path} is an image classifier ({architectures[0]}); "
            "only its encoder is exported, its classification head is not (the checkpoint already loads with "
            "transformers as it is)",
            file=sys.stderr,
        )
    if args.pooling == "cls" and final_layer_norm(model, resolve_encoder(model)) is None:
        # Its [CLS] token was never pooled: the export would pool it through a LayerNorm made up as the identity.
        raise UsageError(
            f"--pooling cls: --model_name_or_path {args.model_name_or_path} {NO_FINAL_NORM}; export it with --pooling "
            "mean, or pass the MIM checkpoint it came from"
        )
    _check_export_size(resolve_encoder(model).config, args.image_size, args.model_name_or_path)
    image_processor = load_image_processor(args.model_name_or_path, args.image_processor_name, token=args.token)
    check_processor_size(
        image_processor, resolve_encoder(model).config.image_size, args.model_name_or_path, args.image_processor_name
    )
    export_to_transformers(
        model, args.output_dir, image_processor, args.pooling, args.per_layer_relative_position_bias, args.image_size
    )
    print(f"Wrote a transformers BEiT checkpoint (model_type 'beit', {args.pooling} pooling) to {args.output_dir}")
    return args.output_dir


__all__ = [
    "BEIT_POOLERS",
    "ExportArguments",
    "NO_FINAL_NORM",
    "beit_config_for_export",
    "check_processor_size",
    "encoder_image_processor",
    "export_state_dict",
    "export_to_transformers",
    "final_layer_norm",
    "geometric_offset_positions",
    "image_processor_at_size",
    "load_image_processor",
    "load_pretrained_beit",
    "main",
    "normalizes_inside",
    "resize_relative_position_bias_table",
    "resolve_encoder",
    "to_beit_image_processor",
    "to_transformers_beit",
]


if __name__ == "__main__":
    from ..cli import run_command

    run_command(main)
