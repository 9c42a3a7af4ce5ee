"""Configuration of the feature k-means tokenizer: k-means centroids of a frozen vision model's patch features."""

from huggingface_hub.dataclasses import strict
from transformers import CONFIG_MAPPING, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .configuration_common import complete_auto_map

NO_TEACHER_ERROR = (
    "This feature k-means tokenizer has no teacher (teacher_config=None): it has not been fitted. Fit one with "
    "`hf-mim train-tokenizer --tokenizer_type feature_kmeans --teacher_name_or_path <vision model>`"
)


@strict
class FeatureKmeansConfig(PreTrainedConfig):
    r"""
    Configuration of [`FeatureKmeansModel`]: a frozen teacher (any transformers vision backbone with patch tokens:
    DINOv2, CLIP, ViT, an hf_mim encoder exported as a transformers BEiT) and `codebook_size` centroids of its patch
    features. A patch's token is its nearest centroid (L2). BEiT v2's targets are semantic because a tokenizer distils
    such a teacher; here its features are clustered directly, which takes minutes instead of a day of VQ-KD training.
    `hf-mim train-tokenizer --tokenizer_type feature_kmeans` fits one.

    The teacher's config is stored here (and its weights in the tokenizer's checkpoint), so the tokenizer rebuilds
    where hf_mim is not installed.

    image_size (`int`, *optional*, defaults to 224):
        Side of the (square) input view in pixels: raw [0, 1] pixels, the same crop the ViT sees.
    patch_size (`int`, *optional*, defaults to 16):
        The MIM ViT's patch size: the token grid is `image_size // patch_size` per side. The teacher's view is resized
        so that its own patch grid is this grid (a DINOv2 with 14 px patches reads 196 px for a 14x14 grid).
    codebook_size (`int`, *optional*, defaults to 8192):
        Number of centroids (the MIM model's `vocab_size`).
    feature_dim (`int`, *optional*, defaults to 768):
        Size of the teacher's patch features (of `teacher_feature_layer`), the centroids' dimension.
    teacher_config (`dict`, *optional*):
        `to_dict()` of the teacher's transformers config. `None` only in a config that has not been fitted yet.
    teacher_class (`str`, *optional*, defaults to `"AutoModel"`):
        The transformers class of the teacher, e.g. `"Dinov2Model"`, `"CLIPVisionModelWithProjection"`.
    teacher_feature_layer (`int`, *optional*):
        Index into the teacher's `hidden_states` (0 = embeddings) whose tokens are clustered; `None` for its final
        features (CLIP: final LayerNorm and visual projection).
    teacher_image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
        Mean of the teacher's input normalisation (its image processor's), applied to the [0, 1] view.
    teacher_image_std (`list[float]`, *optional*, defaults to the ImageNet standard deviation):
        Standard deviation of that normalisation.
    normalize_features (`bool`, *optional*, defaults to `True`):
        l2-normalise the teacher's features before clustering and tokenizing, so centroids group directions (what
        cosine-trained teachers such as DINOv2 and CLIP encode) rather than feature norms.
    logit_scale (`float`, *optional*, defaults to 50.0):
        `get_codebook_logits` returns `-logit_scale * ||feature - centroid||^2`. For unit vectors that is
        `100 * cos - 100`, VQ-KD's `100 * cos` up to a constant, so mc-BEiT's softmax at temperature 4 is as peaked as
        with VQ-KD. Token ids do not depend on it.

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_mim import FeatureKmeansConfig, FeatureKmeansModel

    >>> teacher = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                     image_size=32, patch_size=8)
    >>> config = FeatureKmeansConfig(image_size=32, patch_size=8, codebook_size=16, feature_dim=32,
    ...                              teacher_config=teacher.to_dict(), teacher_class="ViTModel")
    >>> config.grid_size
    4
    >>> tokenizer = FeatureKmeansModel(config)  # a random teacher; hf-mim train-tokenizer fits a real one
    ```"""

    model_type = "hf_mim_feature_kmeans"

    image_size: int = 224
    patch_size: int = 16
    codebook_size: int = 8192
    feature_dim: int = 768
    teacher_config: dict | None = None
    teacher_class: str = "AutoModel"
    teacher_feature_layer: int | None = None
    teacher_image_mean: list[float] | tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    teacher_image_std: list[float] | tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    normalize_features: bool = True
    logit_scale: float = 50.0

    def __post_init__(self, **kwargs):
        # Lists, as a JSON round trip gives them back, so saved and rebuilt configs compare equal.
        self.teacher_image_mean = list(self.teacher_image_mean)
        self.teacher_image_std = list(self.teacher_image_std)
        for name in ("image_size", "patch_size", "codebook_size", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureKmeansConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"FeatureKmeansConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                f"use e.g. image_size={max(1, self.image_size // self.patch_size) * self.patch_size}"
            )
        if len(self.teacher_image_mean) != 3 or len(self.teacher_image_std) != 3 or min(self.teacher_image_std) <= 0:
            raise ValueError(
                f"FeatureKmeansConfig needs 3 teacher_image_mean values and 3 positive teacher_image_std values, got "
                f"{self.teacher_image_mean} and {self.teacher_image_std}"
            )
        if self.logit_scale <= 0:
            raise ValueError(f"FeatureKmeansConfig.logit_scale must be positive, got {self.logit_scale}")
        # transformers' own model types only: those registered at run time (hf_mim's) need code the checkpoint lacks.
        if self.teacher_config is not None and self.teacher_config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise ValueError(
                f"FeatureKmeansConfig.teacher_config is of model_type {self.teacher_config.get('model_type')!r}, not "
                "a transformers model: the tokenizer must rebuild its teacher without other code. Export an hf_mim "
                "encoder first (hf-mim export --pooling cls), or choose a transformers teacher"
            )
        super().__post_init__(**kwargs)
        # The image processor registers itself in preprocessor_config.json, so only model classes go here.
        complete_auto_map(
            self,
            {
                "AutoConfig": "configuration_feature_kmeans.FeatureKmeansConfig",
                "AutoModel": "modeling_feature_kmeans.FeatureKmeansModel",
            },
        )

    @property
    def grid_size(self) -> int:
        """Tokens per side of the token grid."""
        return self.image_size // self.patch_size

    def get_teacher_config(self) -> PreTrainedConfig:
        """The teacher's transformers config, rebuilt from `teacher_config`."""
        if self.teacher_config is None:
            raise ValueError(NO_TEACHER_ERROR)
        return CONFIG_MAPPING[self.teacher_config["model_type"]].from_dict(self.teacher_config)


__all__ = ["NO_TEACHER_ERROR", "FeatureKmeansConfig"]
