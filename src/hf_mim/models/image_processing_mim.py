"""Deterministic image processors (resize, optional centre crop, rescale, normalise) without torchvision.

`MimImageProcessor` prepares the ViT's view of an image; each tokenizer ships a subclass whose
defaults describe its own input view. Training-time augmentation (random crops, two views) lives
in `hf_mim.data` and reads its sizes, interpolation and normalisation from these processors, so
one `preprocessor_config.json` is the single source of truth for a view.
"""

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    infer_channel_dimension_format,
)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image in any mode.

    PIL's own `convert("RGB")` clips 16- and 32-bit integer images to 255 (almost all white) and
    ignores transparency; here high-bit-depth images are rescaled to their full range and alpha is
    composited onto white, the way image viewers show it.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 65535.0
        else:
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        gray = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


class MimImageProcessor(PilBackend):
    r"""Resize (optionally centre-crop), rescale to [0, 1] and normalise: the ViT's evaluation view.

    The defaults are BEiT's 224 px bicubic view with ImageNet mean and standard deviation.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    @classmethod
    def for_config(cls, config, **kwargs):
        """The view a model of `config` reads (`config.image_size` px, this class's defaults; `kwargs` override)."""
        side = {"height": config.image_size, "width": config.image_size}
        return cls(**{"size": side, "crop_size": side, **kwargs})

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        if isinstance(image, Image.Image) and (do_convert_rgb if do_convert_rgb is not None else self.do_convert_rgb):
            image = to_rgb(image)
        return super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format, **kwargs)

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """The centre crop as torchvision's `CenterCrop` (the papers' evaluation and CCViT's k-means fit) takes it:
        offsets rounded to the nearest pixel, where transformers' own floor them (a pixel apart for odd margins)."""
        crop_height, crop_width = size["height"], size["width"]
        channels_first = infer_channel_dimension_format(image) == ChannelDimension.FIRST
        height, width = image.shape[-2:] if channels_first else image.shape[:2]
        if crop_height > height or crop_width > width:
            return super().center_crop(image, size, **kwargs)
        top, left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
        rows, columns = slice(top, top + crop_height), slice(left, left + crop_width)
        return image[..., rows, columns] if channels_first else image[rows, columns]

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the images this processor produces."""
        size = self.crop_size if self.do_center_crop else self.size
        if not (size.get("height") and size.get("width")):
            raise ValueError(f"{type(self).__name__} needs a fixed output size, got size={self.size}")
        return int(size["height"]), int(size["width"])

    def normalize_tensor(self, pixel_values):
        """Apply this processor's rescale/normalise to a float tensor in [0, 1] of shape (..., 3, H, W)."""
        if not self.do_normalize:
            return pixel_values
        mean = pixel_values.new_tensor(self.image_mean).view(3, 1, 1)
        std = pixel_values.new_tensor(self.image_std).view(3, 1, 1)
        return (pixel_values - mean) / std


__all__ = ["MimImageProcessor", "to_rgb"]
