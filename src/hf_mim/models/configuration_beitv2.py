"""Configuration of BEiT v2 masked image modeling (arXiv 2208.06366)."""

from huggingface_hub.dataclasses import strict

from .configuration_beit import BeitMimConfig


@strict
class Beitv2Config(BeitMimConfig):
    r"""
    A [`BeitMimConfig`] with BEiT v2's patch aggregation head. The targets usually come from a VQ-KD tokenizer
    (`tokenizer_config=VqkdConfig().to_dict()`).

    early_layers (`int`, *optional*):
        The patch tokens after this many backbone layers are joined with the last layer's [CLS] token and fed to the
        aggregation head, so the [CLS] token must gather what the later layers would have added. Defaults to
        `num_hidden_layers - 3` (9 for ViT-B, 21 for ViT-L, the paper's choices), at least 1.
    head_layers (`int`, *optional*, defaults to 2):
        Number of transformer layers of the aggregation head. They share the backbone's relative position bias,
        continue its stochastic-depth schedule and are discarded after pre-training.

    Example:

    ```python
    >>> from hf_mim import Beitv2Config, Beitv2ForMaskedImageModeling, VqkdConfig

    >>> config = Beitv2Config(tokenizer_config=VqkdConfig().to_dict())
    >>> config.early_layers
    9
    >>> model = Beitv2ForMaskedImageModeling(config)
    ```"""

    model_type = "hf_mim_beitv2"
    auto_map_defaults = {
        "AutoConfig": "configuration_beitv2.Beitv2Config",
        "AutoModel": "modeling_beitv2.Beitv2Model",
        "AutoModelForMaskedImageModeling": "modeling_beitv2.Beitv2ForMaskedImageModeling",
    }

    early_layers: int | None = None
    head_layers: int = 2

    def __post_init__(self, **kwargs):
        if self.early_layers is None:
            self.early_layers = max(self.num_hidden_layers - 3, 1)
        if not 1 <= self.early_layers <= self.num_hidden_layers:
            raise ValueError(
                f"early_layers={self.early_layers} must lie in [1, num_hidden_layers={self.num_hidden_layers}]: it "
                f"names the backbone layer whose patch tokens the aggregation head sees (BEiT v2: 9 of 12, 21 of 24)"
            )
        if self.head_layers < 1:
            raise ValueError(
                f"head_layers={self.head_layers} must be >= 1 (BEiT v2 uses 2); for BEiT v2 targets without patch "
                "aggregation use BeitMimConfig with a VQ-KD tokenizer"
            )
        super().__post_init__(**kwargs)


__all__ = ["Beitv2Config"]
