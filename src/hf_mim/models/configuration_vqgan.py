"""Configuration of the VQGAN encoder tokenizer (Esser et al. 2021, arXiv 2012.09841), mc-BEiT's target."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_common import complete_auto_map


@strict
class VqganConfig(PreTrainedConfig):
    r"""
    Configuration of [`VqganModel`]: the convolutional encoder of a taming-transformers VQGAN with Gumbel
    quantisation, whose 1x1 projection scores every code at every grid position. The defaults are taming's
    "VQGAN OpenImages (f=8), 8192, GumbelQuantization" (`vqgan_gumbel_f8`) as mc-BEiT uses it: 112x112 inputs in
    [-1, 1], a 14x14 grid of 8192 codes.

    image_size (`int`, *optional*, defaults to 112):
        Side of the (square) input view in pixels. Must be divisible by `2 ** (len(channel_multipliers) - 1)`.
    num_channels (`int`, *optional*, defaults to 3):
        Number of image channels.
    codebook_size (`int`, *optional*, defaults to 8192):
        Number of codes (taming's `n_embed`): the logits per grid position.
    hidden_size (`int`, *optional*, defaults to 128):
        Width of the first resolution level (taming's `ch`).
    channel_multipliers (`list[int]`, *optional*, defaults to `[1, 1, 2, 4]`):
        Width of each resolution level as a multiple of `hidden_size` (taming's `ch_mult`); the encoder halves the
        resolution between consecutive levels.
    num_res_blocks (`int`, *optional*, defaults to 2):
        ResNet blocks per level.
    attention_levels (`list[int]`, *optional*, defaults to `[3]`):
        Levels (0-based) whose ResNet blocks are each followed by a self-attention block. taming expresses this as
        `attn_resolutions` at its training `resolution`: level `l` has attention iff `resolution / 2**l` is listed
        (`[32]` at 256 px is level 3).
    z_channels (`int`, *optional*, defaults to 256):
        Output channels of the encoder.
    embed_dim (`int`, *optional*, defaults to 256):
        Output channels of `quant_conv`, the input of the code projection.
    norm_num_groups (`int`, *optional*, defaults to 32):
        Groups of every GroupNorm (taming fixes 32); every level's width must be divisible by it.
    norm_eps (`float`, *optional*, defaults to 1e-6):
        Epsilon of every GroupNorm.

    Example:

    ```python
    >>> from hf_mim import VqganConfig, VqganModel

    >>> config = VqganConfig()  # taming's vqgan_gumbel_f8
    >>> config.grid_size
    14
    >>> tiny = VqganConfig(image_size=16, hidden_size=8, channel_multipliers=[1, 1, 2], attention_levels=[2],
    ...                    z_channels=8, embed_dim=8, codebook_size=64, norm_num_groups=4)
    >>> model = VqganModel(tiny)
    ```"""

    model_type = "hf_mim_vqgan"
    # The image processor records itself in preprocessor_config.json, so only model classes go here.
    auto_map_defaults = {"AutoConfig": "configuration_vqgan.VqganConfig", "AutoModel": "modeling_vqgan.VqganModel"}

    image_size: int = 112
    num_channels: int = 3
    codebook_size: int = 8192
    hidden_size: int = 128
    channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: list[int] | tuple[int, ...] = (3,)
    z_channels: int = 256
    embed_dim: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        # Lists, as a JSON round trip gives them back, so saved and rebuilt configs compare equal.
        self.channel_multipliers = list(self.channel_multipliers)
        self.attention_levels = list(self.attention_levels)
        for name in ("image_size", "num_channels", "codebook_size", "hidden_size", "z_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"VqganConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"VqganConfig.num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(
                f"VqganConfig.channel_multipliers must be a non-empty list of positive integers, got "
                f"{self.channel_multipliers} (taming's vqgan_gumbel_f8: [1, 1, 2, 4])"
            )
        num_levels = len(self.channel_multipliers)
        if any(not 0 <= level < num_levels for level in self.attention_levels):
            raise ValueError(
                f"VqganConfig.attention_levels={self.attention_levels} must be level indices in [0, {num_levels - 1}] "
                f"(one level per entry of channel_multipliers)"
            )
        widths = {self.hidden_size} | {self.hidden_size * multiplier for multiplier in self.channel_multipliers}
        if self.norm_num_groups < 1 or any(width % self.norm_num_groups for width in widths):
            raise ValueError(
                f"VqganConfig.norm_num_groups={self.norm_num_groups} must divide every level's width {sorted(widths)}; "
                f"choose a hidden_size that is a multiple of it"
            )
        downsampling = 2 ** (num_levels - 1)
        if self.image_size % downsampling != 0:
            raise ValueError(
                f"VqganConfig.image_size={self.image_size} is not divisible by the encoder's downsampling factor "
                f"{downsampling} (= 2**(len(channel_multipliers)-1)); use e.g. "
                f"image_size={max(1, self.image_size // downsampling) * downsampling}"
            )
        super().__post_init__(**kwargs)
        complete_auto_map(self, self.auto_map_defaults)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the code grid."""
        return self.image_size // 2 ** (len(self.channel_multipliers) - 1)


__all__ = ["VqganConfig"]
