"""Training the VQ-KD tokenizer of BEiT v2 by distilling a frozen vision teacher, with the transformers `Trainer`.

The teacher is any Hugging Face vision model (CLIP as in BEiT v2, DINOv2, ViT, an hf_mim encoder). It sees the same
[0, 1] crop as the tokenizer, normalised with the teacher's own image-processor statistics and resized so that its
patch grid matches the tokenizer's token grid. It is used for training only and is never saved with the tokenizer.
"""

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    TrainingArguments,
)

from ..models.configuration_common import check_decoder
from ..models.configuration_vqkd import VqkdConfig
from .tokenizer_trainer import TokenizerTrainer

logger = logging.getLogger(__name__)


def _patch_size(config) -> int | None:
    config = getattr(config, "vision_config", None) or config
    patch_size = getattr(config, "patch_size", None)
    return patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size


class VqkdTeacher(nn.Module):
    r"""A frozen vision model that turns a [0, 1] image batch into per-patch target features for VQ-KD.

    Features are `(batch_size, grid_size**2, dim)`: by default the model's final features; for CLIP (BEiT v2's
    teacher) that is the final LayerNorm applied to every token followed by the visual projection when the model has
    one (`CLIPModel`, `CLIPVisionModelWithProjection`). `feature_layer` selects `hidden_states[feature_layer]`
    instead (without final norm or projection). Of a token sequence, the last `grid_size**2` tokens are taken as the
    patch tokens ([CLS] and register tokens come first in every transformers ViT); a `(B, C, H, W)` feature map is
    average-pooled to the grid.

    Args:
        model (`PreTrainedModel`):
            The teacher, e.g. `CLIPVisionModelWithProjection`, `Dinov2Model`, `ViTModel`.
        image_mean, image_std (`tuple[float, float, float]`):
            The teacher's input normalisation (from its image processor).
        grid_size (`int`):
            Tokens per side of the tokenizer; the input is resized to `grid_size * patch_size` pixels when the
            teacher has a `patch_size`, so every teacher patch covers one tokenizer patch.
        feature_layer (`int`, *optional*):
            Index into the teacher's `hidden_states` (0 = embeddings); `None` for its final features.
    """

    def __init__(self, model: nn.Module, image_mean, image_std, grid_size: int, feature_layer: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.grid_size = grid_size
        self.feature_layer = feature_layer
        self.backbone, self.projection = model, None
        if hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
            self.backbone, self.projection = model.vision_model, model.visual_projection
        patch_size = _patch_size(model.config)
        self.input_size = grid_size * patch_size if patch_size else None
        native_size = getattr(getattr(model.config, "vision_config", None) or model.config, "image_size", None)
        accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(self.backbone.forward).parameters
        self.interpolate = accepts_interpolation and self.input_size is not None and self.input_size != native_size

    def train(self, mode: bool = True):
        # Frozen and deterministic: never leave eval mode (no dropout, no statistics updates).
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Target features `(batch_size, grid_size**2, dim)` in float32 of pixels `(batch_size, 3, H, W)` in [0, 1]."""
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
        num_tokens = self.grid_size**2
        if features.ndim == 4:
            features = F.adaptive_avg_pool2d(features, self.grid_size).flatten(2).transpose(1, 2)
        elif features.shape[1] < num_tokens:
            raise ValueError(
                f"The teacher returns {features.shape[1]} tokens but the tokenizer needs {num_tokens} "
                f"({self.grid_size}x{self.grid_size}) patch features; use a teacher with a patch_size in its config"
            )
        return features[:, -num_tokens:].float()

    @torch.no_grad()
    def feature_dim(self, config: VqkdConfig) -> int:
        """The size of the teacher's per-patch features for a tokenizer of `config` (one forward of a blank image)."""
        device = self.image_mean.device
        return self(torch.zeros(1, 3, config.image_size, config.image_size, device=device)).shape[-1]

    def check_compatible(self, config: VqkdConfig) -> None:
        """Errors, with the fix, when the teacher's features do not fit the tokenizer `config`."""
        if config.grid_size != self.grid_size:
            raise ValueError(f"The teacher was built for a {self.grid_size}-token grid, the tokenizer has {config.grid_size}")
        feature_dim = self.feature_dim(config)
        if feature_dim != config.teacher_dim:
            raise ValueError(
                f"The teacher's features are {feature_dim}-dimensional but the tokenizer's decoder predicts "
                f"teacher_dim={config.teacher_dim}; pass --config_overrides teacher_dim={feature_dim}"
            )


def load_teacher(
    name_or_path: str, grid_size: int, feature_layer: int | None = None, trust_remote_code: bool = False
) -> VqkdTeacher:
    """A [`VqkdTeacher`] from a checkpoint folder or Hub id, with its image processor's normalisation.

    CLIP checkpoints (full `CLIPModel` or vision-only) load as `CLIPVisionModelWithProjection`, BEiT v2's teacher
    features; everything else through `AutoModel`.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type == "clip":
        # A full CLIP checkpoint keeps the projection size outside its vision config.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=vision_config)
    elif config.model_type == "clip_vision_model":
        model = CLIPVisionModelWithProjection.from_pretrained(name_or_path)
    else:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The teacher {name_or_path} has no usable image processor ({error}); VQ-KD must normalise the teacher's "
            "input as the teacher was trained. Save the teacher's image processor into its folder."
        ) from error
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
    std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
    logger.info("Teacher %s (%s): mean %s, std %s", name_or_path, type(model).__name__, mean, std)
    return VqkdTeacher(model, mean, std, grid_size=grid_size, feature_layer=feature_layer)


class VqkdTrainer(TokenizerTrainer):
    r"""`Trainer` for [`VqkdModel`]: computes the teacher's target features of every batch.

    Besides `loss`, every log carries the window means of `reconstruction_loss` (1 - cosine to the teacher),
    `commitment_loss` and `codebook_restarts`, which `MimTrainer` collects from the model's outputs, and the
    `TokenizerTrainer`'s `codebook_usage` and `codebook_perplexity` of the codes assigned in the logging window.

    Args:
        teacher ([`VqkdTeacher`]):
            The frozen teacher; moved to the training device here and never saved.
    """

    collapse_remedy = (
        "Restart dead codes sooner (--config_overrides dead_code_restart_steps=20) or lower codebook_size; see the "
        "README's BEiT v2 section."
    )

    def __init__(self, *args, teacher: VqkdTeacher, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.accelerator.unwrap_model(self.model).config
        check_decoder(config, "be trained (its loss decodes the codes into teacher features)")
        self.teacher = teacher.to(self.args.device)
        self.teacher.check_compatible(config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "target_features": self.teacher(inputs["pixel_values"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Predicted features and code ids are per-patch tensors; gathering them over an eval set only costs memory.
        return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)


def build_vqkd_trainer(model, args: TrainingArguments, tokenizer_args, **trainer_kwargs) -> VqkdTrainer:
    """A [`VqkdTrainer`] whose teacher comes from `--teacher_name_or_path` / `--teacher_feature_layer`."""
    if not tokenizer_args.teacher_name_or_path:
        raise ValueError(
            "--tokenizer_type vqkd needs --teacher_name_or_path: the vision model whose features the tokenizer "
            "distils (BEiT v2 uses openai/clip-vit-base-patch16)"
        )
    teacher = load_teacher(
        tokenizer_args.teacher_name_or_path,
        grid_size=model.config.grid_size,
        feature_layer=tokenizer_args.teacher_feature_layer,
    )
    feature_dim = teacher.feature_dim(model.config)
    overrides = tokenizer_args.config_overrides or ""
    chosen = tokenizer_args.tokenizer_name_or_path or any(
        item.split("=", 1)[0].strip() == "teacher_dim" for item in overrides.split(",")
    )
    if feature_dim != model.config.teacher_dim and not chosen:
        # A new tokenizer whose teacher_dim nobody set: the teacher decides it (its decoder is not trained yet).
        logger.info("teacher_dim=%d, the size of %s's features", feature_dim, tokenizer_args.teacher_name_or_path)
        model = type(model)(VqkdConfig.from_dict({**model.config.to_dict(), "teacher_dim": feature_dim}))
    return VqkdTrainer(model=model, args=args, teacher=teacher, **trainer_kwargs)


__all__ = ["VqkdTeacher", "VqkdTrainer", "build_vqkd_trainer", "load_teacher"]
