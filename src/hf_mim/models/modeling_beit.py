"""BEiT masked image modeling: predict the visual tokens of masked patches (arXiv 2106.08254).

The backbone is transformers' `BeitModel` (shared relative position bias, layer scale, mask
token). Unlike transformers' `BeitForMaskedImageModeling`, the LM head runs only on masked
positions (projecting all 196 tokens to 8192 logits is wasted work), and the model holds its
frozen tokenizer, so a batch of pixels is all it needs. The tokenizer families it can hold are those of the family
block below, which a checkpoint's copy narrows to its own (see configuration_beit.py).
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.beit.modeling_beit import BeitPreTrainedModel
from transformers.utils import ModelOutput

from .beit_backbone import BeitReferenceInitMixin, MimBeitModel
from .configuration_beit import BeitMimConfig, tokenizer_config_from_dict
from .configuration_common import HUB_TAGS, decoder_left_out

# Tokenizer families (rewritten per checkpoint, see the module docstring):
from .modeling_dvae import DvaeModel
from .modeling_feature_kmeans import FeatureKmeansModel
from .modeling_kmeans import KmeansModel
from .modeling_vqgan import VqganModel
from .modeling_vqkd import VqkdModel

TOKENIZER_MODEL_CLASSES = (DvaeModel, FeatureKmeansModel, KmeansModel, VqganModel, VqkdModel)
# End of the tokenizer families.

# model_type -> (config class, model class) of the tokenizers this code serves.
TOKENIZER_CLASSES = {model.config_class.model_type: (model.config_class, model) for model in TOKENIZER_MODEL_CLASSES}


def build_tokenizer(config_dict: dict):
    """A randomly initialised, frozen tokenizer in eval mode; load weights into it afterwards."""
    config = tokenizer_config_from_dict(config_dict)
    tokenizer = TOKENIZER_CLASSES[config.model_type][1](config)
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


@dataclass
class BeitMimOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Cross-entropy of the predicted tokens of the masked patches.
    logits (`torch.FloatTensor` of shape `(num_masked, vocab_size)`):
        Token scores of the masked patches only, in row-major (batch, position) order.
    labels (`torch.LongTensor` of shape `(num_masked,)`, *optional*):
        Target token ids of the masked patches, in the same order as `logits`.
    masked_accuracy (`torch.FloatTensor` of shape `()`, *optional*):
        Top-1 accuracy of `logits` against `labels`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    masked_accuracy: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def flatten_mask(bool_masked_pos: torch.Tensor | None, num_patches: int) -> torch.BoolTensor:
    """`bool_masked_pos` as a `(batch_size, num_patches)` bool tensor; accepts `(batch, H, W)` grids too."""
    if bool_masked_pos is None:
        raise ValueError("Masked image modeling needs `bool_masked_pos` (the data collator produces it)")
    bool_masked_pos = bool_masked_pos.flatten(1).bool()
    if bool_masked_pos.shape[1] != num_patches:
        raise ValueError(
            f"bool_masked_pos has {bool_masked_pos.shape[1]} positions per image but the model has "
            f"{num_patches} patches; build the mask generator for the model's patch grid"
        )
    return bool_masked_pos


def masked_first(bool_masked_pos: torch.BoolTensor) -> torch.LongTensor:
    """Each image's positions `(batch_size, num_patches)` with its masked ones first, each group in increasing order:
    the first `k` columns of an image that masks `k` patches are the positions boolean indexing selects, in its order
    (the sort is stable)."""
    return torch.argsort((~bool_masked_pos).byte(), dim=1, stable=True)


def masked_index(bool_masked_pos: torch.BoolTensor, num_masked: int | None) -> torch.LongTensor | None:
    """The masked positions `(batch_size, num_masked)` of each image, when the caller says that every image masks
    exactly `num_masked` patches (exact mask generators); None when it does not say (`num_masked=None`).

    Gathers through these positions have shapes known on the host, unlike boolean-mask gathers, whose size the device
    must report back (a synchronisation per gather, and a data-dependent shape `torch.compile` cannot trace whole).
    """
    if num_masked is None:
        return None
    # Checked on the device, in order with the step: a host check would be the synchronisation this path avoids.
    torch._assert_async(
        (bool_masked_pos.sum(dim=1) == num_masked).all(),
        f"every image was said to mask {num_masked} patches (num_masked), but one of the batch masks another number",
    )
    return masked_first(bool_masked_pos)[:, :num_masked]


def gather_masked(values: torch.Tensor, bool_masked_pos: torch.BoolTensor, index: torch.LongTensor | None):
    """`values[bool_masked_pos]`: the rows `(num_masked, ...)` of the masked positions of `values`
    `(batch_size, num_patches, ...)`, in row-major (batch, position) order; through `index` (`masked_index`) if given."""
    if index is None:
        return values[bool_masked_pos]
    index = index.reshape(*index.shape, *[1] * (values.ndim - 2))
    return torch.take_along_dim(values, index, dim=1).flatten(0, 1)


def masked_targets(
    labels: torch.Tensor, bool_masked_pos: torch.BoolTensor, num_masked: int, index: torch.LongTensor | None = None
) -> torch.LongTensor:
    """Target ids of the `num_masked` masked patches from per-patch `(batch, num_patches)` ids or already-selected
    `(num_masked,)` ones; `num_masked` is the row count of the logits, known on the host once they exist."""
    if labels.shape == bool_masked_pos.shape:
        return gather_masked(labels, bool_masked_pos, index)
    if labels.ndim == 1 and labels.shape[0] == num_masked:
        return labels
    raise ValueError(
        f"labels of shape {tuple(labels.shape)} fit neither the mask {tuple(bool_masked_pos.shape)} "
        f"nor the {num_masked} masked positions"
    )


def target_precision(config, tokenizer_pixel_values: torch.Tensor):
    """The context in which the frozen tokenizer computes targets: float32 whatever the step's autocast, unless
    `config.tokenizer_autocast` lets it run under that autocast (faster, not equal to fp32's targets)."""
    if getattr(config, "tokenizer_autocast", False):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tokenizer_pixel_values.device.type, enabled=False)


class BeitMimPreTrainedModel(BeitReferenceInitMixin, BeitPreTrainedModel):
    config: BeitMimConfig
    config_class = BeitMimConfig

    def post_init(self):
        super().post_init()
        # Per instance: transformers' add_model_tags appends to the list.
        self.model_tags = list(HUB_TAGS)


class BeitMimModel(MimBeitModel):
    """The BEiT encoder of an `hf_mim_beit` checkpoint; what `AutoModel` loads."""

    config: BeitMimConfig
    config_class = BeitMimConfig


class BeitMimForMaskedImageModeling(BeitMimPreTrainedModel):
    """BEiT pre-training. Other token-prediction methods (BEiT v2, CCViT, mc-BEiT) subclass it and reuse
    `forward_features`, `forward_head` and the frozen tokenizer."""

    def __init__(self, config: BeitMimConfig):
        super().__init__(config)
        self.beit = BeitMimModel(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.tokenizer = build_tokenizer(config.tokenizer_config) if config.tokenizer_config is not None else None
        self.post_init()

    def post_init(self):
        super().post_init()
        # transformers hands the encoder's ignore patterns (heads and tokenizer stay behind when the encoder loads
        # alone) up to this model; here those weights are the model's own, and a stray one must be reported.
        self._keys_to_ignore_on_load_unexpected -= set(MimBeitModel._keys_to_ignore_on_load_unexpected)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # (model, loading info) with `output_loading_info=True`.
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading replaces parameters with new trainable ones; the tokenizer is a fixed target function and must
        # stay out of the optimiser (and out of DDP's gradient reduction, where an unused trainable parameter fails).
        if model.tokenizer is not None:
            model.tokenizer.requires_grad_(False)
        return loaded

    @property
    def num_patches(self) -> int:
        return self.beit.embeddings.patch_embeddings.num_patches

    def set_tokenizer(self, tokenizer) -> None:
        """Copy the weights of a trained tokenizer (of the family and size in `config.tokenizer_config`).

        A standalone tokenizer carries its decoder; when this model's tokenizer was built without one, the decoder's
        weights are left behind and every other weight must match.
        """
        if self.tokenizer is None:
            raise ValueError("This model was configured without a tokenizer; set config.tokenizer_config first")
        if type(tokenizer) is not type(self.tokenizer):
            raise ValueError(f"Expected a {type(self.tokenizer).__name__}, got {type(tokenizer).__name__}")
        state = tokenizer.state_dict()
        if decoder_left_out(self.tokenizer.config):
            decoder_modules = type(self.tokenizer).decoder_modules
            state = {key: value for key, value in state.items() if key.split(".")[0] not in decoder_modules}
        self.tokenizer.load_state_dict(state)

    def train(self, mode: bool = True):
        super().train(mode)
        # The tokenizer is a fixed target function: no dropout, no statistics updates.
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    @torch.no_grad()
    def get_targets(self, tokenizer_pixel_values: torch.Tensor) -> torch.LongTensor:
        """Token ids `(batch_size, num_patches)` of the tokenizer's view."""
        if self.tokenizer is None:
            raise ValueError("No tokenizer configured: pass `labels` (token ids) instead of `tokenizer_pixel_values`")
        with target_precision(self.config, tokenizer_pixel_values):
            return self.tokenizer.get_codebook_indices(tokenizer_pixel_values)

    def forward_features(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor, **kwargs):
        """Backbone outputs with masked patches replaced by the mask token (pre-final-norm hidden states)."""
        return self.beit(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)

    def forward_head(
        self, hidden_states: torch.Tensor, bool_masked_pos: torch.BoolTensor, index: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """Token logits `(num_masked, vocab_size)` of the masked patches of `hidden_states` `(batch, 1 + N, D)`;
        `index` is `masked_index`'s, if known."""
        # LayerNorm is per token, so normalising only the masked tokens is exact and cheaper.
        return self.lm_head(self.layernorm(gather_masked(hidden_states[:, 1:], bool_masked_pos, index)))

    @staticmethod
    def token_loss(logits: torch.Tensor, masked_labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (in fp32, also under autocast) and top-1 accuracy of masked-token predictions."""
        loss = nn.functional.cross_entropy(logits.float(), masked_labels)
        accuracy = (logits.detach().argmax(-1) == masked_labels).float().mean()
        return loss, accuracy

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        tokenizer_pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool = True,
        num_masked: int | None = None,
        **kwargs,
    ) -> BeitMimOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            Which patches are replaced by the mask token and predicted.
        tokenizer_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
            The tokenizer's view of the same crop (e.g. 112 px for the dVAE); targets are computed from it
            unless `labels` are given.
        labels (`torch.LongTensor` of shape `(batch_size, num_patches)` or `(num_masked,)`, *optional*):
            Target token ids, for all patches or for the masked ones only.
        return_loss (`bool`, *optional*, defaults to `True`):
            Tells `Trainer` that this model computes its loss without a `labels` input.
        num_masked (`int`, *optional*):
            The number of patches that every image of the batch masks, when it is the same for all (exact mask
            generators). Gathers then have static shapes: the step needs no device synchronisation and compiles
            whole (`torch.compile(fullgraph=True)`). A batch that breaks the promise fails on the device.
        """
        bool_masked_pos = flatten_mask(bool_masked_pos, self.num_patches)
        if labels is None and tokenizer_pixel_values is not None:
            labels = self.get_targets(tokenizer_pixel_values)
        index = masked_index(bool_masked_pos, num_masked)
        outputs = self.forward_features(pixel_values, bool_masked_pos, **kwargs)
        logits = self.forward_head(outputs.last_hidden_state, bool_masked_pos, index)

        loss = masked_labels = accuracy = None
        if labels is not None:
            masked_labels = masked_targets(labels, bool_masked_pos, logits.shape[0], index)
            loss, accuracy = self.token_loss(logits, masked_labels)
        return BeitMimOutput(
            loss=loss,
            logits=logits,
            labels=masked_labels,
            masked_accuracy=accuracy,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "TOKENIZER_CLASSES",
    "TOKENIZER_MODEL_CLASSES",
    "BeitMimForMaskedImageModeling",
    "BeitMimModel",
    "BeitMimOutput",
    "BeitMimPreTrainedModel",
    "build_tokenizer",
    "flatten_mask",
    "gather_masked",
    "masked_first",
    "masked_index",
    "masked_targets",
    "target_precision",
]
