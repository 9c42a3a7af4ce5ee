"""mc-BEiT: masked image modeling towards multi-choice soft targets (arXiv 2203.15371).

BEiT trains a masked patch towards one token id, although several codes often describe a patch about equally well.
mc-BEiT's target is instead a distribution over the vocabulary: the tokenizer's softmax at a high temperature,
mixed with the distributions of the patches that the ViT itself currently sees as similar to it (cosine similarity
of its own final-LayerNorm features on the masked input). The backbone, mask token and LM head are BEiT's, and any
hf_mim tokenizer with code logits supplies the targets.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .beit_backbone import MimBeitModel
from .configuration_mcbeit import McBeitConfig
from .modeling_beit import (
    BeitMimForMaskedImageModeling,
    BeitMimOutput,
    flatten_mask,
    gather_masked,
    masked_first,
    masked_index,
    target_precision,
)
from .modeling_tokenizer import host_scalars


@dataclass
class McBeitOutput(BeitMimOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Cross-entropy of the predicted code distributions of the masked patches to their soft targets.
    logits (`torch.FloatTensor` of shape `(num_masked, vocab_size)`):
        Code scores of the masked patches only, in row-major (batch, position) order.
    labels (`torch.LongTensor` of shape `(num_masked,)`, *optional*):
        The tokenizer's hard ids (argmax of its logits) of the masked patches, in the order of `logits`.
    masked_accuracy (`torch.FloatTensor` of shape `()`, *optional*):
        Top-1 accuracy of `logits` against `labels`.
    soft_targets (`torch.FloatTensor` of shape `(num_masked, vocab_size)`, *optional*):
        The multi-choice targets of the masked patches (rows sum to 1), float32.
    """

    soft_targets: torch.FloatTensor | None = None


def soft_targets(
    tokenizer_logits: torch.Tensor,
    patch_features: torch.Tensor,
    target_temperature: float = 4.0,
    similarity_temperature: float = 1.0,
    similarity_weight: float = 0.2,
    detach_similarity_features: bool = False,
    bool_masked_pos: torch.BoolTensor | None = None,
    index: torch.LongTensor | None = None,
) -> torch.Tensor:
    r"""mc-BEiT's multi-choice targets `Q = omega * W @ P + (1 - omega) * P` of every patch, in float32.

    `P = softmax(tokenizer_logits / tau)` are the soft labels; `W = softmax(cos(f_i, f_j) / tau_s)` (rows over
    all patches `j` of the same image, itself included) spreads to each patch the soft labels of the patches whose
    features resemble its own.

    Args:
        tokenizer_logits (`torch.FloatTensor` of shape `(batch_size, num_patches, vocab_size)`):
            Code logits of the tokenizer's view, row-major over the patch grid.
        patch_features (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
            The student's final-LayerNorm features of all patches (visible and masked) of its masked input.
        target_temperature (`float`): tau. similarity_temperature (`float`): tau_s.
        similarity_weight (`float`): omega; 0 returns `P`.
        detach_similarity_features (`bool`): whether `W` stops the gradient into `patch_features`.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Compute only the rows of these patches (the loss needs no others): equal to `soft_targets(...)[mask]`,
            but only their rows of `W` and `W @ P` are formed, which at BEiT-style mask ratios is most of the cost.
        index (`torch.LongTensor` of shape `(batch_size, num_masked)`, *optional*):
            [`masked_index`] of `bool_masked_pos`, when every image masks the same number of patches: the rows are
            then chosen without reading the counts back to the host.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, num_patches, vocab_size)` whose rows sum to 1, or
        `(num_masked, vocab_size)` in row-major (batch, position) order with `bool_masked_pos`.
    """
    # Softmaxes of near-uniform rows lose their differences in half precision, whatever the autocast dtype.
    with torch.autocast(device_type=tokenizer_logits.device.type, enabled=False):
        probs = (tokenizer_logits.float() / target_temperature).softmax(dim=-1)
        if similarity_weight == 0:
            return probs if bool_masked_pos is None else gather_masked(probs, bool_masked_pos, index)
        features = patch_features.detach() if detach_similarity_features else patch_features
        features = F.normalize(features.float(), dim=-1)
        if bool_masked_pos is None:
            weights = (features @ features.transpose(1, 2) / similarity_temperature).softmax(dim=-1)
            return torch.baddbmm(probs, weights, probs, beta=1.0 - similarity_weight, alpha=similarity_weight)
        if index is None:
            # Each image's masked positions, in order, padded to the largest count.
            counts = bool_masked_pos.sum(dim=1)
            # One device synchronisation for the padded size and whether any image needs padding.
            fewest, most = (int(count) for count in host_scalars(counts.min(), counts.max()))
            rows = masked_first(bool_masked_pos)[:, :most]
        else:
            rows = index
            fewest = most = index.shape[1]
        query = torch.take_along_dim(features, rows[..., None], dim=1)
        weights = similarity_weight * (query @ features.transpose(1, 2) / similarity_temperature).softmax(dim=-1)
        # (1 - omega) * P_i enters the same product as weight on the patch's own row: no copy of P's masked rows.
        weights = weights.scatter_add(2, rows[..., None], weights.new_full((*rows.shape, 1), 1.0 - similarity_weight))
        targets = weights @ probs
        if fewest == most:
            return targets.flatten(0, 1)
        return targets[torch.arange(most, device=rows.device) < counts[:, None]]


class McBeitModel(MimBeitModel):
    """The BEiT encoder of an `hf_mim_mcbeit` checkpoint; what `AutoModel` loads."""

    config: McBeitConfig
    config_class = McBeitConfig


class McBeitForMaskedImageModeling(BeitMimForMaskedImageModeling):
    """mc-BEiT pre-training: [`BeitMimForMaskedImageModeling`] trained with soft cross-entropy towards
    [`soft_targets`] built from the frozen tokenizer's code logits."""

    config: McBeitConfig
    config_class = McBeitConfig

    @torch.no_grad()
    def get_tokenizer_logits(self, tokenizer_pixel_values: torch.Tensor) -> torch.Tensor:
        """Code logits `(batch_size, num_patches, vocab_size)` of the tokenizer's view, float32."""
        if self.tokenizer is None:
            raise ValueError("No tokenizer configured: pass `tokenizer_logits` instead of `tokenizer_pixel_values`")
        with target_precision(self.config, tokenizer_pixel_values):
            return self.tokenizer.get_codebook_logits(tokenizer_pixel_values).float()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        tokenizer_pixel_values: torch.Tensor | None = None,
        tokenizer_logits: torch.Tensor | None = None,
        return_loss: bool = True,
        num_masked: int | None = None,
        **kwargs,
    ) -> McBeitOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            Which patches are replaced by the mask token and predicted.
        tokenizer_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
            The tokenizer's view of the same crop (112 px in [-1, 1] for the VQGAN); the targets are computed from
            its code logits unless `tokenizer_logits` are given.
        tokenizer_logits (`torch.FloatTensor` of shape `(batch_size, num_patches, vocab_size)`, *optional*):
            Precomputed code logits of every patch, row-major over the patch grid.
        return_loss (`bool`, *optional*, defaults to `True`):
            Tells `Trainer` that this model computes its loss without a `labels` input.
        num_masked (`int`, *optional*):
            The number of patches that every image of the batch masks, when it is the same for all (see
            [`BeitMimForMaskedImageModeling.forward`]): static shapes, no device synchronisation.
        """
        if "labels" in kwargs:
            raise ValueError(
                "mc-BEiT learns from soft targets, which token ids cannot provide: pass `tokenizer_pixel_values` (or "
                "`tokenizer_logits`) instead of `labels`"
            )
        bool_masked_pos = flatten_mask(bool_masked_pos, self.num_patches)
        if tokenizer_logits is None and tokenizer_pixel_values is not None:
            tokenizer_logits = self.get_tokenizer_logits(tokenizer_pixel_values)
        index = masked_index(bool_masked_pos, num_masked)
        outputs = self.forward_features(pixel_values, bool_masked_pos, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.forward_head(hidden_states, bool_masked_pos, index)

        loss = labels = accuracy = targets = None
        if tokenizer_logits is not None:
            expected = (bool_masked_pos.shape[0], self.num_patches, self.config.vocab_size)
            if tuple(tokenizer_logits.shape) != expected:
                raise ValueError(
                    f"tokenizer_logits must have shape (batch_size, num_patches, vocab_size) = {expected}, got "
                    f"{tuple(tokenizer_logits.shape)}"
                )
            # The similarities need every patch's final feature, visible ones included; the head saw only the masked.
            patch_features = self.layernorm(hidden_states[:, 1:])
            targets = soft_targets(
                tokenizer_logits,
                patch_features,
                target_temperature=self.config.target_temperature,
                similarity_temperature=self.config.similarity_temperature,
                similarity_weight=self.config.similarity_weight,
                detach_similarity_features=self.config.detach_similarity_features,
                bool_masked_pos=bool_masked_pos,
                index=index,
            )
            loss = F.cross_entropy(logits.float(), targets)
            labels = gather_masked(tokenizer_logits.argmax(dim=-1), bool_masked_pos, index)
            accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
        return McBeitOutput(
            loss=loss,
            logits=logits,
            labels=labels,
            masked_accuracy=accuracy,
            soft_targets=targets,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["McBeitForMaskedImageModeling", "McBeitModel", "McBeitOutput", "soft_targets"]
