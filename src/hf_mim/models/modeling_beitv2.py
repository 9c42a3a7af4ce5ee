"""BEiT v2 masked image modeling: BEiT's token prediction plus patch aggregation (arXiv 2208.06366).

The targets are VQ-KD tokens (semantic codes distilled from CLIP). Besides the usual prediction from the last layer,
an aggregation head of two extra layers predicts the same masked tokens from the last layer's [CLS] token joined
with the patch tokens of an earlier layer; since those patches lack the later layers' work, the [CLS] token is
pushed to summarise the image. The head shares the backbone's relative position bias, final LayerNorm and LM head,
and is discarded after pre-training: only the backbone (`Beitv2Model`) goes on to fine-tuning.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.beit.modeling_beit import BeitLayer

from .beit_backbone import MimBeitModel, mark_output_projections
from .configuration_beitv2 import Beitv2Config
from .modeling_beit import BeitMimForMaskedImageModeling, BeitMimOutput, flatten_mask, masked_index, masked_targets


@dataclass
class Beitv2MimOutput(BeitMimOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `mim_loss + aggregation_loss`.
    mim_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Cross-entropy of the last layer's predictions of the masked tokens.
    aggregation_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Cross-entropy of the aggregation head's predictions of the masked tokens.
    aggregation_logits (`torch.FloatTensor` of shape `(num_masked, vocab_size)`):
        The aggregation head's token scores of the masked patches, in the order of `logits`.
    aggregation_accuracy (`torch.FloatTensor` of shape `()`, *optional*):
        Top-1 accuracy of `aggregation_logits`.
    """

    mim_loss: torch.FloatTensor | None = None
    aggregation_loss: torch.FloatTensor | None = None
    aggregation_logits: torch.FloatTensor | None = None
    aggregation_accuracy: torch.FloatTensor | None = None


class Beitv2PatchAggregation(nn.Module):
    """`head_layers` BEiT layers over [last-layer CLS ; patches after layer `early_layers`].

    They continue the backbone as layers `early_layers + 1, ...`: that is their stochastic-depth rate (on the
    backbone's linear schedule, extended if they reach past its depth) and their output-projection rescaling at
    initialisation, as in the reference.
    """

    def __init__(self, config: Beitv2Config):
        super().__init__()
        depth = max(config.num_hidden_layers, config.early_layers + config.head_layers)
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            BeitLayer(config, drop_path_rate=rates[config.early_layers + j]) for j in range(config.head_layers)
        )
        mark_output_projections(self.layers, first_layer_id=config.early_layers + 1)

    def forward(
        self,
        cls_token: torch.Tensor,
        early_patches: torch.Tensor,
        relative_position_bias: torch.Tensor | None,
        resolution: tuple[int, int],
    ) -> torch.Tensor:
        r"""
        Args:
            cls_token (`torch.FloatTensor` of shape `(batch_size, 1, hidden_size)`):
                The [CLS] token after the last backbone layer (before the final LayerNorm).
            early_patches (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
                The patch tokens after backbone layer `early_layers`.
            relative_position_bias (`torch.FloatTensor` of shape `(1, num_heads, 1 + num_patches, 1 + num_patches)`):
                The backbone's shared relative position bias, if it has one.
            resolution (`tuple[int, int]`):
                Height and width of the input images.
        """
        hidden_states = torch.cat([cls_token, early_patches], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=relative_position_bias, resolution=resolution)
        return hidden_states


class Beitv2Model(MimBeitModel):
    """The BEiT encoder of an `hf_mim_beitv2` checkpoint; what `AutoModel` loads (the aggregation head is left out)."""

    config: Beitv2Config
    config_class = Beitv2Config


class Beitv2ForMaskedImageModeling(BeitMimForMaskedImageModeling):
    """BEiT v2 pre-training: [`BeitMimForMaskedImageModeling`] plus the patch aggregation head; the loss is the sum
    of both branches' cross-entropies on the masked patches."""

    config: Beitv2Config
    config_class = Beitv2Config

    def __init__(self, config: Beitv2Config):
        super().__init__(config)
        self.patch_aggregation = Beitv2PatchAggregation(config)
        # The parent's post_init() ran before these layers existed; a second call initialises only what is new.
        self.post_init()

    def shared_relative_position_bias(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The backbone's shared relative position bias for `pixel_values`' size (None if it has none)."""
        if self.beit.shared_position_bias is None:
            return None
        height, width = pixel_values.shape[2:]
        window_size = (height // self.config.patch_size, width // self.config.patch_size)
        return self.beit.shared_position_bias(window_size, dim_size=self.num_patches + 1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        tokenizer_pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool = True,
        num_masked: int | None = None,
        **kwargs,
    ) -> Beitv2MimOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            Which patches are replaced by the mask token and predicted.
        tokenizer_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
            The tokenizer's view of the same crop (224 px in [0, 1] for VQ-KD); targets are computed from it
            unless `labels` are given.
        labels (`torch.LongTensor` of shape `(batch_size, num_patches)` or `(num_masked,)`, *optional*):
            Target token ids, for all patches or for the masked ones only.
        return_loss (`bool`, *optional*, defaults to `True`):
            Tells `Trainer` that this model computes its loss without a `labels` input.
        num_masked (`int`, *optional*):
            The number of patches that every image of the batch masks, when it is the same for all (see
            [`BeitMimForMaskedImageModeling.forward`]): static shapes, no device synchronisation.
        """
        bool_masked_pos = flatten_mask(bool_masked_pos, self.num_patches)
        index = masked_index(bool_masked_pos, num_masked)
        if labels is None and tokenizer_pixel_values is not None:
            labels = self.get_targets(tokenizer_pixel_values)
        return_hidden_states = kwargs.pop("output_hidden_states", False)
        outputs = self.forward_features(pixel_values, bool_masked_pos, output_hidden_states=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        # hidden_states[0] is the embedding output, hidden_states[l] the output of layer l.
        early_patches = outputs.hidden_states[self.config.early_layers][:, 1:]
        aggregated = self.patch_aggregation(
            hidden_states[:, :1],
            early_patches,
            self.shared_relative_position_bias(pixel_values),
            tuple(pixel_values.shape[2:]),
        )
        logits = self.forward_head(hidden_states, bool_masked_pos, index)
        aggregation_logits = self.forward_head(aggregated, bool_masked_pos, index)

        loss = mim_loss = aggregation_loss = masked_labels = accuracy = aggregation_accuracy = None
        if labels is not None:
            masked_labels = masked_targets(labels, bool_masked_pos, logits.shape[0], index)
            mim_loss, accuracy = self.token_loss(logits, masked_labels)
            aggregation_loss, aggregation_accuracy = self.token_loss(aggregation_logits, masked_labels)
            loss = mim_loss + aggregation_loss
        return Beitv2MimOutput(
            loss=loss,
            logits=logits,
            labels=masked_labels,
            masked_accuracy=accuracy,
            hidden_states=outputs.hidden_states if return_hidden_states else None,
            attentions=outputs.attentions,
            mim_loss=mim_loss,
            aggregation_loss=aggregation_loss,
            aggregation_logits=aggregation_logits,
            aggregation_accuracy=aggregation_accuracy,
        )


__all__ = ["Beitv2ForMaskedImageModeling", "Beitv2MimOutput", "Beitv2Model", "Beitv2PatchAggregation"]
