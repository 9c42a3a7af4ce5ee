"""Feature k-means: a visual tokenizer whose codebook is k-means centroids of a frozen vision model's patch features.

BEiT v2's targets are semantic because its VQ-KD tokenizer distils a teacher (CLIP), which costs a day of GPU training
and collapses on small data; CCViT's k-means centroids cost minutes, but of raw pixels. Here the teacher's patch
features themselves are clustered (as DiGIT does with DINOv2 for generation): a patch's token is the nearest centroid
(squared L2) of its teacher feature, and its soft scores are scaled negative squared distances. The teacher is part of
the model, config and weights, frozen; there is no pixel decoder. Centroids come from `hf_mim.training.kmeans`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .centroids import check_centroids, float32_centroids, nearest_centroids, negative_sq_distances
from .configuration_feature_kmeans import NO_TEACHER_ERROR, FeatureKmeansConfig
from .modeling_tokenizer import MimTokenizerPreTrainedModel
from .teacher import PatchFeatureTeacher


def build_teacher(config: FeatureKmeansConfig) -> PreTrainedModel:
    """The randomly initialised teacher of `config` (`teacher_class` of `teacher_config`); load weights into it."""
    teacher_config = config.get_teacher_config()
    if config.teacher_class == "AutoModel":
        return AutoModel.from_config(teacher_config)
    model_class = getattr(transformers, config.teacher_class, None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"FeatureKmeansConfig.teacher_class={config.teacher_class!r} is not a transformers model class; the "
            "tokenizer rebuilds its teacher from transformers alone (e.g. 'Dinov2Model', "
            "'CLIPVisionModelWithProjection')"
        )
    return model_class._from_config(teacher_config)


@dataclass
class FeatureKmeansOutput(ModelOutput):
    r"""
    indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)`):
        Nearest-centroid id of every patch, row-major over the grid.
    sq_distances (`torch.FloatTensor` of shape `(batch_size, grid_size**2)`):
        Squared L2 distance of every patch's (normalised) teacher feature to its centroid.
    """

    indices: torch.LongTensor | None = None
    sq_distances: torch.FloatTensor | None = None


class FeatureKmeansPreTrainedModel(MimTokenizerPreTrainedModel):
    config: FeatureKmeansConfig
    config_class = FeatureKmeansConfig
    base_model_prefix = "feature_kmeans"
    # Token ids are defined by float32 distances; loading in fp16/bf16 must not change which centroid wins.
    _keep_in_fp32_modules_strict = ["centroids"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Placeholder centroids until fitted ones are loaded or set; the teacher's weights are always loaded.
        if isinstance(module, FeatureKmeansModel):
            init.zeros_(module.centroids)
        elif isinstance(module, PatchFeatureTeacher):
            # Non-persistent buffers, which no checkpoint holds: loading leaves them to be set here.
            init.copy_(module.image_mean, torch.tensor(self.config.teacher_image_mean).view(1, 3, 1, 1))
            init.copy_(module.image_std, torch.tensor(self.config.teacher_image_std).view(1, 3, 1, 1))


class FeatureKmeansModel(FeatureKmeansPreTrainedModel):
    """Semantic k-means tokenizer: a frozen `teacher` ([`PatchFeatureTeacher`]) and frozen `centroids` of shape
    `(codebook_size, feature_dim)`.

    Inputs are the [`FeatureKmeansImageProcessor`] view: raw [0, 1] pixels at the ViT's resolution, which the teacher
    resizes to its own patch grid and normalises with its own statistics. Distances are computed in float32.
    """

    def __init__(self, config: FeatureKmeansConfig):
        super().__init__(config)
        # A config without a teacher is one not fitted yet (`hf-mim train-tokenizer` builds the tokenizer from the
        # teacher it is given); such a model only holds the fit's settings.
        self.teacher = None
        if config.teacher_config is not None:
            self.teacher = PatchFeatureTeacher(
                build_teacher(config),
                config.teacher_image_mean,
                config.teacher_image_std,
                grid_size=config.grid_size,
                feature_layer=config.teacher_feature_layer,
            )
        # A frozen parameter rather than a buffer, as KmeansModel's: fp32 is kept through `_keep_in_fp32_modules`.
        self.centroids = nn.Parameter(torch.zeros(config.codebook_size, config.feature_dim), requires_grad=False)
        self.post_init()

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Replace the centroids by `centroids` of shape `(codebook_size, feature_dim)`, in the units of [`encode`]."""
        centroids = torch.as_tensor(centroids)
        check_centroids(centroids, self.centroids.shape, "codebook_size, feature_dim")
        self.centroids.copy_(centroids.to(self.centroids.dtype))

    def train(self, mode: bool = True):
        super().train(mode)
        # Loading rebuilds parameters as trainable ones, and every load path ends in `eval()`: re-freeze here.
        self.requires_grad_(False)
        return self

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features `(batch_size, grid_size**2, feature_dim)`, float32, l2-normalised when
        `normalize_features`: the points the centroids were fitted on.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`FeatureKmeansImageProcessor`] view: raw [0, 1] pixels.
        """
        self.check_input(pixel_values)
        if self.teacher is None:
            raise ValueError(NO_TEACHER_ERROR)
        features = self.teacher(pixel_values).float()
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"The teacher gives {features.shape[-1]}-dimensional features but the centroids are "
                f"{self.config.feature_dim}-dimensional (FeatureKmeansConfig.feature_dim); refit the tokenizer"
            )
        return F.normalize(features, dim=-1) if self.config.normalize_features else features

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`-logit_scale * ||feature - centroid||^2` of every patch and centroid (soft targets, e.g. for mc-BEiT).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`FeatureKmeansImageProcessor`] view: raw [0, 1] pixels.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        centroids = float32_centroids(self.centroids, type(self).__name__)
        features = self.encode(pixel_values)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            logits = negative_sq_distances(features.reshape(-1, features.shape[-1]), centroids)
        return logits.mul_(self.config.logit_scale).reshape(*features.shape[:2], -1)

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Nearest-centroid ids of shape `(batch_size, grid_size**2)`, row-major over the grid (the ViT patch order).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [`FeatureKmeansImageProcessor`] view: raw [0, 1] pixels.
        """
        return self(pixel_values).indices

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> FeatureKmeansOutput:
        r"""Nearest centroids of every patch's teacher feature (no gradients: the teacher and centroids are fixed).

        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The [`FeatureKmeansImageProcessor`] view: raw [0, 1] pixels.
        """
        centroids = float32_centroids(self.centroids, type(self).__name__)
        features = self.encode(pixel_values)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            indices, sq_distances = nearest_centroids(features.reshape(-1, features.shape[-1]), centroids)
        return FeatureKmeansOutput(
            indices=indices.reshape(features.shape[:2]), sq_distances=sq_distances.reshape(features.shape[:2])
        )


__all__ = ["FeatureKmeansModel", "FeatureKmeansOutput", "FeatureKmeansPreTrainedModel", "build_teacher"]
