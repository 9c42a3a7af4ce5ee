"""Training the VQ-KD tokenizer of BEiT v2 by distilling a frozen vision teacher, with the transformers `Trainer`.

The teacher is any Hugging Face vision model (CLIP as in BEiT v2, DINOv2, ViT, an hf_mim encoder), a
[`PatchFeatureTeacher`]: it sees the same [0, 1] crop as the tokenizer, normalised with the teacher's own
image-processor statistics and resized so that its patch grid matches the tokenizer's token grid. It is used for
training only and is never saved with the tokenizer.
"""

import logging

from transformers import TrainingArguments

from ..errors import UsageError
from ..models.configuration_common import check_decoder
from ..models.configuration_vqkd import VqkdConfig
from ..models.teacher import PatchFeatureTeacher
from .loading import pretrained
from .teacher import load_teacher_model, teacher_feature_dim
from .tokenizer_trainer import TokenizerTrainer

logger = logging.getLogger(__name__)


class VqkdTeacher(PatchFeatureTeacher):
    r"""The frozen teacher of VQ-KD: a [`PatchFeatureTeacher`] whose features are the decoder's targets."""

    def check_compatible(self, config: VqkdConfig) -> None:
        """Errors, with the fix, when the teacher's features do not fit the tokenizer `config`."""
        if config.grid_size != self.grid_size:
            raise ValueError(f"The teacher was built for a {self.grid_size}-token grid, the tokenizer has {config.grid_size}")
        feature_dim = self.feature_dim(config.image_size)
        if feature_dim != config.teacher_dim:
            raise UsageError(
                f"the teacher's features are {feature_dim}-dimensional but the tokenizer's decoder predicts "
                f"teacher_dim={config.teacher_dim}: pass --config_overrides teacher_dim={feature_dim} (a new "
                f"tokenizer), or a --teacher_name_or_path whose features are {config.teacher_dim}-dimensional"
            )


def load_teacher(
    name_or_path: str,
    grid_size: int,
    feature_layer: int | None = None,
    trust_remote_code: bool = False,
    flag: str = "teacher_name_or_path",
) -> VqkdTeacher:
    """A [`VqkdTeacher`] from a checkpoint folder or Hub id ([`load_teacher_model`]), with its image processor's
    normalisation; a path that does not hold a teacher is a one-line `UsageError` naming `--flag`."""
    model, mean, std = pretrained(load_teacher_model, name_or_path, flag, trust_remote_code=trust_remote_code)
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
        # Under the run's mixed precision, as BEiT v2's code runs its teacher (accelerate autocasts the prepared model
        # alone); the features come back in float32.
        with self.accelerator.autocast():
            target_features = self.teacher(inputs["pixel_values"])
        inputs = {**inputs, "target_features": target_features}
        if self.stand_in:
            # An example standing in for an undecodable batch (MimTrainer.training_step) joins the codebook's
            # all-reduce of EMA statistics with weight zero.
            inputs["codebook_update_weight"] = 0.0
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Predicted features and code ids are per-patch tensors; gathering them over an eval set only costs memory.
        return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)


def build_vqkd_trainer(model, args: TrainingArguments, tokenizer_args, **trainer_kwargs) -> VqkdTrainer:
    """A [`VqkdTrainer`] whose teacher comes from `--teacher_name_or_path` / `--teacher_feature_layer`."""
    path = tokenizer_args.teacher_name_or_path
    if not path:
        raise UsageError(
            "--tokenizer_type vqkd needs --teacher_name_or_path: the vision model whose features the tokenizer "
            "distils (BEiT v2 uses openai/clip-vit-base-patch16)"
        )
    teacher = load_teacher(path, grid_size=model.config.grid_size, feature_layer=tokenizer_args.teacher_feature_layer)
    feature_dim = teacher_feature_dim(teacher, model.config.image_size, path, "teacher_name_or_path")
    overrides = tokenizer_args.config_overrides or ""
    chosen = tokenizer_args.tokenizer_name_or_path or any(
        item.split("=", 1)[0].strip() == "teacher_dim" for item in overrides.split(",")
    )
    if feature_dim != model.config.teacher_dim and not chosen:
        # A new tokenizer whose teacher_dim nobody set: the teacher decides it (its decoder is not trained yet).
        logger.info("teacher_dim=%d, the size of %s's features", feature_dim, path)
        model = type(model)(VqkdConfig.from_dict({**model.config.to_dict(), "teacher_dim": feature_dim}))
    return VqkdTrainer(model=model, args=args, teacher=teacher, **trainer_kwargs)


__all__ = ["VqkdTeacher", "VqkdTrainer", "build_vqkd_trainer", "load_teacher"]
