"""Configuration of the k-means centroid tokenizer of CCViT (arXiv 2303.04664)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_common import complete_auto_map


@strict
class KmeansConfig(PreTrainedConfig):
    r"""
    Configuration of [`KmeansModel`]: `codebook_size` centroids of raw RGB patches of `patch_size` pixels, in [0, 1]
    and flattened channel-major, (C, py, px). A patch's token is its nearest centroid (L2). The defaults are CCViT's
    released `centroids.npy`: 8192 centroids of the 16x16 patches of 224x224 views, a 14x14 token grid.

    image_size (`int`, *optional*, defaults to 224):
        Side of the (square) input view in pixels; the same view the ViT sees.
    patch_size (`int`, *optional*, defaults to 16):
        Side of a patch in pixels; the ViT's patch size.
    num_channels (`int`, *optional*, defaults to 3):
        Number of image channels.
    codebook_size (`int`, *optional*, defaults to 8192):
        Number of centroids (the MIM model's `vocab_size`).

    Example:

    ```python
    >>> from hf_mim import KmeansConfig, KmeansModel

    >>> config = KmeansConfig()  # CCViT's tokenizer
    >>> config.grid_size, config.patch_dim
    (14, 768)
    >>> tokenizer = KmeansModel(KmeansConfig(image_size=32, patch_size=8, codebook_size=64))
    ```"""

    model_type = "hf_mim_kmeans"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    codebook_size: int = 8192

    def __post_init__(self, **kwargs):
        for name in ("image_size", "patch_size", "num_channels", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KmeansConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"KmeansConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                f"use e.g. image_size={max(1, self.image_size // self.patch_size) * self.patch_size}"
            )
        super().__post_init__(**kwargs)
        # The image processor registers itself in preprocessor_config.json, so only model classes go here.
        complete_auto_map(
            self,
            {"AutoConfig": "configuration_kmeans.KmeansConfig", "AutoModel": "modeling_kmeans.KmeansModel"},
        )

    @property
    def grid_size(self) -> int:
        """Tokens per side of the token grid."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of a flattened patch and of a centroid, `num_channels * patch_size**2`."""
        return self.num_channels * self.patch_size**2


__all__ = ["KmeansConfig"]
