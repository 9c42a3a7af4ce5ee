"""Configuration of CCViT masked image modeling (Centroid-centered Modeling, arXiv 2303.04664)."""

from huggingface_hub.dataclasses import strict
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .configuration_beitv2 import Beitv2Config
from .configuration_kmeans import KmeansConfig


@strict
class CcvitConfig(Beitv2Config):
    r"""
    A [`Beitv2Config`] for CCViT: the targets are the ids of k-means centroids of raw pixel patches, and BEiT v2's
    head over [last-layer CLS ; patches after layer `early_layers`] reconstructs the pixels of the corrupted patches
    through its own LayerNorm and pixel head instead of predicting tokens. Stochastic depth is off by default, as
    in CCViT's recipe.

    The tokenizer must be a k-means tokenizer reading the ViT's own view (same image and patch size): the model
    replaces patches by centroid pixels before normalising its input. When `tokenizer_config` is not given it is
    derived from the backbone (`codebook_size = vocab_size`); load fitted centroids with `set_tokenizer`.

    image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
        Per-channel mean used to normalise the [0, 1] input after centroid replacement.
    image_std (`list[float]`, *optional*, defaults to the ImageNet standard deviation):
        Per-channel standard deviation used likewise.
    norm_pixel_targets (`bool`, *optional*, defaults to `True`):
        Reconstruct each patch normalised by its own mean and (unbiased) standard deviation, `(x - mean) /
        sqrt(var + 1e-6)`, as CCViT does; `False` reconstructs raw [0, 1] pixels.

    Example:

    ```python
    >>> from hf_mim import CcvitConfig, CcvitForMaskedImageModeling

    >>> config = CcvitConfig()  # ViT-B/16, 8192 centroids of 16x16 patches, pixel branch on layer 9
    >>> config.tokenizer_config["codebook_size"], config.early_layers
    (8192, 9)
    >>> model = CcvitForMaskedImageModeling(config)
    ```"""

    model_type = "hf_mim_ccvit"
    auto_map_defaults = {
        "AutoConfig": "configuration_ccvit.CcvitConfig",
        "AutoModel": "modeling_ccvit.CcvitModel",
        "AutoModelForMaskedImageModeling": "modeling_ccvit.CcvitForMaskedImageModeling",
    }

    drop_path_rate: float | int = 0.0
    image_mean: list[float | int] | tuple[float | int, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    image_std: list[float | int] | tuple[float | int, ...] = tuple(IMAGENET_DEFAULT_STD)
    norm_pixel_targets: bool = True

    def __post_init__(self, **kwargs):
        if self.tokenizer_config is None:
            self.tokenizer_config = KmeansConfig(
                image_size=self.image_size,
                patch_size=self.patch_size,
                num_channels=self.num_channels,
                codebook_size=self.vocab_size,
            ).to_dict()
        if self.tokenizer_config.get("model_type") != KmeansConfig.model_type:
            raise ValueError(
                f"CCViT replaces patches by centroid pixels, so its tokenizer must be a k-means tokenizer "
                f"({KmeansConfig.model_type}), got {self.tokenizer_config.get('model_type')!r}; fit one with "
                f"`train_tokenizer.py --tokenizer_type kmeans` or `run_mim.py --fit_tokenizer`"
            )
        for name in ("image_size", "patch_size", "num_channels"):
            if self.tokenizer_config.get(name) != getattr(self, name):
                raise ValueError(
                    f"The k-means tokenizer has {name}={self.tokenizer_config.get(name)} but the ViT has "
                    f"{name}={getattr(self, name)}; centroid pixels replace ViT patches, so both must read the same "
                    f"view. Fit centroids for this ViT (e.g. `run_mim.py --fit_tokenizer`)."
                )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(f"{name} needs one value per channel ({self.num_channels}), got {getattr(self, name)}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        super().__post_init__(**kwargs)


__all__ = ["CcvitConfig"]
