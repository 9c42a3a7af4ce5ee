"""The input view of the DALL-E dVAE tokenizer: 112 px, Lanczos, pixels logit-Laplace mapped to [0.1, 0.9]."""

from transformers.image_utils import PILImageResampling

from .image_processing_mim import MimImageProcessor


class DvaeImageProcessor(MimImageProcessor):
    r"""Resize to 112x112 with Lanczos, rescale to [0, 1] and apply DALL-E's logit-Laplace map `0.8 * x + 0.1`.

    The map is expressed as a normalisation, `(x - mean) / std` with `mean = -eps / (1 - 2 eps) = -0.125` and
    `std = 1 / (1 - 2 eps) = 1.25` (eps = 0.1), so the standard processor machinery (and `hf_mim.data`'s
    augmentations, which read mean and std from the processor) produce exactly what the released encoder was
    trained on. A dVAE with another `logit_laplace_eps` needs `image_mean`/`image_std` set accordingly.
    """

    resample = PILImageResampling.LANCZOS
    image_mean = (-0.125, -0.125, -0.125)
    image_std = (1.25, 1.25, 1.25)
    size = {"height": 112, "width": 112}
    crop_size = {"height": 112, "width": 112}


__all__ = ["DvaeImageProcessor"]
