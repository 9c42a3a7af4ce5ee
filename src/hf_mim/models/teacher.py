"""A frozen vision model as a source of per-patch features: the teacher whose features VQ-KD distils (BEiT v2), and
whose feature centroids are the codebook of feature k-means.

The teacher is any transformers vision backbone with patch tokens (CLIP, DINOv2, ViT, an hf_mim encoder exported as a
transformers BEiT). It sees the tokenizer's [0, 1] view, resized so that its patch grid is the tokenizer's token grid
and normalised with the teacher's own statistics.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from .beit_backbone import keep_position_index_on_device

# [CLS], distillation and register tokens precede the patch tokens in transformers ViTs (DINOv2 with registers: 1 + 4).
# A sequence longer than the patch grid by more than this holds the patches of another grid.
MAX_PREFIX_TOKENS = 8


def teacher_patch_size(config) -> int | None:
    """The patch size of a vision model's config (of its `vision_config` for CLIP-like models), None without one."""
    config = getattr(config, "vision_config", None) or config
    patch_size = getattr(config, "patch_size", None)
    return patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size


class PatchFeatureTeacher(nn.Module):
    r"""A frozen vision model that turns a [0, 1] image batch into per-patch features `(batch_size, grid_size**2, dim)`.

    By default the features are the model's final ones; for CLIP (BEiT v2's teacher) that is the final LayerNorm
    applied to every token, followed by the visual projection when the model has one (`CLIPModel`,
    `CLIPVisionModelWithProjection`). `feature_layer` selects `hidden_states[feature_layer]` instead (without final
    norm or projection). Of a token sequence, the last `grid_size**2` tokens are the patch tokens ([CLS] and register
    tokens come first in every transformers ViT); a `(batch, channels, height, width)` feature map is average-pooled
    to the grid.

    Args:
        model (`PreTrainedModel`):
            The teacher, e.g. `CLIPVisionModelWithProjection`, `Dinov2Model`, `ViTModel`, `BeitModel`.
        image_mean, image_std (`tuple[float, float, float]`):
            The teacher's input normalisation (from its image processor).
        grid_size (`int`):
            Tokens per side of the tokenizer; the input is resized to `grid_size * patch_size` pixels when the
            teacher has a `patch_size`, so every teacher patch covers one token.
        feature_layer (`int`, *optional*):
            Index into the teacher's `hidden_states` (0 = embeddings); `None` for its final features.
    """

    def __init__(self, model: nn.Module, image_mean, image_std, grid_size: int, feature_layer: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        # A BEiT teacher (stock or exported from hf_mim) would copy its position index from the host at every call.
        keep_position_index_on_device(self.model)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.grid_size = grid_size
        self.feature_layer = feature_layer
        patch_size = teacher_patch_size(model.config)
        self.input_size = grid_size * patch_size if patch_size else None
        native_size = getattr(getattr(model.config, "vision_config", None) or model.config, "image_size", None)
        accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(self.backbone.forward).parameters
        self.interpolate = accepts_interpolation and self.input_size is not None and self.input_size != native_size

    # Properties rather than submodules: a module registered under two names would be saved twice.
    @property
    def backbone(self) -> nn.Module:
        """The vision tower: `vision_model` of CLIP-like models with a projection, else the model itself."""
        return self.model.vision_model if self.projection is not None else self.model

    @property
    def projection(self) -> nn.Module | None:
        return getattr(self.model, "visual_projection", None) if hasattr(self.model, "vision_model") else None

    def train(self, mode: bool = True):
        # Frozen and deterministic: never leave eval mode (no dropout, no statistics updates).
        return super().train(False)

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The `(batch, grid_size**2, dim)` patch features of the teacher's output `features`, or an error naming the
        fix when that output has no patch tokens on the tokenizer's grid."""
        grid, num_tokens = self.grid_size, self.grid_size**2
        name = type(self.model).__name__
        if features.ndim == 4:
            if min(features.shape[-2:]) < grid:
                raise ValueError(
                    f"The teacher {name} gives a {features.shape[-2]}x{features.shape[-1]} feature map, coarser than "
                    f"the {grid}x{grid} token grid: it has no features per patch. Use a teacher with patch tokens "
                    "(a ViT: DINOv2, CLIP, ViT, an hf_mim encoder) or an earlier --teacher_feature_layer"
                )
            return F.adaptive_avg_pool2d(features, grid).flatten(2).transpose(1, 2)
        if features.ndim != 3:
            raise ValueError(
                f"The teacher {name} gives features of shape {tuple(features.shape)}, not a sequence of patch tokens; "
                "use a vision backbone with patch tokens (a ViT: DINOv2, CLIP, ViT, an hf_mim encoder)"
            )
        if not num_tokens <= features.shape[1] <= num_tokens + MAX_PREFIX_TOKENS:
            raise ValueError(
                f"The teacher {name} returns {features.shape[1]} tokens, but the {grid}x{grid} token grid needs "
                f"{num_tokens} patch tokens (plus at most {MAX_PREFIX_TOKENS} [CLS]/register tokens): its patch grid "
                "does not match. Use a teacher with a patch_size in its config, which is resized to the grid, and "
                "that keeps every patch token (not a masking model such as ViT-MAE)"
            )
        return features[:, -num_tokens:]

    @torch.no_grad()
    def feature_dim(self, image_size: int) -> int:
        """The size of the teacher's per-patch features of `image_size` views (one forward of a blank image)."""
        return self(torch.zeros(1, 3, image_size, image_size, device=self.image_mean.device)).shape[-1]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features `(batch_size, grid_size**2, dim)` in float32 of pixels `(batch_size, 3, H, W)` in [0, 1]."""
        if self.input_size is not None and tuple(pixel_values.shape[-2:]) != (self.input_size, self.input_size):
            pixel_values = F.interpolate(
                pixel_values.float(), size=(self.input_size,) * 2, mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        pixel_values = (pixel_values - self.image_mean) / self.image_std
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if self.feature_layer is not None:
            kwargs["output_hidden_states"] = True
        outputs = self.backbone(pixel_values=pixel_values.to(self.image_mean.dtype), **kwargs)
        if self.feature_layer is not None:
            features = outputs.hidden_states[self.feature_layer]
        else:
            features = outputs.last_hidden_state
            if isinstance(self.backbone, CLIPVisionModel):
                # CLIP's last_hidden_state precedes its final LayerNorm, which BEiT v2 applies to every token.
                features = self.backbone.post_layernorm(features)
            if self.projection is not None:
                features = self.projection(features)
        return self.patch_tokens(features).float()


__all__ = ["MAX_PREFIX_TOKENS", "PatchFeatureTeacher", "teacher_patch_size"]
