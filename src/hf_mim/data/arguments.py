"""Command-line dataset options shared by the training and evaluation scripts, and the loading they describe.

Each script's `HfArgumentParser` dataclass subclasses one of these and adds only its own options, so a flag has the
same name, default and help in every script.
"""

from dataclasses import dataclass, field

from datasets import DatasetDict, IterableDatasetDict

from ..errors import UsageError
from .datasets import load_image_datasets


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


def load_image_datasets_from_args(
    args: ImageDatasetArguments,
    seed: int,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    require_validation: bool = False,
) -> tuple[DatasetDict | IterableDatasetDict, str]:
    """[`load_image_datasets`] with the options of `args`; `seed` splits and truncates, `cache_dir` and `token` go to
    `datasets.load_dataset`. `require_validation` fails before any work is done when no validation split results."""
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
    )
    if require_validation:
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
    "StreamingImageDatasetArguments",
    "load_image_datasets_from_args",
    "require_validation_split",
]
