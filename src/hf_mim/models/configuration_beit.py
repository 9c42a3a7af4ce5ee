"""Configuration of BEiT masked image modeling (BEiT, arXiv 2106.08254), and which tokenizer families it serves.

A MIM config stores its tokenizer's config as a plain dict (of any tokenizer family); `tokenizer_config_from_dict`
resolves it through `TOKENIZER_CONFIG_CLASSES`, and `modeling_beit.TOKENIZER_MODEL_CLASSES` gives the model class.

Which code a checkpoint carries: `save_pretrained` copies a module and every sibling it imports as `from .x import y`
(transformers finds them with a regex, recursively), and the remote-code loader fetches exactly those files. In hf_mim
itself these two tuples list every tokenizer family (rendered from the registry, `hf_mim.families`), so a plain copy
would ship every family's code with every MIM checkpoint. `BeitMimConfig.save_pretrained` therefore rewrites, in the
checkpoint's copies of this file and of modeling_beit.py, the lines between the `FAMILY_BLOCK` markers to import the
checkpoint's own tokenizer family only, and removes the other families' files the copy brought along. The rewritten
imports are ordinary static imports, so the loader fetches the family's files, and a checkpoint loaded without hf_mim
and saved again keeps the same files.
Configuration files import no modeling files: this file resolves configs only, modeling_beit.py the models.
"""

import os
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig
from transformers.dynamic_module_utils import get_relative_import_files

from .configuration_common import complete_auto_map
from .configuration_transformer import check_transformer_settings

# Tokenizer families (rewritten per checkpoint, see the module docstring):
from .configuration_dvae import DvaeConfig
from .configuration_feature_kmeans import FeatureKmeansConfig
from .configuration_kmeans import KmeansConfig
from .configuration_vqgan import VqganConfig
from .configuration_vqkd import VqkdConfig

TOKENIZER_CONFIG_CLASSES = (DvaeConfig, FeatureKmeansConfig, KmeansConfig, VqganConfig, VqkdConfig)
# End of the tokenizer families.

# The first and last line around each family block.
FAMILY_BLOCK = (
    "# Tokenizer families (rewritten per checkpoint, see the module docstring):",
    "# End of the tokenizer families.",
)
# The files holding a family block: the tuple each defines, and the tokenizer config's auto_map entry naming its class.
FAMILY_BLOCK_FILES = {
    "configuration_beit.py": ("TOKENIZER_CONFIG_CLASSES", "AutoConfig"),
    "modeling_beit.py": ("TOKENIZER_MODEL_CLASSES", "AutoModel"),
}


def tokenizer_config_from_dict(config_dict: dict):
    """The tokenizer config object described by `config_dict` (a `to_dict()` of a tokenizer config)."""
    classes = {config_class.model_type: config_class for config_class in TOKENIZER_CONFIG_CLASSES}
    model_type = config_dict.get("model_type")
    if model_type not in classes:
        raise ValueError(
            f"Unknown tokenizer model_type {model_type!r}; this code serves the tokenizers {sorted(classes)}. "
            "Pass `tokenizer.config.to_dict()` of an hf_mim tokenizer as `tokenizer_config`."
        )
    return classes[model_type].from_dict(config_dict)


def mim_tokenizer_config(config_dict: dict) -> dict:
    """The tokenizer config a MIM model stores: `config_dict` with the decoder switched off (`with_decoder=False`).

    Targets only need the encoder side; the decoder would otherwise ride along in every MIM checkpoint and Hub push
    (43.8M parameters for the DALL-E dVAE, 22M for VQ-KD). A dict without the `with_decoder` key is kept as it is:
    its family has no such switch (k-means, VQGAN), or it comes from a MIM checkpoint saved before the switch existed,
    whose weights hold the decoder, so that checkpoint loads with its decoder and without missing or unexpected keys.
    """
    if "with_decoder" not in config_dict:
        return config_dict
    return {**config_dict, "with_decoder": False}


def render_family_block(tuple_name: str, references: list[str]) -> str:
    """The lines between the `FAMILY_BLOCK` markers for the classes `references` ("module.Class")."""
    pairs = [reference.rsplit(".", 1) for reference in references]
    names = [name for _, name in pairs]
    imports = "".join(f"from .{module} import {name}\n" for module, name in pairs)
    return f"{imports}\n{tuple_name} = ({', '.join(names)}{',' if len(names) == 1 else ''})\n"


def replace_family_block(text: str, tuple_name: str, references: list[str]) -> str:
    """`text` (a file holding a family block) with its block listing the classes `references` ("module.Class")."""
    start, end = text.index(f"\n{FAMILY_BLOCK[0]}\n") + len(FAMILY_BLOCK[0]) + 2, text.index(f"\n{FAMILY_BLOCK[1]}\n")
    return text[:start] + render_family_block(tuple_name, references) + text[end + 1 :]


def _code_closure(folder: Path, modules: list[str]) -> set[str]:
    """File names of `modules` in `folder` and of every sibling they import, as transformers copies and loads them."""
    files = [folder / f"{module}.py" for module in modules]
    imported = {Path(path).name for file in files for path in get_relative_import_files(file)}
    return {path.name for path in files} | imported


def keep_only_tokenizer_family(folder, config) -> None:
    """Narrow the code files of the checkpoint `folder` (of the MIM `config`) to its tokenizer family.

    Rewrites the family blocks of the folder's copies of `FAMILY_BLOCK_FILES` to the family of
    `config.tokenizer_config` (none without a tokenizer), then removes the files that only the blocks as they were
    needed. A folder whose blocks already list that family is left as it is.
    """
    folder = Path(folder)
    family = tokenizer_config_from_dict(config.tokenizer_config).auto_map if config.tokenizer_config else None
    modules = sorted(
        {reference.rsplit(".", 1)[0] for reference in config.auto_map.values() if "--" not in reference}
    )
    modules = [module for module in modules if (folder / f"{module}.py").is_file()]
    copied = _code_closure(folder, modules)
    for file_name, (tuple_name, auto_class) in FAMILY_BLOCK_FILES.items():
        path = folder / file_name
        if not path.is_file():
            continue
        path.write_text(replace_family_block(path.read_text(), tuple_name, [family[auto_class]] if family else []))
    for name in copied - _code_closure(folder, modules):
        (folder / name).unlink(missing_ok=True)


def check_backbone_geometry(config) -> None:
    """Errors for a patch grid that does not tile the image or does not match the tokenizer's grid."""
    if config.image_size % config.patch_size != 0:
        raise ValueError(
            f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}; "
            f"use e.g. image_size={config.image_size // config.patch_size * config.patch_size}"
        )
    if config.tokenizer_config is None:
        return
    tokenizer = tokenizer_config_from_dict(config.tokenizer_config)
    grid = config.image_size // config.patch_size
    if tokenizer.grid_size != grid:
        raise ValueError(
            f"The tokenizer ({tokenizer.model_type}) produces a {tokenizer.grid_size}x{tokenizer.grid_size} token grid "
            f"but the ViT sees a {grid}x{grid} patch grid (image_size={config.image_size}, patch_size={config.patch_size}); "
            f"every masked patch needs exactly one target token. Choose image_size/patch_size = {tokenizer.grid_size}, "
            f"or a tokenizer view of a matching size (the dVAE downsamples by 8: 112 px -> 14 tokens = 224 px / 16)."
        )
    if tokenizer.codebook_size != config.vocab_size:
        raise ValueError(
            f"vocab_size={config.vocab_size} (LM-head outputs) differs from the tokenizer's "
            f"codebook_size={tokenizer.codebook_size}; set vocab_size={tokenizer.codebook_size}."
        )


def check_mim_settings(config) -> None:
    """Errors for sizes that build no transformer (a zero size, a width the heads do not divide: transformers then
    trains narrower heads than asked, silently), for dropout and drop-path rates outside [0, 1) (at 1 nothing
    passes), and for a masked-image-modeling model without the [MASK] embedding (masked patches would be seen as they
    are)."""
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads} "
            "(each head takes hidden_size / num_attention_heads channels); choose heads that divide it (BEiT: 64 "
            "channels per head)"
        )
    check_transformer_settings(config)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ValueError(f"{name} is a probability in [0, 1), got {value}")
    if not config.use_mask_token:
        raise ValueError(
            "use_mask_token=False leaves masked image modeling no [MASK] embedding to put in place of masked patches; "
            "keep it True (the exported encoder, export_to_transformers, leaves it out)"
        )


@strict
class BeitMimConfig(BeitConfig):
    r"""
    A `BeitConfig` whose defaults are BEiT's pre-training recipe (shared relative position bias, no absolute
    position embedding, layer scale 0.1, LayerNorm eps 1e-6, a mask token), plus the visual tokenizer
    that supplies the targets.

    tokenizer_config (`dict`, *optional*):
        `to_dict()` of the hf_mim tokenizer's config (dVAE, VQ-KD, k-means, VQGAN). The tokenizer is built
        inside the model, frozen, and computes the targets from `tokenizer_pixel_values`. When `None`, the
        model needs `labels`. It is stored with `with_decoder=False`: the tokenizer is built without the decoder
        that targets never use (`set_tokenizer` copies the rest of a standalone tokenizer), so checkpoints stay
        small; decode with the standalone tokenizer. A dict without the `with_decoder` key (a checkpoint saved
        before the switch existed) keeps its decoder.
    tokenizer_autocast (`bool`, *optional*, defaults to `False`):
        Whether the tokenizer computes the targets under the training step's autocast (bf16/fp16). By default it
        runs in float32 whatever the autocast, so the targets are those of the fp32 tokenizer. The dVAE, VQGAN and
        k-means compute their logits in float32 in any case; VQ-KD's ViT encoder is faster under bf16, but its ids
        then agree with fp32's on only about 99% of patches (cosine near-ties; 99.06% in issue 14's H200 measurement).

    Example:

    ```python
    >>> from hf_mim import BeitMimConfig, BeitMimForMaskedImageModeling, DvaeConfig

    >>> config = BeitMimConfig(tokenizer_config=DvaeConfig().to_dict())
    >>> model = BeitMimForMaskedImageModeling(config)
    ```"""

    model_type = "hf_mim_beit"
    # Every Auto class of the family; subclasses (other MIM methods) replace it.
    auto_map_defaults = {
        "AutoConfig": "configuration_beit.BeitMimConfig",
        "AutoModel": "modeling_beit.BeitMimModel",
        "AutoModelForMaskedImageModeling": "modeling_beit.BeitMimForMaskedImageModeling",
    }

    layer_norm_eps: float = 1e-6
    use_mask_token: bool = True
    use_shared_relative_position_bias: bool = True
    use_relative_position_bias: bool = False
    use_absolute_position_embeddings: bool = False
    tokenizer_config: dict | None = None
    tokenizer_autocast: bool = False

    def __post_init__(self, **kwargs):
        if self.tokenizer_config is not None:
            self.tokenizer_config = mim_tokenizer_config(self.tokenizer_config)
        super().__post_init__(**kwargs)
        check_backbone_geometry(self)
        check_mim_settings(self)
        complete_auto_map(self, self.auto_map_defaults)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save as `PreTrainedConfig.save_pretrained` does, with code files of this tokenizer family only.

        A model's `save_pretrained` saves its config last, after copying its own code, so this also narrows the
        model's files. With `push_to_hub`, the upload goes through `push_to_hub`, which saves the same way.
        """
        super().save_pretrained(save_directory)
        keep_only_tokenizer_family(save_directory, self)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory))), **kwargs)


__all__ = [
    "BeitMimConfig",
    "TOKENIZER_CONFIG_CLASSES",
    "check_backbone_geometry",
    "check_mim_settings",
    "keep_only_tokenizer_family",
    "mim_tokenizer_config",
    "render_family_block",
    "replace_family_block",
    "tokenizer_config_from_dict",
]
