"""The encoder of a taming-transformers Gumbel VQGAN (Esser et al. 2021, arXiv 2012.09841) as an hf_mim tokenizer.

mc-BEiT takes its soft targets from taming's `vqgan_gumbel_f8` (OpenImages, 8192 codes): a 112x112 view in [-1, 1]
goes through the convolutional encoder, `quant_conv` and the Gumbel quantiser's 1x1 projection, which scores every
code at each of the 14x14 positions. Only these logits are used (no Gumbel noise, no codebook lookup), so this is the
encoder half of the VQGAN, for inference; there is no pixel decoder (`decode` raises).

Module and parameter names follow taming's (`encoder.down.0.block.0.conv1.weight`, ...) so released checkpoints
convert by renaming one prefix (`hf_mim.convert.taming`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_vqgan import VqganConfig
from .modeling_tokenizer import MimTokenizerPreTrainedModel


@dataclass
class VqganOutput(ModelOutput):
    r"""
    logits (`torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`):
        Code logits of every grid position, row-major.
    """

    logits: torch.FloatTensor | None = None


def vqgan_group_norm(config: VqganConfig, num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_num_groups, num_channels, eps=config.norm_eps, affine=True)


class VqganResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus the input (through a 1x1 convolution when the width changes)."""

    def __init__(self, config: VqganConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = vqgan_group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vqgan_group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(F.silu(self.norm1(hidden_states)))
        residual = self.conv2(F.silu(self.norm2(residual)))
        shortcut = hidden_states if self.nin_shortcut is None else self.nin_shortcut(hidden_states)
        return shortcut + residual


class VqganAttention(nn.Module):
    """Single-head self-attention over the positions of a feature map, 1x1 convolutions for q, k, v and output."""

    def __init__(self, config: VqganConfig, channels: int):
        super().__init__()
        self.norm = vqgan_group_norm(config, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = hidden_states.shape
        normed = self.norm(hidden_states)
        # (batch, 1 head, positions, channels); the default 1/sqrt(channels) scale is taming's.
        query, key, value = (
            projection(normed).reshape(batch_size, 1, channels, height * width).transpose(2, 3)
            for projection in (self.q, self.k, self.v)
        )
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(2, 3).reshape(batch_size, channels, height, width)
        return hidden_states + self.proj_out(attended)


class VqganDownsample(nn.Module):
    """A stride-2 3x3 convolution after zero-padding one pixel right and bottom (halves even sizes exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1)))


class VqganEncoderLevel(nn.Module):
    """One resolution level: `num_res_blocks` ResNet blocks (each followed by attention on attention levels), then
    a downsampling unless it is the last level."""

    def __init__(self, config: VqganConfig, level: int, in_channels: int):
        super().__init__()
        out_channels = config.hidden_size * config.channel_multipliers[level]
        self.block = nn.ModuleList(
            VqganResnetBlock(config, in_channels if index == 0 else out_channels, out_channels)
            for index in range(config.num_res_blocks)
        )
        has_attention = level in config.attention_levels
        self.attn = nn.ModuleList(
            VqganAttention(config, out_channels) for _ in range(config.num_res_blocks if has_attention else 0)
        )
        is_last = level == len(config.channel_multipliers) - 1
        self.downsample = None if is_last else VqganDownsample(out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            hidden_states = block(hidden_states)
            if self.attn:
                hidden_states = self.attn[index](hidden_states)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        return hidden_states


class VqganMidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, config: VqganConfig, channels: int):
        super().__init__()
        self.block_1 = VqganResnetBlock(config, channels, channels)
        self.attn_1 = VqganAttention(config, channels)
        self.block_2 = VqganResnetBlock(config, channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(hidden_states)))


class VqganEncoder(nn.Module):
    """3x3 stem, the resolution levels, the mid block, GroupNorm-swish and a 3x3 projection to `z_channels`."""

    def __init__(self, config: VqganConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(config.num_channels, config.hidden_size, 3, padding=1)
        self.down = nn.ModuleList()
        channels = config.hidden_size
        for level, multiplier in enumerate(config.channel_multipliers):
            self.down.append(VqganEncoderLevel(config, level, channels))
            channels = config.hidden_size * multiplier
        self.mid = VqganMidBlock(config, channels)
        self.norm_out = vqgan_group_norm(config, channels)
        self.conv_out = nn.Conv2d(channels, config.z_channels, 3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for level in self.down:
            hidden_states = level(hidden_states)
        hidden_states = self.mid(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class VqganPreTrainedModel(MimTokenizerPreTrainedModel):
    config: VqganConfig
    config_class = VqganConfig
    base_model_prefix = "vqgan"
    _no_split_modules = ["VqganResnetBlock", "VqganAttention"]
    # Token ids are defined by the fp32 forward; loading in fp16/bf16 must not change which code wins.
    _keep_in_fp32_modules_strict = ["encoder", "quant_conv", "codebook_projection"]

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's default convolution initialisation, which taming trains from.
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class VqganModel(VqganPreTrainedModel):
    """The encoder of a Gumbel VQGAN: pixels in [-1, 1] -> code logits on a `grid_size x grid_size` grid.

    `codebook_projection` is taming's `quantize.proj`.
    """

    def __init__(self, config: VqganConfig):
        super().__init__(config)
        self.encoder = VqganEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.codebook_projection = nn.Conv2d(config.embed_dim, config.codebook_size, 1)
        self.post_init()

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Code logits in float32 (autocast disabled), as the released tokenizer defines its tokens.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`VqganImageProcessor`] view: pixels mapped to [-1, 1].

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        self.check_input(pixel_values)
        if self.codebook_projection.weight.dtype != torch.float32:
            raise ValueError(
                f"{type(self).__name__} computes tokens in float32 (half precision changes which code wins), but its "
                f"weights are {self.codebook_projection.weight.dtype}; call `.float()` on the tokenizer."
            )
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            logits = self.codebook_projection(self.quant_conv(self.encoder(pixel_values.float())))
        return logits.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> VqganOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`VqganImageProcessor`] view: pixels mapped to [-1, 1].
        """
        return VqganOutput(logits=self.get_codebook_logits(pixel_values))


__all__ = [
    "VqganAttention",
    "VqganDownsample",
    "VqganEncoder",
    "VqganEncoderLevel",
    "VqganMidBlock",
    "VqganModel",
    "VqganOutput",
    "VqganPreTrainedModel",
    "VqganResnetBlock",
]
