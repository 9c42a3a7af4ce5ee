"""The input view of the feature k-means tokenizer: the ViT's 224 px bicubic view, left in raw [0, 1] pixels."""

from transformers.image_utils import PILImageResampling

from .image_processing_mim import MimImageProcessor


class FeatureKmeansImageProcessor(MimImageProcessor):
    r"""Resize to 224x224 with bicubic interpolation and rescale to [0, 1], without normalising.

    [`FeatureKmeansModel`] resizes this view to its teacher's patch grid and normalises it with the teacher's own
    statistics (`teacher_image_mean`, `teacher_image_std` of its config), as BEiT v2's tokenizer feeds its teacher.
    """

    resample = PILImageResampling.BICUBIC
    do_normalize = False
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}


__all__ = ["FeatureKmeansImageProcessor"]
