"""Data pipeline for masked image modeling: decoding, two-view augmentation, masking, datasets and collation.

Everything here is plain PIL, numpy and torch (no torchvision). Randomness comes from a generator
per example seeded by (seed, epoch, index) when `apply_transform` is given a seed (what the training
scripts do, so that a resumed run redraws exactly the same data), else from torch's global RNG.
"""

from .arguments import (
    ImageDatasetArguments,
    LabelledImageDatasetArguments,
    MaskingArguments,
    RenderingArguments,
    StreamingImageDatasetArguments,
    build_mask_generator,
    load_image_datasets_from_args,
)
from .augment import RAND_AUGMENT_OPS, RandAugment, RandomErasing, parse_rand_augment
from .collator import MimDataCollator
from .datasets import (
    SeededTransformedDataset,
    apply_transform,
    example_rng,
    load_image_datasets,
    require_label_column,
    unseen_labels,
)
from .images import SkippedImageCounter, decode_image
from .masking import (
    BlockwiseMaskingGenerator,
    RandomMaskingGenerator,
    ReplacementPositionGenerator,
    numpy_rng_from_torch,
    scale_num_patches,
)
from .transforms import CENTER_CROP_FRACTION, TwoViewTransform, center_crop_view, random_resized_crop_box


__all__ = [
    "BlockwiseMaskingGenerator",
    "CENTER_CROP_FRACTION",
    "ImageDatasetArguments",
    "LabelledImageDatasetArguments",
    "MaskingArguments",
    "MimDataCollator",
    "RAND_AUGMENT_OPS",
    "RandAugment",
    "RandomErasing",
    "RandomMaskingGenerator",
    "RenderingArguments",
    "ReplacementPositionGenerator",
    "SeededTransformedDataset",
    "SkippedImageCounter",
    "StreamingImageDatasetArguments",
    "TwoViewTransform",
    "apply_transform",
    "build_mask_generator",
    "center_crop_view",
    "decode_image",
    "example_rng",
    "load_image_datasets",
    "load_image_datasets_from_args",
    "numpy_rng_from_torch",
    "parse_rand_augment",
    "random_resized_crop_box",
    "require_label_column",
    "scale_num_patches",
    "unseen_labels",
]
