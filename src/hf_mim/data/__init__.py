"""Data pipeline for masked image modeling: decoding, two-view augmentation, masking, datasets and collation.

Everything here is plain PIL, numpy and torch (no torchvision), and all randomness derives from
torch's global RNG, so DataLoader workers, `transformers.set_seed` and checkpoint resumption
control it.
"""

from .collator import MimDataCollator
from .datasets import apply_transform, load_image_datasets
from .images import SkippedImageCounter, decode_image
from .masking import (
    BlockwiseMaskingGenerator,
    RandomMaskingGenerator,
    ReplacementPositionGenerator,
    numpy_rng_from_torch,
    scale_num_patches,
)
from .transforms import TwoViewTransform, random_resized_crop_box


__all__ = [
    "BlockwiseMaskingGenerator",
    "MimDataCollator",
    "RandomMaskingGenerator",
    "ReplacementPositionGenerator",
    "SkippedImageCounter",
    "TwoViewTransform",
    "apply_transform",
    "decode_image",
    "load_image_datasets",
    "numpy_rng_from_torch",
    "random_resized_crop_box",
    "scale_num_patches",
]
