"""CCViT's centroid tokenizer (arXiv 2303.04664): k-means centroids of raw pixel patches as a visual codebook.

A patch's token is the index of its nearest centroid (squared L2 distance), its soft scores are negative squared
distances, and decoding a token gives back the centroid's pixels. No network is involved: tokenizing a 224 px image
is one (196 x 768) @ (768 x 8192) product. Centroids come from `hf_mim.training.kmeans` or from CCViT's released
`centroids.npy` via [`KmeansModel.from_centroids`].
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .centroids import check_centroids, float32_centroids, nearest_centroids, negative_sq_distances
from .configuration_kmeans import KmeansConfig
from .modeling_tokenizer import MimTokenizerPreTrainedModel


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, C, H, W)` images as `(batch, num_patches, C * patch_size**2)` patches, row-major over the grid and
    flattened channel-major (C, py, px) inside a patch, CCViT's order."""
    batch_size, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch_size, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, rows * cols, channels * patch_size**2)


def unpatchify(patches: torch.Tensor, patch_size: int, num_channels: int) -> torch.Tensor:
    """The inverse of [`patchify`] for a square grid: `(batch, grid**2, C * patch_size**2)` -> `(batch, C, H, W)`."""
    batch_size, num_patches, _ = patches.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"unpatchify needs a square grid of patches, got {num_patches} patches")
    images = patches.reshape(batch_size, grid, grid, num_channels, patch_size, patch_size)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(batch_size, num_channels, grid * patch_size, grid * patch_size)


@dataclass
class KmeansOutput(ModelOutput):
    r"""
    indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)`):
        Nearest-centroid id of every patch, row-major over the grid.
    sq_distances (`torch.FloatTensor` of shape `(batch_size, grid_size**2)`):
        Squared L2 distance of every patch to its centroid (the k-means quantisation error), in [0, 1] pixel units.
    reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
        The image with every patch replaced by its centroid's pixels.
    """

    indices: torch.LongTensor | None = None
    sq_distances: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None


class KmeansPreTrainedModel(MimTokenizerPreTrainedModel):
    config: KmeansConfig
    config_class = KmeansConfig
    base_model_prefix = "kmeans"
    # Token ids are defined by float32 distances; loading in fp16/bf16 must not change which centroid wins.
    _keep_in_fp32_modules_strict = ["centroids"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Placeholder centroids until fitted ones are loaded or set; all-zero centroids tokenize everything as 0.
        if isinstance(module, KmeansModel):
            init.zeros_(module.centroids)


class KmeansModel(KmeansPreTrainedModel):
    """CCViT's k-means tokenizer: the frozen `centroids` of shape `(codebook_size, num_channels * patch_size**2)`.

    Inputs are the [KmeansImageProcessor] view: raw [0, 1] pixels at the ViT's resolution, whose patches are
    compared with the centroids in (C, py, px) order. All distances are computed in float32.
    """

    def __init__(self, config: KmeansConfig):
        super().__init__(config)
        # A frozen parameter rather than a buffer: `PreTrainedModel` derives a model's dtype and device from its
        # parameters, and the centroids are all this model has.
        self.centroids = nn.Parameter(torch.zeros(config.codebook_size, config.patch_dim), requires_grad=False)
        self.post_init()

    @classmethod
    def from_centroids(
        cls,
        centroids: "np.ndarray | torch.Tensor | str | os.PathLike",
        image_size: int = 224,
        num_channels: int = 3,
    ) -> "KmeansModel":
        """A tokenizer holding the given centroids, e.g. CCViT's released `centroids.npy` (8192 x 768).

        Args:
            centroids (`np.ndarray`, `torch.Tensor` or path of a `.npy` file):
                Array of shape `(codebook_size, num_channels * patch_size**2)` of [0, 1] pixels in (C, py, px)
                order; the patch size is inferred from its width.
            image_size (`int`, *optional*, defaults to 224): Side of the view the tokenizer reads.
            num_channels (`int`, *optional*, defaults to 3): Channels of a patch.
        """
        if isinstance(centroids, (str, os.PathLike)):
            centroids = np.load(centroids)
        centroids = torch.as_tensor(np.asarray(centroids) if not torch.is_tensor(centroids) else centroids)
        if centroids.ndim != 2 or not centroids.is_floating_point():
            raise ValueError(
                f"centroids must be a float array of shape (codebook_size, num_channels * patch_size**2), got "
                f"{centroids.dtype} of shape {tuple(centroids.shape)}"
            )
        patch_size = math.isqrt(centroids.shape[1] // num_channels)
        if num_channels * patch_size**2 != centroids.shape[1]:
            raise ValueError(
                f"A centroid of {centroids.shape[1]} values is not a square patch of {num_channels} channels "
                f"(num_channels * patch_size**2); pass the right num_channels (CCViT: 3 x 16 x 16 = 768)"
            )
        model = cls(KmeansConfig(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                                 codebook_size=centroids.shape[0]))
        model.set_centroids(centroids)
        return model

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Replace the centroids by `centroids` of shape `(codebook_size, patch_dim)`: [0, 1] pixels, (C, py, px)."""
        centroids = torch.as_tensor(centroids)
        check_centroids(centroids, self.centroids.shape, "codebook_size, num_channels * patch_size**2")
        low, high = centroids.min().item(), centroids.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"centroids must be raw pixels in [0, 1] (means of [0, 1] patches), got values in [{low:.4g}, "
                f"{high:.4g}]; divide 0-255 centroids by 255, and undo any mean/std normalisation"
            )
        self.centroids.copy_(centroids.to(self.centroids.dtype))

    def train(self, mode: bool = True):
        super().train(mode)
        # Loading rebuilds parameters as trainable ones, and every load path ends in `eval()`: re-freeze here.
        self.centroids.requires_grad_(False)
        return self

    def _float_centroids(self) -> torch.Tensor:
        return float32_centroids(self.centroids, type(self).__name__)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, grid_size**2, patch_dim)` float32 patches of a [KmeansImageProcessor] view."""
        self.check_input(pixel_values)
        return patchify(pixel_values.float(), self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_channels, image_size, image_size)` images from `(batch_size, grid_size**2, patch_dim)`."""
        return unpatchify(patches, self.config.patch_size, self.config.num_channels)

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Negative squared L2 distances of every patch to every centroid (soft targets, e.g. for mc-BEiT).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [KmeansImageProcessor] view: raw [0, 1] pixels.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, grid_size**2, codebook_size)`, row-major over the grid.
        """
        centroids = self._float_centroids()
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            patches = self.patchify(pixel_values)
            logits = negative_sq_distances(patches.reshape(-1, patches.shape[-1]), centroids)
        return logits.reshape(patches.shape[0], patches.shape[1], -1)

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Nearest-centroid ids of shape `(batch_size, grid_size**2)`, row-major over the grid (the ViT patch order).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [KmeansImageProcessor] view: raw [0, 1] pixels.
        """
        return self(pixel_values, return_reconstruction=False).indices

    def decode(self, indices: torch.LongTensor) -> torch.Tensor:
        """Images in [0, 1] of shape `(batch_size, num_channels, image_size, image_size)`, each patch its centroid.

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)` or `(batch_size, grid_size, grid_size)`):
                Centroid ids, row-major over the grid.
        """
        indices = indices.reshape(indices.shape[0], -1)
        if indices.shape[1] != self.num_tokens:
            raise ValueError(
                f"{type(self).__name__} decodes {self.grid_size}x{self.grid_size}={self.num_tokens} ids per image, "
                f"got {indices.shape[1]}"
            )
        return self.unpatchify(self._float_centroids()[indices]).clamp(0.0, 1.0)

    @torch.no_grad()
    def replace_patches(
        self,
        pixel_values: torch.Tensor,
        bool_replaced_pos: torch.BoolTensor,
        indices: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """A copy of `pixel_values` whose patches at `bool_replaced_pos` are the pixels of their own nearest centroid.

        This is CCViT's centroid replacement. Every other pixel is left exactly as it was.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                The [KmeansImageProcessor] view: raw [0, 1] pixels.
            bool_replaced_pos (`torch.BoolTensor` of shape `(batch_size, grid_size**2)`):
                Which patches to replace.
            indices (`torch.LongTensor` of shape `(batch_size, grid_size**2)`, *optional*):
                The patches' centroid ids, when already computed by [`get_codebook_indices`].
        """
        patches = self.patchify(pixel_values)
        bool_replaced_pos = bool_replaced_pos.reshape(patches.shape[:2]).bool()
        if indices is None:
            indices = self.get_codebook_indices(pixel_values)
        # A select rather than an assignment through the mask, whose number of patches only the device knows.
        centroid_patches = self._float_centroids()[indices.reshape(patches.shape[:2])]
        patches = torch.where(bool_replaced_pos[..., None], centroid_patches, patches)
        return self.unpatchify(patches).to(pixel_values.dtype)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, return_reconstruction: bool = True) -> KmeansOutput:
        r"""Nearest centroids of every patch (no gradients: the ids are discrete and the centroids fixed).

        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            The [KmeansImageProcessor] view: raw [0, 1] pixels.
        return_reconstruction (`bool`, *optional*, defaults to `True`):
            Whether to return the image rebuilt from centroid pixels.
        """
        centroids = self._float_centroids()
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            patches = self.patchify(pixel_values)
            indices, sq_distances = nearest_centroids(patches.reshape(-1, patches.shape[-1]), centroids)
        indices = indices.reshape(patches.shape[:2])
        return KmeansOutput(
            indices=indices,
            sq_distances=sq_distances.reshape(patches.shape[:2]),
            reconstruction=self.unpatchify(centroids[indices]) if return_reconstruction else None,
        )


__all__ = [
    "KmeansModel",
    "KmeansOutput",
    "KmeansPreTrainedModel",
    "patchify",
    "unpatchify",
]
