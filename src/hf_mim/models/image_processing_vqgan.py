"""The input view of the taming VQGAN tokenizer as mc-BEiT feeds it: 112 px, Lanczos, pixels mapped to [-1, 1]."""

from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling

from .image_processing_mim import MimImageProcessor


class VqganImageProcessor(MimImageProcessor):
    r"""Resize to 112x112 with Lanczos, rescale to [0, 1] and normalise with mean 0.5 and std 0.5, i.e. to [-1, 1]
    (the range taming's VQGANs were trained on). At 112 px the f=8 encoder gives a 14x14 grid, one token per 16 px
    patch of a 224 px ViT view; a 224 px tokenizer view would give 28x28 and break that alignment."""

    resample = PILImageResampling.LANCZOS
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 112, "width": 112}
    crop_size = {"height": 112, "width": 112}


__all__ = ["VqganImageProcessor"]
