"""The input view of the DALL-E dVAE tokenizer: 112 px, Lanczos, pixels logit-Laplace mapped to [0.1, 0.9]."""

from transformers.image_utils import PILImageResampling

from .image_processing_mim import MimImageProcessor


class DvaeImageProcessor(MimImageProcessor):
    r"""Resize to 112x112 with Lanczos, rescale to [0, 1] and apply DALL-E's logit-Laplace map `0.8 * x + 0.1`.

    The map is expressed as a normalisation, `(x - mean) / std` with `mean = -eps / (1 - 2 eps) = -0.125` and
    `std = 1 / (1 - 2 eps) = 1.25` (eps = 0.1), so the standard processor machinery (and `hf_mim.data`'s
    augmentations, which read mean and std from the processor) produce exactly what the released encoder was
    trained on. `for_config` sets them for a dVAE of another `logit_laplace_eps`.
    """

    resample = PILImageResampling.LANCZOS
    image_mean = (-0.125, -0.125, -0.125)
    image_std = (1.25, 1.25, 1.25)
    size = {"height": 112, "width": 112}
    crop_size = {"height": 112, "width": 112}

    @classmethod
    def for_config(cls, config, **kwargs):
        """The view of a dVAE of `config`: its `image_size`, normalised by its logit-Laplace map
        `x -> (1 - 2 eps) x + eps` with `eps = config.logit_laplace_eps`."""
        eps = config.logit_laplace_eps
        normalisation = {"image_mean": (-eps / (1 - 2 * eps),) * 3, "image_std": (1 / (1 - 2 * eps),) * 3}
        return super().for_config(config, **{**normalisation, **kwargs})


__all__ = ["DvaeImageProcessor"]
