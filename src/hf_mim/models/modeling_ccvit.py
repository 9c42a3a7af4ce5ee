"""CCViT masked image modeling: centroid-centred tokens and pixels (Centroid-centered Modeling, arXiv 2303.04664).

The tokenizer is k-means: a patch's token is its nearest centroid of raw pixel patches. The input is corrupted two
ways, both predicted: blockwise masking (mask token) and centroid replacement, where some further visible patches
are overwritten by the pixels of their own centroid. The backbone predicts the token of every corrupted patch
(cross-entropy), and BEiT v2's head over [last-layer CLS ; early-layer patches] reconstructs their original,
per-patch-normalised pixels (mean squared error). Only the backbone (`CcvitModel`) goes on to fine-tuning.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .beit_backbone import MimBeitModel
from .configuration_ccvit import CcvitConfig
from .modeling_beit import BeitMimOutput, flatten_mask, gather_masked, masked_index
from .modeling_beitv2 import Beitv2ForMaskedImageModeling
from .modeling_kmeans import patchify
from .modeling_tokenizer import host_scalars, input_checked_on_host


@dataclass
class CcvitMimOutput(BeitMimOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `token_loss + pixel_loss`.
    logits (`torch.FloatTensor` of shape `(num_corrupted, vocab_size)`):
        Token scores of the corrupted (masked or replaced) patches, in row-major (batch, position) order.
    labels (`torch.LongTensor` of shape `(num_corrupted,)`):
        Centroid ids of the original corrupted patches, in the same order.
    masked_accuracy (`torch.FloatTensor` of shape `()`):
        Top-1 accuracy of `logits` against `labels` (over masked and replaced patches).
    token_loss (`torch.FloatTensor` of shape `()`):
        Cross-entropy of the predicted tokens of the corrupted patches.
    pixel_loss (`torch.FloatTensor` of shape `()`):
        Mean squared error of the reconstructed pixels of the corrupted patches.
    pixel_predictions (`torch.FloatTensor` of shape `(num_corrupted, num_channels * patch_size**2)`):
        Reconstructed patches, flattened (C, py, px), normalised per patch if `config.norm_pixel_targets`.
    """

    token_loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    pixel_predictions: torch.FloatTensor | None = None


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (last dimension) standardised by its own mean and unbiased variance, `(x - mean) / sqrt(var + eps)`
    (CCViT's pixel targets)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class CcvitModel(MimBeitModel):
    """The BEiT encoder of an `hf_mim_ccvit` checkpoint; what `AutoModel` loads (the pixel branch is left out)."""

    config: CcvitConfig
    config_class = CcvitConfig


class CcvitForMaskedImageModeling(Beitv2ForMaskedImageModeling):
    """CCViT pre-training: the backbone predicts the centroid ids of masked and replaced patches, and BEiT v2's
    patch-aggregation layers, with their own LayerNorm and a linear pixel head, reconstruct their pixels.

    It takes the raw [0, 1] view of [`KmeansImageProcessor`] as `pixel_values` and normalises it itself, after
    replacing patches by centroid pixels (centroids live in [0, 1] pixel space).
    """

    config: CcvitConfig
    config_class = CcvitConfig

    def __init__(self, config: CcvitConfig):
        super().__init__(config)
        self.pixel_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pixel_head = nn.Linear(config.hidden_size, self.tokenizer.config.patch_dim)
        # The parents' post_init() ran before these modules existed; a further call initialises only what is new.
        self.post_init()

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels normalised with `config.image_mean` and `config.image_std`."""
        # Filled on the device: a tensor of host values is a copy from pageable memory, which waits for the GPU.
        mean, std = (
            torch.stack([pixel_values.new_full((), value) for value in values]).view(1, -1, 1, 1)
            for values in (self.config.image_mean, self.config.image_std)
        )
        return (pixel_values - mean) / std

    @torch.no_grad()
    def corrupt(
        self, pixel_values: torch.Tensor, bool_replaced_pos: torch.BoolTensor, labels: torch.LongTensor
    ) -> torch.Tensor:
        """The normalised ViT input: patches at `bool_replaced_pos` replaced by their centroid's pixels."""
        return self.normalize_pixels(self.tokenizer.replace_patches(pixel_values, bool_replaced_pos, labels))

    @torch.no_grad()
    def get_pixel_targets(
        self, pixel_values: torch.Tensor, bool_corrupted_pos: torch.BoolTensor, index: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """The original patches `(num_corrupted, patch_dim)` at `bool_corrupted_pos` (through `masked_index`'s
        `index`, if known), normalised per patch if `config.norm_pixel_targets`."""
        patches = gather_masked(patchify(pixel_values.float(), self.config.patch_size), bool_corrupted_pos, index)
        return normalize_patches(patches) if self.config.norm_pixel_targets else patches

    def forward_pixel_head(
        self, hidden_states: torch.Tensor, bool_corrupted_pos: torch.BoolTensor, index: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """Reconstructed patches `(num_corrupted, patch_dim)` from the branch's output `(batch, 1 + N, D)`."""
        return self.pixel_head(self.pixel_layernorm(gather_masked(hidden_states[:, 1:], bool_corrupted_pos, index)))

    def _check_inputs(self, pixel_values: torch.Tensor, bool_masked_pos, bool_replaced_pos):
        bool_masked_pos = flatten_mask(bool_masked_pos, self.num_patches)
        if bool_replaced_pos is None:
            bool_replaced_pos = torch.zeros_like(bool_masked_pos)
        bool_replaced_pos = bool_replaced_pos.flatten(1).bool()
        if bool_replaced_pos.shape != bool_masked_pos.shape:
            raise ValueError(
                f"bool_replaced_pos has shape {tuple(bool_replaced_pos.shape)} but bool_masked_pos "
                f"{tuple(bool_masked_pos.shape)}; both mark positions of the same patch grid"
            )
        if torch.compiler.is_compiling():
            # The checks read values back to the host, which a compiled step must not do; the eager step checks.
            return bool_masked_pos, bool_replaced_pos
        if not input_checked_on_host(self, pixel_values):
            low, high = torch.aminmax(pixel_values)
            valid = (low >= -1e-3) & (high <= 1 + 1e-3) & ~(bool_masked_pos & bool_replaced_pos).any()
            torch._assert_async(valid, "CCViT takes raw [0, 1] pixels and replaced patches that are not masked")
            return bool_masked_pos, bool_replaced_pos
        # One device synchronisation for both bounds and the overlap.
        low, high, overlap = host_scalars(*torch.aminmax(pixel_values), (bool_masked_pos & bool_replaced_pos).any())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"CCViT takes raw [0, 1] pixels (the KmeansImageProcessor view) and normalises them itself after "
                f"centroid replacement, but pixel_values lie in [{low:.3g}, {high:.3g}]; do not normalise them"
            )
        if overlap:
            raise ValueError(
                "bool_replaced_pos overlaps bool_masked_pos; replaced patches must be visible ones (draw them with "
                "hf_mim.data.ReplacementPositionGenerator, given the mask)"
            )
        return bool_masked_pos, bool_replaced_pos

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        bool_replaced_pos: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool = True,
        num_masked: int | None = None,
        num_replaced: int | None = None,
        **kwargs,
    ) -> CcvitMimOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The raw [0, 1] view of [`KmeansImageProcessor`]; normalised inside, after centroid replacement.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            Patches replaced by the mask token.
        bool_replaced_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Visible patches whose pixels are replaced by their centroid's (disjoint from `bool_masked_pos`).
        labels (`torch.LongTensor` of shape `(batch_size, num_patches)`, *optional*):
            Centroid ids of all patches, if already computed; by default the tokenizer computes them.
        return_loss (`bool`, *optional*, defaults to `True`):
            Tells `Trainer` that this model computes its loss without a `labels` input.
        num_masked (`int`, *optional*):
            The number of patches that every image of the batch masks, when it is the same for all (see
            [`BeitMimForMaskedImageModeling.forward`]); with `num_replaced` (0 without `bool_replaced_pos`), the
            gathers of corrupted patches have static shapes and need no device synchronisation.
        num_replaced (`int`, *optional*):
            The number of patches that every image of the batch replaces, when it is the same for all.
        """
        if bool_replaced_pos is None and num_replaced is None:
            num_replaced = 0
        bool_masked_pos, bool_replaced_pos = self._check_inputs(pixel_values, bool_masked_pos, bool_replaced_pos)
        if labels is None:
            labels = self.get_targets(pixel_values)
        if labels.shape != bool_masked_pos.shape:
            raise ValueError(
                f"labels must hold the centroid id of every patch, shape {tuple(bool_masked_pos.shape)}, got "
                f"{tuple(labels.shape)} (replacement needs the ids of the replaced patches)"
            )
        bool_corrupted_pos = bool_masked_pos | bool_replaced_pos
        known = num_masked is not None and num_replaced is not None
        index = masked_index(bool_corrupted_pos, num_masked + num_replaced if known else None)
        return_hidden_states = kwargs.pop("output_hidden_states", False)
        outputs = self.forward_features(
            self.corrupt(pixel_values, bool_replaced_pos, labels), bool_masked_pos, output_hidden_states=True, **kwargs
        )
        hidden_states = outputs.last_hidden_state
        branch = self.patch_aggregation(
            hidden_states[:, :1],
            # hidden_states[0] is the embedding output, hidden_states[l] the output of layer l.
            outputs.hidden_states[self.config.early_layers][:, 1:],
            self.shared_relative_position_bias(pixel_values),
            tuple(pixel_values.shape[2:]),
        )
        logits = self.forward_head(hidden_states, bool_corrupted_pos, index)
        pixel_predictions = self.forward_pixel_head(branch, bool_corrupted_pos, index)

        corrupted_labels = gather_masked(labels, bool_corrupted_pos, index)
        token_loss, accuracy = self.token_loss(logits, corrupted_labels)
        pixel_loss = nn.functional.mse_loss(
            pixel_predictions.float(), self.get_pixel_targets(pixel_values, bool_corrupted_pos, index)
        )
        return CcvitMimOutput(
            loss=token_loss + pixel_loss,
            logits=logits,
            labels=corrupted_labels,
            masked_accuracy=accuracy,
            hidden_states=outputs.hidden_states if return_hidden_states else None,
            attentions=outputs.attentions,
            token_loss=token_loss,
            pixel_loss=pixel_loss,
            pixel_predictions=pixel_predictions,
        )


__all__ = ["CcvitForMaskedImageModeling", "CcvitMimOutput", "CcvitModel", "normalize_patches"]
