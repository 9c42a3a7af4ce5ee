"""Configuration of the DALL-E discrete VAE tokenizer (Ramesh et al. 2021, arXiv 2102.12092), BEiT v1's target."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_common import complete_auto_map


@strict
class DvaeConfig(PreTrainedConfig):
    r"""
    Configuration of [`DvaeModel`], the convolutional discrete VAE of DALL-E. The defaults are OpenAI's released
    `encoder.pkl` / `decoder.pkl` as BEiT v1 uses them: 112x112 inputs, a 14x14 grid of 8192 codes.

    image_size (`int`, *optional*, defaults to 112):
        Side of the (square) input view in pixels. Must be divisible by `2 ** (num_groups - 1)`.
    num_channels (`int`, *optional*, defaults to 3):
        Number of image channels.
    codebook_size (`int`, *optional*, defaults to 8192):
        Number of discrete codes (the encoder's output logits per position).
    hidden_size (`int`, *optional*, defaults to 256):
        Width of the first encoder group and of the last decoder group (DALL-E's `n_hid`); group `g` of the
        encoder is `hidden_size * 2**g` wide, the decoder mirrors it. Must be divisible by 4 (the residual
        paths are a quarter of a block's width).
    num_groups (`int`, *optional*, defaults to 4):
        Number of resolution stages; the encoder downsamples by 2 between consecutive groups.
    num_blocks_per_group (`int`, *optional*, defaults to 2):
        Residual blocks per group. Residual branches are scaled by `1 / (num_groups * num_blocks_per_group)**2`.
    decoder_hidden_size (`int`, *optional*, defaults to 128):
        Channels of the decoder's first 1x1 projection of the one-hot codes (DALL-E's `n_init`).
    logit_laplace_eps (`float`, *optional*, defaults to 0.1):
        The logit-Laplace margin: the encoder sees pixels mapped from [0, 1] to [eps, 1 - eps], and decoded
        pixels are mapped back.
    with_decoder (`bool`, *optional*, defaults to `True`):
        Whether the model holds its decoder (codes -> pixels). MIM models hold their tokenizer without it (their
        targets only need the encoder), which keeps 43.8M parameters of the released size out of every MIM
        checkpoint; such a model refuses `decode` and training with an error saying where to get the decoder.

    Example:

    ```python
    >>> from hf_mim import DvaeConfig, DvaeModel

    >>> config = DvaeConfig()  # the released DALL-E dVAE
    >>> config.grid_size
    14
    >>> tiny = DvaeConfig(image_size=32, hidden_size=16, codebook_size=64, num_groups=2)
    >>> model = DvaeModel(tiny)
    ```"""

    model_type = "hf_mim_dvae"
    # The image processor records itself in preprocessor_config.json, so only model classes go here.
    auto_map_defaults = {"AutoConfig": "configuration_dvae.DvaeConfig", "AutoModel": "modeling_dvae.DvaeModel"}

    image_size: int = 112
    num_channels: int = 3
    codebook_size: int = 8192
    hidden_size: int = 256
    num_groups: int = 4
    num_blocks_per_group: int = 2
    decoder_hidden_size: int = 128
    logit_laplace_eps: float = 0.1
    with_decoder: bool = True

    def __post_init__(self, **kwargs):
        for name in (
            "image_size",
            "num_channels",
            "codebook_size",
            "hidden_size",
            "num_groups",
            "num_blocks_per_group",
            "decoder_hidden_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DvaeConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % 4 != 0:
            raise ValueError(
                f"DvaeConfig.hidden_size={self.hidden_size} must be divisible by 4 (residual paths are a quarter "
                f"of a block's width); use e.g. hidden_size={max(4, self.hidden_size // 4 * 4)}"
            )
        downsampling = 2 ** (self.num_groups - 1)
        if self.image_size % downsampling != 0:
            raise ValueError(
                f"DvaeConfig.image_size={self.image_size} is not divisible by the encoder's downsampling factor "
                f"{downsampling} (= 2**(num_groups-1) with num_groups={self.num_groups}); use e.g. "
                f"image_size={max(1, self.image_size // downsampling) * downsampling}"
            )
        if not 0.0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(
                f"DvaeConfig.logit_laplace_eps must lie in [0, 0.5), got {self.logit_laplace_eps} (DALL-E uses 0.1)"
            )
        super().__post_init__(**kwargs)
        complete_auto_map(self, self.auto_map_defaults)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the code grid."""
        return self.image_size // 2 ** (self.num_groups - 1)


__all__ = ["DvaeConfig"]
