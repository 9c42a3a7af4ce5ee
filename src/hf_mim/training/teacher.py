"""Loading the frozen vision teacher that VQ-KD distils and feature k-means clusters, from a folder or Hub id."""

import logging

from transformers import AutoConfig, AutoImageProcessor, AutoModel, BeitConfig, CLIPVisionModelWithProjection

from ..errors import UsageError
from ..evaluation.export import encoder_image_processor, to_transformers_beit
from ..models.teacher import PatchFeatureTeacher

logger = logging.getLogger(__name__)


def load_teacher_model(name_or_path: str, trust_remote_code: bool = False):
    """`(model, image_mean, image_std)` of a teacher checkpoint: the vision model in eval mode and the normalisation
    of its image processor (the statistics it was trained with).

    CLIP checkpoints (full `CLIPModel` or vision-only) load as `CLIPVisionModelWithProjection`, BEiT v2's teacher
    features; hf_mim MIM checkpoints and encoders as a stock transformers `BeitModel` whose final LayerNorm follows
    the last layer (`hf-mim export --pooling cls`), so the teacher rebuilds from its config without hf_mim;
    everything else through `AutoModel`.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type == "clip":
        # A full CLIP checkpoint keeps the projection size outside its vision config.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=vision_config)
    elif config.model_type == "clip_vision_model":
        model = CLIPVisionModelWithProjection.from_pretrained(name_or_path)
    elif config.model_type.startswith("hf_mim_"):
        # Every hf_mim model with an encoder (MIM models, encoders) has a BeitConfig; tokenizers have none to teach.
        if not isinstance(config, BeitConfig):
            raise ValueError(
                f"it holds an {config.model_type} model, which has no encoder to be a teacher; pass an hf_mim MIM "
                "checkpoint (its encoder is the teacher) or a transformers vision model"
            )
        model = to_transformers_beit(name_or_path, pooling="cls")
    else:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The teacher {name_or_path} has no usable image processor ({error}); its input must be normalised as "
            "the teacher was trained. Save the teacher's image processor into its folder."
        ) from error
    if config.model_type.startswith("hf_mim_"):
        # CCViT encoders normalise inside their MIM model, with statistics their config carries.
        processor = encoder_image_processor(processor, config)
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
    std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
    logger.info("Teacher %s (%s): mean %s, std %s", name_or_path, type(model).__name__, mean, std)
    return model.eval(), mean, std


def teacher_feature_dim(teacher: PatchFeatureTeacher, image_size: int, name_or_path: str, flag: str) -> int:
    """The size of `teacher`'s per-patch features of `image_size` views, or a one-line `UsageError` naming
    `--flag name_or_path` when its output has no patch tokens on the tokenizer's grid or it has no
    `hidden_states[feature_layer]`: one forward of a blank image finds both before any training image is read."""
    try:
        return teacher.feature_dim(image_size)
    except (ValueError, IndexError) as error:
        reason = str(error) if isinstance(error, ValueError) else f"it has no hidden_states[{teacher.feature_layer}]"
        raise UsageError(f"--{flag} {name_or_path}: {reason}") from error


__all__ = ["load_teacher_model", "teacher_feature_dim"]
