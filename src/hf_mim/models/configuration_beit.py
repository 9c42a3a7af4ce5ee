"""Configuration of BEiT masked image modeling (BEiT, arXiv 2106.08254)."""

from transformers import BeitConfig

from .configuration_common import complete_auto_map
from .tokenizer_registry import mim_tokenizer_config, tokenizer_config_from_dict


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
        complete_auto_map(self, self.auto_map_defaults)


__all__ = ["BeitMimConfig", "check_backbone_geometry"]
