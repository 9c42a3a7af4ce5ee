"""The input view of the VQ-KD tokenizer: 224 px, bicubic, pixels in [0, 1] without mean/std normalisation."""

from transformers.image_utils import PILImageResampling

from .image_processing_mim import MimImageProcessor

_NORMALIZE_ERROR = (
    "VqkdImageProcessor cannot normalise: the VQ-KD tokenizer expects pixels in [0, 1] and maps them to [-1, 1] "
    "itself (mean/std-normalised pixels give meaningless tokens). Leave do_normalize=False; the ViT's own view is "
    "normalised by its MimImageProcessor."
)


class VqkdImageProcessor(MimImageProcessor):
    r"""Resize to 224x224 with bicubic interpolation and rescale to [0, 1]: BEiT v2's tokenizer view.

    Normalisation is deliberately impossible (`do_normalize=True` raises): feeding the tokenizer ImageNet-normalised
    pixels is the classic BEiT v2 mistake, and [`VqkdModel`] also refuses inputs outside [0, 1].
    """

    resample = PILImageResampling.BICUBIC
    do_normalize = False
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.do_normalize:
            raise ValueError(_NORMALIZE_ERROR)

    def _validate_preprocess_kwargs(self, do_normalize=None, **kwargs):
        if do_normalize:
            raise ValueError(_NORMALIZE_ERROR)
        super()._validate_preprocess_kwargs(do_normalize=do_normalize, **kwargs)

    def normalize_tensor(self, pixel_values):
        """The [0, 1] tensor unchanged (what `hf_mim.data.TwoViewTransform` asks of a view's processor)."""
        if self.do_normalize:
            raise ValueError(_NORMALIZE_ERROR)
        return pixel_values


__all__ = ["VqkdImageProcessor"]
