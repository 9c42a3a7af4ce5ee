"""Shared pieces of the BEiT backbone used by every hf_mim model.

Encoders are transformers' own `BeitModel`, so a pretrained encoder exports to a stock
transformers BEiT checkpoint. What transformers does not provide is BEiT's *pre-training*
initialisation (unilm `modeling_pretrain.py`), which differs from `BeitPreTrainedModel`'s:
weights and tokens are drawn from N(0, 0.02²) truncated to [-0.02, 0.02], and the output
projections of layer l (1-indexed) are divided by sqrt(2l) so the residual stream does not grow
with depth at initialisation.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.beit.modeling_beit import (
    BeitEmbeddings,
    BeitLayer,
    BeitModel,
    BeitRelativePositionBias,
)

from .configuration_common import HUB_TAGS


def trunc_normal_beit_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BEiT's pre-training initialiser: N(0, std²) truncated at ±std (±1σ, not timm's default ±2 absolute)."""
    return init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def trunc_normal_timm_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """The reference fine-tuning ViT's initialiser (timm's default bounds, ±2 absolute): for std 0.02, a normal."""
    return init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


def mark_output_projections(layers: nn.ModuleList, first_layer_id: int = 1) -> None:
    """Record on `o_proj` and `mlp.fc2` of the i-th layer of `layers` its depth `first_layer_id + i`.

    `init_beit_weights` divides those weights by sqrt(2 * depth). The depth is stored on the Linear
    itself because transformers only calls `_init_weights` on modules that own parameters, so no
    parent module gets a chance to rescale its children. Call this before `post_init()`. Extra blocks
    that continue a backbone (BEiT v2's patch aggregation, CCViT's pixel branch) are rescaled as the
    layers they follow, so pass the depth at which they start.
    """
    for offset, layer in enumerate(layers):
        layer.attention.o_proj.beit_depth = first_layer_id + offset
        layer.mlp.fc2.beit_depth = first_layer_id + offset


@torch.no_grad()
def init_beit_weights(module: nn.Module, config, trunc_normal_=trunc_normal_beit_) -> None:
    """BEiT's pre-training initialisation of one module; call from a model's `_init_weights`. `trunc_normal_`
    draws every weight, token and position embedding (`trunc_normal_timm_`: the reference fine-tuning ViT's)."""
    std = config.initializer_range
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std)
        depth = getattr(module, "beit_depth", None)
        # A weight loaded from a checkpoint carries this flag and must keep its values.
        if depth is not None and not getattr(module.weight, "_is_hf_initialized", False):
            module.weight.div_(math.sqrt(2.0 * depth))
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, BeitEmbeddings):
        trunc_normal_(module.cls_token, std)
        if module.mask_token is not None:
            trunc_normal_(module.mask_token, std)
        if module.position_embeddings is not None:
            trunc_normal_(module.position_embeddings, std)
    elif isinstance(module, BeitRelativePositionBias):
        init.zeros_(module.relative_position_bias_table)
    elif isinstance(module, BeitLayer):
        if isinstance(module.lambda_1, nn.Parameter):
            init.constant_(module.lambda_1, config.layer_scale_init_value)
            init.constant_(module.lambda_2, config.layer_scale_init_value)


class DeviceRelativePositionBias(BeitRelativePositionBias):
    """transformers' `BeitRelativePositionBias` with its position index kept on the table's device.

    transformers indexes the table with an index it builds (and caches) on the CPU, so every use on a GPU copies it
    from pageable memory, which waits for the GPU: a synchronisation per layer and step, forward and backward. This
    copies it once per device. At the table's own window size it also skips resampling the table to that size (the
    identity). Other sizes, and traced graphs (where the index is a constant), take transformers' path.
    """

    def forward(self, window_size, interpolate_pos_encoding: bool = False, dim_size=None) -> torch.Tensor:
        window_size = tuple(window_size)
        area = window_size[0] * window_size[1] + 1
        resized = interpolate_pos_encoding and dim_size is not None and dim_size != area
        if torch.compiler.is_compiling() or window_size != tuple(self.window_size) or resized:
            return super().forward(window_size, interpolate_pos_encoding, dim_size=dim_size)
        table = self.relative_position_bias_table
        cached = getattr(self, "_device_index", None)
        if cached is None or cached.device != table.device:
            cached = self.generate_relative_position_index(window_size).view(-1).to(table.device)
            self._device_index = cached
        return table[cached].view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def keep_position_index_on_device(model: nn.Module) -> None:
    """Replace every transformers `BeitRelativePositionBias` of `model` by a [`DeviceRelativePositionBias`] holding
    the same table (parameter names, values and exports are unchanged)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is BeitRelativePositionBias:
                replacement = DeviceRelativePositionBias.__new__(DeviceRelativePositionBias)
                nn.Module.__init__(replacement)
                replacement.window_size = child.window_size
                replacement.num_relative_distance = child.num_relative_distance
                replacement.relative_position_bias_table = child.relative_position_bias_table
                replacement.train(child.training)
                setattr(parent, name, replacement)


class BeitReferenceInitMixin:
    """Gives a `PreTrainedModel` BEiT's pre-training initialisation."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_beit_weights(module, self.config)


class MimBeitModel(BeitReferenceInitMixin, BeitModel):
    """transformers' `BeitModel` with BEiT's pre-training initialisation.

    Each hf_mim family subclasses it only to bind its own config class, which the Auto classes
    require; the weights keep `BeitModel`'s names, so they export to stock transformers as they are.
    """

    # A MIM checkpoint stores its pre-training heads and frozen tokenizer beside the encoder; `AutoModel` loading
    # the encoder alone leaves them behind by design, so they are not reported as unexpected weights.
    _keys_to_ignore_on_load_unexpected = [
        r"^(layernorm|lm_head|patch_aggregation|pixel_head|pixel_layernorm|tokenizer)\.",
    ]

    def __init__(self, config, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)

    def post_init(self):
        # `BeitModel.__init__` ends with `post_init()`; the layers exist by then and must be marked first.
        mark_output_projections(self.layers)
        keep_position_index_on_device(self)
        super().post_init()
        # Per instance: transformers' add_model_tags appends to the list.
        self.model_tags = list(HUB_TAGS)


__all__ = [
    "BeitReferenceInitMixin",
    "DeviceRelativePositionBias",
    "MimBeitModel",
    "init_beit_weights",
    "keep_position_index_on_device",
    "mark_output_projections",
    "trunc_normal_beit_",
    "trunc_normal_timm_",
]
