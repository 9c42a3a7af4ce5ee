"""Convert microsoft/unilm checkpoints (BEiT, BEiT v2 and their VQ-KD tokenizers) into hf_mim folders.

The released `.pth` files are read with `torch.load(weights_only=True)`, which refuses to run pickled code; only
`argparse.Namespace` (the `args` that unilm's training checkpoints carry) is allowed besides tensors and containers.
The architecture (widths, depths, grid, codebook) is read off the tensor shapes; what shapes cannot tell (attention
heads without a relative position table, BEiT v2's `early_layers`) defaults to the released models' values and can
be overridden.

Stochastic depth is not in the weights either, yet it matters when pre-training continues from a converted model:
the converted config records the method's pre-training value explicitly (`drop_path_rate`, see
`pretraining_drop_path_rate`): the checkpoint's own `args.drop_path` when it carries its training arguments, else
BEiT 0.1, BEiT v2 0.1 for the 1600-epoch release and 0 for the 300-epoch one (`*_300e.pth`), mc-BEiT 0.1 (the
specs' recipes). The value and where it came from are logged; `drop_path_rate=` (`--drop_path_rate`) overrides it.

VQ-KD's codebook rows are unit vectors (its EMA update re-normalises them each step); rows off by up to 1e-3 (the
tolerance, e.g. a codebook stored at lower precision) are re-normalised on conversion, so `VqkdModel`'s dot product
with the normalised feature is a cosine and picks the code unilm's squared distance picks on unit rows.

Key mapping (unilm -> transformers' `BeitModel` names, see the BEiT spec §4.6): fused `attn.qkv.weight` is split into
`q_proj`/`k_proj`/`v_proj` (order q, k, v; the key has no bias), `q_bias`/`v_bias` become the q/v projection biases,
`gamma_1/2` become `lambda_1/2`, the shared relative position table goes to `shared_position_bias`, VQ-KD's
per-token `fc_norm` to `pooler.layernorm`, and every `relative_position_index` is dropped (it is recomputed).
"""

import argparse
import logging
import re
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..models.configuration_beit import BeitMimConfig
from ..models.configuration_vqkd import VqkdConfig
from ..models.image_processing_mim import MimImageProcessor
from ..models.image_processing_vqkd import VqkdImageProcessor
from ..models.modeling_beit import BeitMimForMaskedImageModeling
from ..models.modeling_vqkd import VqkdModel
from ..training.loading import pretrained, require_output_dir_of, require_tokenizer
from ..checkpoint_folder import save_tokenizer_image_processor
from ..errors import UsageError
from ..families import MIM_METHODS, family_of
from ..hub.cards import write_model_card
from .common import describe, load_weights_only

logger = logging.getLogger(__name__)

# Keys of VQ-KD checkpoints that belong to training only (the teacher, its input scaling, loss modules).
_VQKD_TRAINING_PREFIXES = ("loss", "teacher", "scaling")
# BEiT v1's pt22k models were trained with mean = std = 0.5; BEiT v2 with ImageNet statistics.
_INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# The methods whose released checkpoints (unilm's layout) convert; each is its `hf_mim.families.MIM_METHODS` entry.
METHODS = ("beit", "beitv2", "mcbeit")
# Stochastic depth of each method's pre-training recipe (BEiT spec §2/§3.7, mc-BEiT spec A9): BEiT 0.1; BEiT v2 0.1
# for 1600 epochs (the un-suffixed release) and 0 for 300 epochs (`*_300e.pth`); mc-BEiT 0.1 (its README and code).
PRETRAINING_DROP_PATH = {"beit": 0.1, "beitv2": 0.1, "beitv2_300e": 0.0, "mcbeit": 0.1}
_CHECKPOINT = "a unilm .pth checkpoint (weights under 'model')"


def load_unilm_checkpoint(path: str | Path, flag: str = "--checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a unilm `.pth` file (under `model`, `module` or `state_dict`, or the file itself) and the
    training arguments it carries (`vars(checkpoint['args'])`, empty when it has none).

    Raises:
        UsageError: naming `flag` and the path, when the file is missing, is not a checkpoint, pickles objects other
            than tensors, plain containers and `argparse.Namespace` (nothing of it is run), or holds no weights.
    """
    checkpoint = load_weights_only(path, flag, _CHECKPOINT, safe_globals=[argparse.Namespace],
                                   allowed="tensors, plain containers and argparse.Namespace")
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    for key in ("model", "module", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        raise UsageError(
            f"{flag} {path} is not a unilm checkpoint: expected a dict of tensors (optionally under 'model'), found "
            f"{describe(checkpoint)}"
        )
    return dict(checkpoint), args


def load_unilm_state_dict(path: str | Path, flag: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """The weights of a unilm `.pth` file (under `model`, `module` or `state_dict`, or the file itself)."""
    return load_unilm_checkpoint(path, flag)[0]


def pretraining_drop_path_rate(
    method: str, checkpoint_args: dict | None = None, checkpoint_name: str = ""
) -> tuple[float, str]:
    """The stochastic depth a converted `method` model ("beit", "beitv2", "mcbeit") pre-trained with, and where that
    value comes from: the checkpoint's own `args.drop_path`, else the method's recipe (`PRETRAINING_DROP_PATH`; BEiT
    v2's 300-epoch recipe when `checkpoint_name` says `300e`)."""
    value = (checkpoint_args or {}).get("drop_path")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "the checkpoint's own training arguments (args.drop_path)"
    if method == "beitv2" and re.search(r"(^|[^0-9])300e", Path(checkpoint_name).name):
        return PRETRAINING_DROP_PATH["beitv2_300e"], "BEiT v2's 300-epoch pre-training recipe (the file name says 300e)"
    if method == "beitv2":
        return PRETRAINING_DROP_PATH["beitv2"], (
            "BEiT v2's 1600-epoch pre-training recipe (its 300-epoch recipe, the *_300e.pth release, used 0)"
        )
    return PRETRAINING_DROP_PATH[method], f"{MIM_METHODS[method].title}'s pre-training recipe"


class _Keys:
    """The source tensors, consumed by name, so that anything left unconverted is reported rather than dropped."""

    def __init__(self, state: dict[str, torch.Tensor], what: str):
        self.state = dict(state)
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def pop(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise UsageError(f"The {self.what} checkpoint has no '{key}'; is it a {self.what} checkpoint?")
        return self.state.pop(key)

    def drop(self, pattern: str) -> None:
        for key in [key for key in self.state if re.fullmatch(pattern, key)]:
            del self.state[key]

    def check_consumed(self) -> None:
        if self.state:
            raise UsageError(
                f"The {self.what} checkpoint has keys this converter does not understand: {sorted(self.state)[:10]}"
                f"{' ...' if len(self.state) > 10 else ''}; it is not the released layout (fine-tuned checkpoints and "
                "non-shared LM heads are not supported)"
            )


def _count(state: dict, pattern: str) -> int:
    indices = {int(match[1]) for key in state if (match := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _vit_geometry(state: dict, prefix: str, what: str) -> dict:
    """Sizes and options of the unilm ViT under `prefix`, from its tensor shapes."""
    for key in (f"{prefix}patch_embed.proj.weight", f"{prefix}blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise UsageError(f"The {what} checkpoint has no '{key}'; is it a {what} checkpoint?")
    patch = state[f"{prefix}patch_embed.proj.weight"]
    geometry = {
        "hidden_size": patch.shape[0],
        "num_channels": patch.shape[1],
        "patch_size": patch.shape[2],
        "num_hidden_layers": _count(state, rf"{re.escape(prefix)}blocks\.(\d+)\."),
        "intermediate_size": state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0],
        "layer_scale": f"{prefix}blocks.0.gamma_1" in state,
        "grid_size": None,
        "num_attention_heads": None,
    }
    if f"{prefix}pos_embed" in state:
        geometry["grid_size"] = round((state[f"{prefix}pos_embed"].shape[1] - 1) ** 0.5)
    table = state.get(f"{prefix}rel_pos_bias.relative_position_bias_table")
    if table is not None:
        # (2W - 1)^2 relative offsets plus 3 entries for the [CLS] token.
        geometry["grid_size"] = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
        geometry["num_attention_heads"] = table.shape[1]
    return geometry


def _convert_block(keys: _Keys, source: str, target: str, out: dict) -> None:
    q, k, v = keys.pop(f"{source}attn.qkv.weight").chunk(3)
    out[f"{target}attention.q_proj.weight"] = q
    out[f"{target}attention.k_proj.weight"] = k
    out[f"{target}attention.v_proj.weight"] = v
    out[f"{target}attention.q_proj.bias"] = keys.pop(f"{source}attn.q_bias")
    out[f"{target}attention.v_proj.bias"] = keys.pop(f"{source}attn.v_bias")
    renames = {
        "attn.proj": "attention.o_proj",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for old, new in renames.items():
        for parameter in ("weight", "bias"):
            out[f"{target}{new}.{parameter}"] = keys.pop(f"{source}{old}.{parameter}")
    if f"{source}gamma_1" in keys:
        out[f"{target}lambda_1"] = keys.pop(f"{source}gamma_1")
        out[f"{target}lambda_2"] = keys.pop(f"{source}gamma_2")


def _convert_vit(keys: _Keys, source: str, target: str, num_layers: int, out: dict) -> None:
    """A unilm ViT under `source` into transformers' `BeitModel` names under `target`."""
    out[f"{target}embeddings.cls_token"] = keys.pop(f"{source}cls_token")
    optional = {
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "rel_pos_bias.relative_position_bias_table": "shared_position_bias.relative_position_bias_table",
        "fc_norm.weight": "pooler.layernorm.weight",
        "fc_norm.bias": "pooler.layernorm.bias",
    }
    for old, new in optional.items():
        if f"{source}{old}" in keys:
            out[f"{target}{new}"] = keys.pop(f"{source}{old}")
    for parameter in ("weight", "bias"):
        out[f"{target}embeddings.patch_embeddings.projection.{parameter}"] = keys.pop(
            f"{source}patch_embed.proj.{parameter}"
        )
    for index in range(num_layers):
        _convert_block(keys, f"{source}blocks.{index}.", f"{target}layers.{index}.", out)


def _heads(geometry: dict, override: int | None, what: str, flag: str = "--num_attention_heads") -> int:
    """Attention heads: from the relative position table if there is one, else `override` (`flag`), else 64-wide
    heads."""
    known = geometry["num_attention_heads"]
    if known and override and override != known:
        raise UsageError(
            f"{flag} {override}: the {what} has {known} attention heads (relative position table); "
            "drop the flag"
        )
    if known or override:
        return known or override
    if geometry["hidden_size"] % 64:
        raise UsageError(
            f"The {what}'s attention heads cannot be read from its weights and its width {geometry['hidden_size']} is "
            f"not a multiple of the usual head width 64; pass the number of heads ({flag})"
        )
    return geometry["hidden_size"] // 64


def _vqkd_config(state, encoder, decoder, codebook, num_attention_heads, decoder_attention_heads) -> VqkdConfig:
    """The [`VqkdConfig`] of a VQ-KD's geometry (see `_vit_geometry`) and codebook."""
    return VqkdConfig(
        image_size=encoder["grid_size"] * encoder["patch_size"],
        patch_size=encoder["patch_size"],
        num_channels=encoder["num_channels"],
        hidden_size=encoder["hidden_size"],
        num_hidden_layers=encoder["num_hidden_layers"],
        num_attention_heads=_heads(encoder, num_attention_heads, "encoder"),
        intermediate_size=encoder["intermediate_size"],
        decoder_hidden_size=decoder["hidden_size"],
        decoder_layers=decoder["num_hidden_layers"],
        decoder_attention_heads=_heads(decoder, decoder_attention_heads, "decoder", "--decoder_attention_heads"),
        decoder_intermediate_size=decoder["intermediate_size"],
        codebook_size=codebook.shape[0],
        codebook_dim=codebook.shape[1],
        teacher_dim=state["decode_task_layer.2.weight"].shape[0],
        # The released tokenizers were trained without restarts; continued training keeps their recipe.
        dead_code_restart_steps=0,
    )


def convert_vqkd_state_dict(
    state: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_attention_heads: int | None = None,
) -> tuple[VqkdConfig, dict[str, torch.Tensor]]:
    """The [`VqkdConfig`] and `VqkdModel` state dict of a unilm VQ-KD state dict (spec §4.4).

    Attention heads are not visible in the weights; they default to a head width of 64 (12 for ViT-B).
    """
    state = {key: value for key, value in state.items() if not key.startswith(_VQKD_TRAINING_PREFIXES)}
    keys = _Keys(state, "VQ-KD")
    encoder, decoder = _vit_geometry(state, "encoder.", "VQ-KD"), _vit_geometry(state, "decoder.", "VQ-KD")
    codebook = keys.pop("quantize.embedding.weight").float()
    norms = codebook.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise UsageError(
            f"The codebook rows are not unit vectors (norms {norms.min().item():.3g}..{norms.max().item():.3g}): this "
            "VQ-KD was saved before its k-means initialisation, so it holds no trained codebook"
        )
    # Unit rows, as training keeps them: VqkdModel scores codes by the dot product with the normalised feature, the
    # reference by squared distance; the two rank codes alike only for unit rows (with rows off by 1e-3, 15 of 1,568
    # tokens differed in a test).
    # Rows already unit to float32 precision are kept bit for bit.
    off = (norms - 1).abs() > 1e-6
    if off.any():
        logger.info(
            f"Re-normalised {int(off.sum())} of {len(codebook)} codebook rows (their norms were off 1 by up to "
            f"{(norms - 1).abs().max().item():.2g})"
        )
        codebook = torch.where(off[:, None], torch.nn.functional.normalize(codebook, dim=-1), codebook)
    if "quantize.embedding.initted" in keys and keys.pop("quantize.embedding.initted").item() != 1:
        raise UsageError("The checkpoint's codebook is marked as not initialised (quantize.embedding.initted == 0)")
    # EMA statistics the reference update rule never reads.
    keys.drop(r"quantize\.embedding\.(cluster_size|embed_avg)")
    cluster_size = keys.pop("quantize.cluster_size") if "quantize.cluster_size" in keys else torch.zeros(len(codebook))

    if encoder["grid_size"] is None or decoder["grid_size"] != encoder["grid_size"]:
        raise UsageError("The VQ-KD encoder and decoder position embeddings do not describe the same token grid")
    if "decode_task_layer.2.weight" not in keys:
        raise UsageError("The VQ-KD checkpoint has no 'decode_task_layer.2.weight'; is it a VQ-KD checkpoint?")
    if decoder["num_channels"] != codebook.shape[1]:
        raise UsageError(f"The decoder reads {decoder['num_channels']}-d codes but the codebook is {codebook.shape[1]}-d")
    try:
        config = _vqkd_config(state, encoder, decoder, codebook, num_attention_heads, decoder_attention_heads)
    except ValueError as error:
        if isinstance(error, UsageError):
            raise
        flags = "--num_attention_heads/--decoder_attention_heads" if "heads" in str(error) else "the checkpoint's layout"
        raise UsageError(f"{flags}: {error}") from error
    out = {}
    _convert_vit(keys, "encoder.", "encoder.", encoder["num_hidden_layers"], out)
    _convert_vit(keys, "decoder.", "decoder.", decoder["num_hidden_layers"], out)
    for layer in ("encode_task_layer", "decode_task_layer"):
        for parameter in ("0.weight", "0.bias", "2.weight", "2.bias"):
            out[f"{layer}.{parameter}"] = keys.pop(f"{layer}.{parameter}")
    keys.check_consumed()
    out.update(
        {
            "codebook.weight": codebook,
            "codebook.cluster_size": cluster_size.float(),
            # A converted codebook is trained: k-means must never overwrite it.
            "codebook.initted": torch.ones(1),
            "codebook.unused_steps": torch.zeros(len(codebook), dtype=torch.long),
        }
    )
    return config, out


def convert_beit_state_dict(
    state: dict[str, torch.Tensor],
    early_layers: int | None = None,
    num_attention_heads: int | None = None,
    tokenizer_config: dict | None = None,
    method: str | None = None,
    drop_path_rate: float | None = None,
    checkpoint_args: dict | None = None,
    checkpoint_name: str = "",
    tokenizer_name_or_path: str | None = None,
) -> tuple[BeitMimConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a unilm BEiT (§4.2, -> `hf_mim_beit`), BEiT v2 (§4.3, -> `hf_mim_beitv2`) or
    mc-BEiT (BEiT's layout, -> `hf_mim_mcbeit`) pre-training checkpoint.

    Args:
        early_layers: BEiT v2 only; not visible in the weights, defaults to depth - 3 (9 for base, 21 for large).
        method: "beit", "beitv2" or "mcbeit"; by default BEiT v2 when the checkpoint has `cls_pt_layers`, else BEiT.
            mc-BEiT's checkpoints have BEiT's layout, so they must be named.
        drop_path_rate: the stochastic depth of the converted config; by default the one the checkpoint was
            pre-trained with (see [`pretraining_drop_path_rate`]: its `args.drop_path`, else the method's recipe).
        checkpoint_args, checkpoint_name: the checkpoint's training arguments and file name, for that default.
        tokenizer_name_or_path: where `tokenizer_config` came from, for the error if it does not fit.
    """
    keys = _Keys(state, "BEiT")
    keys.drop(r".*relative_position_index")
    geometry = _vit_geometry(state, "", "BEiT")
    if geometry["grid_size"] is None:
        raise UsageError("The checkpoint has neither a relative position table nor position embeddings to size its grid")
    if "lm_head.weight" not in state:
        raise UsageError(
            "The checkpoint has no 'lm_head.weight': it is not a pre-training (MIM) checkpoint; fine-tuned "
            "classifiers (*_ft*.pth) are not supported"
        )
    head_layers = _count(state, r"cls_pt_layers\.(\d+)\.")
    found = "beitv2" if head_layers else "beit"
    method = method or found
    if method not in METHODS:
        raise UsageError(f"--method {method}: unknown; choose one of {', '.join(METHODS)}")
    if (method == "beitv2") != bool(head_layers):
        raise UsageError(
            f"--method {method}: the checkpoint is a {MIM_METHODS[found].title} one "
            f"({'with' if head_layers else 'without'} BEiT v2's cls_pt_layers); "
            + ("drop --method" if head_layers else "use --method beit or mcbeit")
        )
    if early_layers is not None and method != "beitv2":
        raise UsageError("--early_layers only applies to BEiT v2 checkpoints (with cls_pt_layers); drop it")
    if early_layers is not None and not 1 <= early_layers <= geometry["num_hidden_layers"]:
        raise UsageError(
            f"--early_layers {early_layers} must lie in [1, {geometry['num_hidden_layers']}] (the backbone's depth); "
            "BEiT v2 used depth - 3"
        )
    if drop_path_rate is None:
        drop_path_rate, source = pretraining_drop_path_rate(method, checkpoint_args, checkpoint_name)
    else:
        source = "drop_path_rate (--drop_path_rate)"
    if not 0.0 <= drop_path_rate < 1.0:
        raise UsageError(f"--drop_path_rate {drop_path_rate} must lie in [0, 1)")
    logger.info(f"{MIM_METHODS[method].title}: drop_path_rate={drop_path_rate:g}, from {source}")
    kwargs = {
        "hidden_size": geometry["hidden_size"],
        "num_hidden_layers": geometry["num_hidden_layers"],
        "num_attention_heads": _heads(geometry, num_attention_heads, "backbone"),
        "intermediate_size": geometry["intermediate_size"],
        "image_size": geometry["grid_size"] * geometry["patch_size"],
        "patch_size": geometry["patch_size"],
        "num_channels": geometry["num_channels"],
        "vocab_size": state["lm_head.weight"].shape[0],
        "use_shared_relative_position_bias": "rel_pos_bias.relative_position_bias_table" in state,
        "use_absolute_position_embeddings": "pos_embed" in state,
        # The released values (only the presence of layer scale matters once weights are loaded).
        "layer_scale_init_value": (1e-5 if geometry["hidden_size"] >= 1024 else 0.1) if geometry["layer_scale"] else 0.0,
        "drop_path_rate": drop_path_rate,
        "tokenizer_config": tokenizer_config,
    }
    if method == "beitv2":
        kwargs.update(early_layers=early_layers, head_layers=head_layers)
    try:
        config = MIM_METHODS[method].config_class(**kwargs)
    except ValueError as error:
        if tokenizer_config is None:
            raise
        # The tokenizer does not fit the checkpoint (its grid or codebook) or the method (mc-BEiT needs logits).
        raise UsageError(f"--tokenizer_name_or_path {tokenizer_name_or_path or ''}: {error}") from error
    out = {}
    _convert_vit(keys, "", "beit.", geometry["num_hidden_layers"], out)
    for index in range(head_layers):
        _convert_block(keys, f"cls_pt_layers.{index}.", f"patch_aggregation.layers.{index}.", out)
    for parameter in ("weight", "bias"):
        out[f"layernorm.{parameter}"] = keys.pop(f"norm.{parameter}")
        out[f"lm_head.{parameter}"] = keys.pop(f"lm_head.{parameter}")
    keys.check_consumed()
    return config, out


def convert_vqkd_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    num_attention_heads: int | None = None,
    decoder_attention_heads: int | None = None,
) -> VqkdModel:
    """A [`VqkdModel`] from a released VQ-KD tokenizer (e.g. `vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth`),
    saved with its [`VqkdImageProcessor`] to `output_dir` when given. The codebook rows are re-normalised to unit
    length (see the module docstring)."""
    state = load_unilm_state_dict(checkpoint_path)
    try:
        config, weights = convert_vqkd_state_dict(state, num_attention_heads, decoder_attention_heads)
    except UsageError as error:
        if str(error).startswith("--"):  # names its flag already
            raise
        raise UsageError(f"--checkpoint {checkpoint_path}: {error}") from error
    model = VqkdModel(config)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value for key, value in weights.items()})
    model.eval()
    if output_dir is not None:
        require_output_dir_of(output_dir, model.config.model_type)
        model.save_pretrained(output_dir)
        VqkdImageProcessor.for_config(config).save_pretrained(output_dir)
        write_model_card(output_dir)
    return model


def convert_beit_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    tokenizer_name_or_path: str | None = None,
    early_layers: int | None = None,
    num_attention_heads: int | None = None,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    method: str | None = None,
    drop_path_rate: float | None = None,
) -> BeitMimForMaskedImageModeling:
    """A BEiT (`hf_mim_beit`), BEiT v2 (`hf_mim_beitv2`) or mc-BEiT (`hf_mim_mcbeit`) MIM model from a released
    pre-training checkpoint (e.g. `beit_base_patch16_224_pt22k.pth`, `beitv2_base_patch16_224_pt1k.pth`).

    The converted config records the stochastic depth the checkpoint was pre-trained with, so continuing
    pre-training follows the recipe: the checkpoint's own `args.drop_path` if it has one, else BEiT 0.1, BEiT v2 0.1
    (0 for the 300-epoch `*_300e.pth`), mc-BEiT 0.1. The value and its source are logged.

    Args:
        tokenizer_name_or_path: an hf_mim tokenizer (e.g. a converted VQ-KD, or DALL-E dVAE) to hold inside the model
            so it computes its own targets (and continues pre-training with `run_mim.py --model_name_or_path`);
            its image processor is saved in the `tokenizer` subfolder. Without it the model needs `labels`.
        image_mean, image_std: normalisation of the ViT view; default (0.5, 0.5, 0.5) for BEiT (pt22k recipe) and
            ImageNet's statistics for BEiT v2 and mc-BEiT.
        method: "beit", "beitv2" or "mcbeit"; by default read off the checkpoint (BEiT v2 has `cls_pt_layers`).
            mc-BEiT checkpoints have BEiT's layout: pass "mcbeit" (and a tokenizer with code logits, e.g. a VQGAN).
        drop_path_rate: overrides the recorded stochastic depth.
    """
    tokenizer = tokenizer_processor = None
    state, checkpoint_args = load_unilm_checkpoint(checkpoint_path)
    if tokenizer_name_or_path is not None:
        flag = "tokenizer_name_or_path"
        tokenizer = pretrained(AutoModel.from_pretrained, tokenizer_name_or_path, flag)
        require_tokenizer(tokenizer, tokenizer_name_or_path, flag)
        tokenizer_processor = pretrained(AutoImageProcessor.from_pretrained, tokenizer_name_or_path, flag)
        head = state.get("lm_head.weight")
        if head is not None and head.shape[0] != tokenizer.config.codebook_size:
            # The config would say "set vocab_size", which the LM head's weights fix: the tokenizer is the mistake.
            raise UsageError(
                f"--{flag} {tokenizer_name_or_path} has {tokenizer.config.codebook_size} codes, but the checkpoint's "
                f"LM head predicts {head.shape[0]}: pass the tokenizer it was pre-trained with"
            )
    try:
        config, weights = convert_beit_state_dict(
            state,
            early_layers=early_layers,
            num_attention_heads=num_attention_heads,
            tokenizer_config=tokenizer.config.to_dict() if tokenizer is not None else None,
            method=method,
            drop_path_rate=drop_path_rate,
            checkpoint_args=checkpoint_args,
            checkpoint_name=str(checkpoint_path),
            tokenizer_name_or_path=tokenizer_name_or_path,
        )
    except UsageError as error:
        if str(error).startswith("--"):  # names its flag already
            raise
        raise UsageError(f"--checkpoint {checkpoint_path}: {error}") from error
    model_class = family_of(config.model_type).model_class
    model = model_class(config)
    missing, unexpected = model.load_state_dict({key: value.float() for key, value in weights.items()}, strict=False)
    missing = [key for key in missing if not key.startswith("tokenizer.")]
    if missing or unexpected:
        raise ValueError(f"Converted weights do not fit {model_class.__name__}: missing {missing}, unexpected {unexpected}")
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    model.eval()
    if output_dir is not None:
        require_output_dir_of(output_dir, model.config.model_type)
        model.save_pretrained(output_dir)
        default_mean, default_std = (
            _INCEPTION_MEAN_STD if type(config) is BeitMimConfig else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        )
        MimImageProcessor.for_config(
            config, image_mean=image_mean or default_mean, image_std=image_std or default_std
        ).save_pretrained(output_dir)
        if tokenizer_processor is not None:
            save_tokenizer_image_processor(output_dir, tokenizer_processor)
        write_model_card(output_dir)
    return model


__all__ = [
    "METHODS",
    "PRETRAINING_DROP_PATH",
    "convert_beit_checkpoint",
    "convert_beit_state_dict",
    "convert_vqkd_checkpoint",
    "convert_vqkd_state_dict",
    "load_unilm_checkpoint",
    "load_unilm_state_dict",
    "pretraining_drop_path_rate",
]
