"""The input view of the k-means centroid tokenizer: the ViT's 224 px bicubic view, left in raw [0, 1] pixels."""

from transformers.image_utils import PILImageResampling

from .image_processing_mim import MimImageProcessor


class KmeansImageProcessor(MimImageProcessor):
    r"""Resize to 224x224 with bicubic interpolation and rescale to [0, 1], without normalising.

    The centroids are means of raw [0, 1] patches, so a patch must be compared with them in the same units. CCViT
    feeds its ViT this same view, replaces some patches by centroid pixels, and only then normalises it
    ([`CcvitForMaskedImageModeling`] does that from its config's `image_mean` and `image_std`).
    """

    resample = PILImageResampling.BICUBIC
    do_normalize = False
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}


__all__ = ["KmeansImageProcessor"]
