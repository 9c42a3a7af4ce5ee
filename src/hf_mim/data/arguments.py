"""Command-line dataset and masking options shared by the training and evaluation scripts, and the loading and
masking they describe.

Each script's `HfArgumentParser` dataclass subclasses one of these and adds only its own options, so a flag has the
same name, default and help in every script.
"""

import dataclasses
import os
from dataclasses import dataclass, field

from datasets import DatasetDict, IterableDatasetDict

from ..arguments import flags_set
from ..errors import UsageError
from .datasets import load_image_datasets
from .masking import BlockwiseMaskingGenerator, RandomMaskingGenerator, scale_num_patches


@dataclass
class ImageDatasetArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset or a `datasets` builder such as 'imagefolder' (the default with --train_dir)"},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration"})
    train_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of training images, searched recursively (for labels: one subfolder per class)"},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of validation images, laid out as --train_dir"}
    )
    train_val_split: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training images held out for validation when there is no validation split"},
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "The image column (default: 'image', else 'img', else the first Image column)"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep this many training images (a seeded random subset), for quick runs"}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep this many validation images (a seeded random subset), for quick runs"}
    )

    def __post_init__(self):
        if not 0.0 <= self.train_val_split < 1.0:
            raise UsageError(
                f"--train_val_split is the fraction of training images held out, in [0, 1); got {self.train_val_split}"
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} keeps that many images: pass at least 1 (or leave it unset), got {value}")
        if self.train_dir and self.validation_dir and os.path.realpath(self.train_dir) == os.path.realpath(self.validation_dir):
            # Every score would be on training images (a k-NN finds each image itself: 100%).
            raise UsageError(
                f"--validation_dir {self.validation_dir} is --train_dir: every validation image is a training image; "
                "pass a folder of held-out images, or --train_val_split to hold some back"
            )
        _continue_post_init(self, ImageDatasetArguments)


def _continue_post_init(arguments, declaring_class) -> None:
    """Run the next `__post_init__` in the MRO after `declaring_class`'s: the scripts' argument dataclasses combine
    several of these, and each one's checks must run."""
    parent = getattr(super(declaring_class, arguments), "__post_init__", None)
    if parent is not None:
        parent()


def _with_help(name: str, help_text: str):
    """`ImageDatasetArguments`'s field `name` (same default, same place among the options) with another help."""
    base = ImageDatasetArguments.__dataclass_fields__[name]
    return field(default=base.default, metadata={**base.metadata, "help": help_text})


@dataclass
class StreamingImageDatasetArguments(ImageDatasetArguments):
    """For scripts that can train from an `IterableDataset`."""

    # Re-declared only for their help, which says what --streaming keeps (scripts without --streaming do not have it).
    max_train_samples: int | None = _with_help(
        "max_train_samples",
        "Keep this many training images (a seeded random subset; with --streaming, the first this many), for quick "
        "runs",
    )
    max_eval_samples: int | None = _with_help(
        "max_eval_samples",
        "Keep this many validation images (a seeded random subset; with --streaming, the first this many), for "
        "quick runs",
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the dataset while training instead of downloading it first (needs --max_steps)"},
    )


@dataclass
class LabelledImageDatasetArguments(ImageDatasetArguments):
    """For scripts that read class labels."""

    label_column_name: str = field(default="label", metadata={"help": "The column of class labels (ids or names)"})


@dataclass
class RenderingArguments:
    """How the training commands draw and render their training views ([`TwoViewTransform`])."""

    crop_min_scale: float | None = field(
        default=None,
        metadata={"help": "Random-resized-crop minimum area, a fraction of the image (default: the recipe's. "
                  "BEiT v2 and CCViT pre-training 0.2, otherwise 0.08)"},
    )
    color_jitter: float | None = field(
        default=None,
        metadata={"help": "Brightness/contrast/saturation jitter strength; 0 disables it (default: the recipe's. "
                  "Pre-training 0.4, mcbeit and ccvit 0; fine-tuning 0 under RandAugment, else 0.4; tokenizers 0)"},
    )
    exact_augmentation: bool = field(
        default=False,
        metadata={"help": "Render training views exactly as torchvision's PIL pipeline (jitter the whole image, flip, "
                  "crop; slower). Default: the same draws rendered from the crop alone, torch resampling bicubic and "
                  "Lanczos views, jitter after resampling (differences in benchmarks/README.md)"},
    )

    def __post_init__(self):
        if self.crop_min_scale is not None and not 0.0 < self.crop_min_scale <= 1.0:
            raise UsageError(f"--crop_min_scale is a fraction of the image's area, in (0, 1]; got {self.crop_min_scale}")
        if self.color_jitter is not None and self.color_jitter < 0:
            raise UsageError(f"--color_jitter is a strength >= 0 (0 disables it), got {self.color_jitter}")
        _continue_post_init(self, RenderingArguments)

    def with_view_defaults(self, color_jitter: float | None = None):
        """A copy whose unset rendering flags hold what the views are drawn with: `color_jitter`, the command's recipe
        (pre-training's methods fill in theirs before), and torchvision's minimum crop area 0.08 (BEiT's and mc-BEiT's
        recipe). A run records these values, so a resumption that spells out a default is not taken for a change."""
        if self.color_jitter is None and color_jitter is None:
            raise ValueError("--color_jitter is unset and no default was given: fill in the recipe's defaults first")
        return dataclasses.replace(
            self,
            color_jitter=color_jitter if self.color_jitter is None else self.color_jitter,
            crop_min_scale=0.08 if self.crop_min_scale is None else self.crop_min_scale,
        )

    def view_options(self) -> dict:
        """`TwoViewTransform`'s crop, jitter and rendering arguments of these flags ([`with_view_defaults`] first)."""
        if self.color_jitter is None or self.crop_min_scale is None:
            raise ValueError("--color_jitter or --crop_min_scale is unset: fill in the recipe's defaults first")
        return {
            "crop_scale": (self.crop_min_scale, 1.0), "color_jitter": self.color_jitter, "exact": self.exact_augmentation
        }


# Flags recorded unset (None) in runs of hf_mim before runs recorded the values they resolve to
# (`RenderingArguments.with_view_defaults`, `MaskingArguments.with_grid_defaults`).
RESOLVED_DEFAULT_FLAGS = ("color_jitter", "crop_min_scale", "num_mask_patches", "min_mask_patches_per_block")
# The flags each masking reads.
MASKING_FLAGS = {
    "blockwise": ("num_mask_patches", "min_mask_patches_per_block", "max_mask_patches_per_block", "exact_mask_count"),
    "random": ("mask_ratio",),
}


@dataclass
class MaskingArguments:
    """The masking flags of the commands that mask patches; those left unset (None) take the method's defaults
    (`hf_mim.families.MimMethod.with_data_defaults`)."""

    masking: str | None = field(
        default=None, metadata={"help": "blockwise (BEiT's blocks) or random (default blockwise; mcbeit: random)"}
    )
    num_mask_patches: int | None = field(
        default=None,
        metadata={"help": "Patches masked per image by blockwise masking (default 75 of 196, scaled to the patch "
                  "grid)"},
    )
    min_mask_patches_per_block: int | None = field(
        default=None, metadata={"help": "Smallest masked block (default 16 of 196, scaled)"}
    )
    max_mask_patches_per_block: int | None = field(
        default=None, metadata={"help": "Largest masked block (default: --num_mask_patches)"}
    )
    exact_mask_count: bool = field(
        default=True, metadata={"help": "Mask exactly --num_mask_patches (BEiT v2); false: at most (BEiT v1)"}
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Masked fraction of --masking random (default 0.4; mcbeit: 0.75)"}
    )

    def __post_init__(self):
        if self.masking is not None and self.masking not in MASKING_FLAGS:
            raise UsageError(f"--masking must be one of {list(MASKING_FLAGS)}, got {self.masking!r}")
        for name in ("num_mask_patches", "min_mask_patches_per_block", "max_mask_patches_per_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1 (or unset for the default), got {value}")
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise UsageError(f"--mask_ratio is the masked fraction of the patches, in (0, 1); got {self.mask_ratio}")
        _continue_post_init(self, MaskingArguments)

    def with_grid_defaults(self, grid_size: int):
        """A copy (with the method's defaults filled in) whose unset blockwise counts hold those of a `grid_size`
        patch grid: BEiT's 75 masked patches in blocks of at least 16, of 196, scaled to the grid. A run records these
        values, so a resumption that spells out a default is not taken for a change. An unset largest block stays
        unset: it follows the masked count."""
        if self.masking != "blockwise":
            return self
        num_patches = grid_size * grid_size
        num_mask = self.num_mask_patches
        if num_mask is None:
            num_mask = scale_num_patches(75, to_grid=num_patches)
        min_block = self.min_mask_patches_per_block
        if min_block is None:
            min_block = min(num_mask, scale_num_patches(16, to_grid=num_patches))
        return dataclasses.replace(self, num_mask_patches=num_mask, min_mask_patches_per_block=min_block)

    def check_masking_flags(self, default_masking: str) -> None:
        """A one-line error for a flag of the other masking than the one that applies (`--masking`, else the method's
        `default_masking`): it would be ignored."""
        masking = self.masking or default_masking
        for kind, names in MASKING_FLAGS.items():
            given = [] if kind == masking else flags_set(self, names)
            if given:
                raise UsageError(
                    f"--{given[0]} sets {kind} masking, but the masking is {masking} and would ignore it: remove it "
                    f"or pass --masking {kind}"
                )


def build_mask_generator(args: MaskingArguments, grid_size: int):
    """The mask generator of the flags `args` (with the method's defaults filled in) for a `grid_size` patch grid."""
    if args.masking == "random":
        if args.mask_ratio is None:
            raise ValueError("--masking random needs a mask_ratio: fill in the method's defaults first")
        return RandomMaskingGenerator(grid_size, mask_ratio=args.mask_ratio)
    if args.masking != "blockwise":
        raise ValueError(f"masking is {args.masking!r}: fill in the method's defaults first")
    args = args.with_grid_defaults(grid_size)
    num_mask, min_block = args.num_mask_patches, args.min_mask_patches_per_block
    max_block = num_mask if args.max_mask_patches_per_block is None else args.max_mask_patches_per_block
    num_patches = grid_size * grid_size
    if num_mask >= num_patches:
        raise UsageError(
            f"--num_mask_patches {num_mask} masks every patch of the {grid_size}x{grid_size} grid: pass fewer than "
            f"{num_patches}"
        )
    if not min_block <= min(max_block, num_mask):
        raise UsageError(
            f"--min_mask_patches_per_block {min_block} exceeds --max_mask_patches_per_block {max_block} or "
            f"--num_mask_patches {num_mask}: no block fits; lower it"
        )
    return BlockwiseMaskingGenerator(
        grid_size,
        num_masking_patches=num_mask,
        min_num_patches=min_block,
        max_num_patches=args.max_mask_patches_per_block,
        exact=args.exact_mask_count,
    )


def load_image_datasets_from_args(
    args: ImageDatasetArguments,
    seed: int,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    evaluate: bool | None = None,
) -> tuple[DatasetDict | IterableDatasetDict, str]:
    """[`load_image_datasets`] with the options of `args`; `seed` splits and truncates, `cache_dir` and `token` go to
    `datasets.load_dataset`. `evaluate=True` (the command evaluates) fails before any work is done when no validation
    split results; `evaluate=False` (it does not) refuses the options that only make a validation split, which it
    would ignore (a `--train_val_split` would even hold images back from training)."""
    if evaluate is False:
        given = [f"--{name}" for name in ("validation_dir", "train_val_split", "max_eval_samples") if getattr(args, name)]
        if given:
            raise UsageError(
                f"{', '.join(given)} only {'give' if len(given) > 1 else 'gives'} images to evaluate on, and the run "
                "does not evaluate: add --do_eval or remove them"
            )
    raw, image_column = load_image_datasets(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        train_val_split=args.train_val_split,
        image_column_name=args.image_column_name,
        streaming=isinstance(args, StreamingImageDatasetArguments) and args.streaming,
        cache_dir=cache_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=seed,
        token=token,
        class_folders=isinstance(args, LabelledImageDatasetArguments),
    )
    if evaluate:
        require_validation_split(raw)
    return raw, image_column


def require_validation_split(raw: DatasetDict | IterableDatasetDict) -> None:
    """The error of every script asked to evaluate on datasets without a "validation" split; call it before any
    work (training, fitting) so that a long run does not end in it."""
    if "validation" not in raw:
        raise UsageError(
            "Evaluation needs a validation split, and the dataset has none: pass --validation_dir, or "
            "--train_val_split 0.05 to hold out 5% of the training images"
        )


__all__ = [
    "ImageDatasetArguments",
    "LabelledImageDatasetArguments",
    "MaskingArguments",
    "RESOLVED_DEFAULT_FLAGS",
    "RenderingArguments",
    "StreamingImageDatasetArguments",
    "build_mask_generator",
    "load_image_datasets_from_args",
    "require_validation_split",
]
