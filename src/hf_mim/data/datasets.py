"""Loading image datasets (Hub or local imagefolder, map-style or streaming) and attaching a transform lazily."""

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from PIL import Image

from ..cli import is_main_launch_process
from ..errors import UsageError, first_line
from .images import SkippedImageCounter, decode_image


logger = logging.getLogger(__name__)

# datasets' builders of local files, which read the working directory when given no data files.
LOCAL_BUILDERS = ("imagefolder", "webdataset", "parquet", "arrow", "json", "csv")
_METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _read_extensions() -> frozenset[str]:
    """The extensions of the files `datasets`' imagefolder reads; it leaves any other file out without a word."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(ImageFolder.EXTENSIONS)


@dataclass
class ImageFolderScan:
    """What a folder of images holds, as an imagefolder reads it."""

    folder: str
    images_at_depth: dict[int, str] = field(default_factory=dict)
    """The first image path, in name order, at each depth below the folder (1: directly in it, 2: in a class
    folder, ...)."""
    class_folders: set[str] = field(default_factory=set)
    """The folders directly under the folder that hold images of a class folder (depth 2)."""
    left_out: Counter = field(default_factory=Counter)
    """How many files of each extension are neither images nor metadata files, and so are not read."""
    has_metadata: bool = False
    """Whether a metadata file (metadata.csv/.jsonl/.parquet) gives the images their columns, labels included."""
    empty_folders: set[str] = field(default_factory=set)
    """The folders directly under the folder that hold no image at any depth (an imagefolder makes no class of
    them)."""


def require_image_folder(flag: str, folder: str, extensions: Iterable[str] | None = None) -> ImageFolderScan:
    """A one-line error naming `--flag` unless `folder` exists and holds at least one image file (recursively):
    `datasets` would only say that a split "corresponds to no data". `extensions` are those of the files read
    (default: PIL's); the scan says what the folder holds besides."""
    if os.path.isfile(folder):
        raise UsageError(
            f"--{flag} {folder} is a file, not a folder (an archive? extract it); pass a folder of images (searched "
            "recursively)"
        )
    if not os.path.isdir(folder):
        raise UsageError(f"--{flag} {folder}: no such folder; pass a folder of images (searched recursively)")
    if extensions is None:
        extensions = (extension.lower() for extension in Image.registered_extensions())
    extensions = set(extensions)
    scan = ImageFolderScan(folder)
    holding_images = set()
    for root, folders, names in os.walk(folder):
        # datasets skips hidden and special folders (.ipynb_checkpoints, __MACOSX); errors name the first path in
        # name order.
        folders[:] = sorted(name for name in folders if not name.startswith((".", "__")))
        relative = [] if root == folder else os.path.relpath(root, folder).split(os.sep)
        depth = len(relative) + 1
        if root == folder:
            scan.empty_folders.update(folders)
        for name in sorted(names):
            extension = os.path.splitext(name)[1].lower()
            if extension in extensions:
                scan.images_at_depth.setdefault(depth, os.path.join(root, name))
                if relative:
                    holding_images.add(relative[0])
                if depth == 2:
                    scan.class_folders.add(os.path.basename(root))
            elif name in _METADATA_FILENAMES:
                scan.has_metadata = True
            elif not name.startswith("."):
                scan.left_out[extension or name] += 1
    scan.empty_folders -= holding_images
    if not scan.images_at_depth:
        left_out = f" (it holds {_describe_counts(scan.left_out)})" if scan.left_out else ""
        raise UsageError(
            f"--{flag} {folder} holds no image files (.jpg, .png, ..., searched recursively){left_out}; pass the "
            "folder of your images"
        )
    return scan


def _describe_counts(counts: Counter) -> str:
    commonest = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5]
    return ", ".join(f"{count} {extension}" for extension, count in commonest) + (", ..." if len(counts) > 5 else "")


def _require_class_folders(flag: str, scan: ImageFolderScan, training: bool) -> None:
    """Labels come from the folder each image sits in, so every image must sit in a class folder right under the
    folder given, and training needs two classes at least."""
    if scan.has_metadata:
        return
    misplaced = {depth: path for depth, path in scan.images_at_depth.items() if depth != 2}
    if misplaced:
        depth, path = min(misplaced.items())
        where = "directly in it, outside any class folder" if depth == 1 else f"{depth - 1} folders down"
        raise UsageError(
            f"--{flag} {scan.folder}: {path} sits {where}; labels are the names of the folders right under "
            f"{scan.folder}: lay the images out as {os.path.join(scan.folder, '<class>', '<image>')}"
        )
    if training and len(scan.class_folders) < 2:
        raise UsageError(
            f"--{flag} {scan.folder} has one class folder ({sorted(scan.class_folders)[0]!r}); a classifier needs "
            f"the images of two classes at least, in {os.path.join(scan.folder, '<class>', '<image>')}"
        )


def _resolve_image_column(dataset: datasets.Dataset | IterableDataset, image_column_name: str | None) -> str:
    column_names, features = dataset.column_names, dataset.features
    if column_names is None:  # a streaming dataset whose features are only known once iterated
        if image_column_name is None:
            raise UsageError("The dataset's columns are unknown until it is read; pass image_column_name")
        return image_column_name
    if image_column_name is not None:
        if image_column_name not in column_names:
            raise UsageError(
                f"--image_column_name {image_column_name!r} is not a column of the dataset; its columns are "
                f"{column_names}"
            )
        feature = features[image_column_name]
        # Images may be stored as paths or bytes without an Image feature, but never as class ids or numbers.
        if isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string", "string_view", "binary", "large_binary", "binary_view")
        ):
            images = [name for name, other in features.items() if isinstance(other, datasets.Image)]
            raise UsageError(
                f"image_column_name {image_column_name!r} holds {type(feature).__name__} values, not images; pass "
                f"the image column ({', '.join(map(repr, images)) or 'none has an Image feature'})"
            )
        return image_column_name
    for name in ("image", "img"):
        if name in column_names:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise UsageError(
        f"Could not find an image column among {column_names} (looked for 'image', 'img' and any Image-typed "
        f"column); pass image_column_name"
    )


def require_label_column(raw, label_column: str, describe: Callable[[str], str] = lambda split: f"the {split} split"):
    """A one-line error when a split of `raw` has no `label_column`, or when that column holds the images;
    `describe(split)` names where the user's split comes from."""
    for split in raw:
        columns = raw[split].column_names
        if label_column not in columns:
            raise UsageError(
                f"--label_column_name {label_column!r}: {describe(split)} has no such column (columns: {columns}); "
                "pass the column of class labels, or use an imagefolder with one folder per class"
            )
        if isinstance(raw[split].features[label_column], datasets.Image):
            raise UsageError(
                f"--label_column_name {label_column!r} is the image column of {describe(split)}; pass the column of "
                f"class labels (columns: {columns})"
            )


def unseen_labels(raw, label_column: str, split: str) -> list:
    """The labels of `raw[split]` that no example of `raw["train"]` has, sorted (class names for a `ClassLabel`
    column: an imagefolder names the classes of every split, so a class found only in validation has an id too)."""
    unseen = sorted(set(raw[split].unique(label_column)) - set(raw["train"].unique(label_column)))
    feature = raw[split].features[label_column]
    return [feature.int2str(label) for label in unseen] if isinstance(feature, datasets.ClassLabel) else unseen


def _undecoded(dataset: datasets.Dataset | IterableDataset, image_column: str):
    """The dataset with its image column left as bytes/paths, for `decode_image` to decode (or skip)."""
    feature = dataset.features.get(image_column) if dataset.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def load_image_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.0,
    image_column_name: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    token: str | bool | None = None,
    class_folders: bool = False,
    dir_flags: tuple[str, str] = ("train_dir", "validation_dir"),
) -> tuple[DatasetDict | IterableDatasetDict, str]:
    """Load the training (and validation) images and find the image column.

    Args:
        dataset_name: A Hub dataset or a builder such as `"imagefolder"`; defaults to `"imagefolder"`
            when `train_dir` is given.
        dataset_config_name: The dataset configuration, if any.
        train_dir, validation_dir: Local image folders (searched recursively) for the "train" and
            "validation" splits.
        train_val_split: Fraction of "train" split off as "validation" when the dataset has no
            validation split (map-style datasets only); 0 keeps all of "train".
        image_column_name: The image column; by default "image", else "img", else the first
            column with an `Image` feature.
        streaming: Load `IterableDataset`s that read data as they iterate.
        cache_dir, token: Passed to `datasets.load_dataset`.
        max_train_samples, max_eval_samples: Truncate the splits (after a seeded shuffle for
            map-style datasets; the first examples for streaming ones), for debugging or quick runs.
        seed: Seed of the validation split and of the truncation shuffle.
        class_folders: Label the images of `train_dir` and `validation_dir` by their class folder
            (`<dir>/<class>/<image>`; a "label" column), refusing other layouts and a single training class,
            unless a metadata file gives the labels.
        dir_flags: The command's flags for `train_dir` and `validation_dir`, which its errors name.

    Returns:
        The datasets with a "train" split (and "validation" when available), the image column
        stored undecoded (`datasets.Image(decode=False)`, so that [`decode_image`] can skip bad
        files), and the name of the image column.
    """
    if dataset_name is None and train_dir is None:
        raise UsageError("Pass dataset_name (a Hub dataset or 'imagefolder') or train_dir (a local image folder)")
    data_files, builder_options = None, {}
    if validation_dir is not None and train_val_split > 0:
        raise UsageError(
            f"--train_val_split holds training images out for validation, but --{dir_flags[1]} gives the validation "
            "images: remove one of them"
        )
    if train_dir is not None and dataset_name is not None and dataset_name not in LOCAL_BUILDERS:
        raise UsageError(
            f"--dataset_name {dataset_name} loads a Hub dataset, but --{dir_flags[0]} gives local images: pass one of "
            "them (a model card names its datasets with `hf-mim push --dataset`)"
        )
    if train_dir is not None and dataset_config_name is not None and (dataset_name or "imagefolder") in LOCAL_BUILDERS:
        # The builder would take it as a cache name and read the folder all the same.
        raise UsageError(
            f"--dataset_config_name {dataset_config_name} picks a configuration of a Hub dataset; the images of "
            f"--{dir_flags[0]} have none: remove it"
        )
    if train_dir is not None or validation_dir is not None:
        if train_dir is None:
            raise UsageError("validation_dir needs train_dir as well: pass the folder of the training images")
        folders = dict(zip(dir_flags, (train_dir, validation_dir)))
        scans = {
            flag: require_image_folder(flag, folder, _read_extensions())
            for flag, folder in folders.items()
            if folder is not None
        }
        for flag, scan in scans.items():
            if class_folders:
                _require_class_folders(flag, scan, training=flag == dir_flags[0])
                if scan.empty_folders and not scan.has_metadata and is_main_launch_process():
                    logger.warning(
                        "--%s %s: the folders %s hold no images, so no class is read from them", flag,
                        scan.folder, sorted(scan.empty_folders),
                    )  # fmt: skip
            if scan.left_out and is_main_launch_process():
                logger.warning(
                    "--%s %s: left out %d file(s) that %s does not read as images (%s)", flag, scan.folder,
                    sum(scan.left_out.values()), dataset_name or "imagefolder", _describe_counts(scan.left_out),
                )
        if class_folders and (dataset_name or "imagefolder") == "imagefolder":
            if not any(scan.has_metadata for scan in scans.values()):
                # datasets labels images by their folder only when every image of every split sits at one depth of
                # the file system, so a validation folder elsewhere would drop the labels of both splits.
                builder_options["drop_labels"] = False
        # The split key must be "validation": run_mim's "val" key made --validation_dir a silent no-op.
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            data_files["validation"] = os.path.join(validation_dir, "**")
    elif dataset_name in LOCAL_BUILDERS:
        # Without data files the builder reads the working directory, whatever it holds.
        raise UsageError(f"--dataset_name {dataset_name} reads local image folders: pass the training images as "
                         "--train_dir")
    try:
        raw = load_dataset(
            dataset_name or "imagefolder",
            dataset_config_name,
            data_files=data_files,
            cache_dir=cache_dir,
            token=token,
            streaming=streaming,
            **builder_options,
        )
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        # A Hub dataset that cannot be reached or found, or a configuration it does not have.
        if data_files is not None or isinstance(error, UsageError):
            raise
        configuration = f" --dataset_config_name {dataset_config_name}" if dataset_config_name else ""
        named = f"--dataset_name {dataset_name}{configuration}"
        raise UsageError(
            f"{named} could not be loaded: {first_line(error)}; check the name (and the network, or HF_HUB_OFFLINE), "
            "or pass a local folder of images as --train_dir"
        ) from error
    if "train" not in raw:
        raise UsageError(f"The dataset has no 'train' split (its splits: {list(raw)}); pick a dataset that has one")

    if "validation" in raw and train_val_split > 0:
        raise UsageError(
            f"--dataset_name {dataset_name} has a validation split, so --train_val_split would not be used: remove it"
        )
    if "validation" not in raw and train_val_split > 0:
        if streaming:
            raise UsageError(
                "--train_val_split cannot split a streaming dataset; pass --validation_dir, use a dataset with a "
                "'validation' split, or load it without --streaming"
            )
        total = len(raw["train"])
        held_out = math.ceil(total * train_val_split)
        if held_out >= total:
            raise UsageError(
                f"--train_val_split {train_val_split:g} holds {held_out} of the {total} training images out for "
                "validation, leaving none to train on: pass a smaller fraction"
            )
        split = raw["train"].train_test_split(test_size=train_val_split, seed=seed)
        raw["train"], raw["validation"] = split["train"], split["test"]

    for split_name, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None and split_name in raw:
            if streaming:
                raw[split_name] = raw[split_name].take(limit)
            else:
                shuffled = raw[split_name].shuffle(seed=seed)
                raw[split_name] = shuffled.select(range(min(limit, len(shuffled))))

    image_column = _resolve_image_column(raw["train"], image_column_name)
    for split_name in raw:
        raw[split_name] = _undecoded(raw[split_name], image_column)
    return raw, image_column


class _TransformImages:
    """What `apply_transform` installs; a module-level class, so spawned DataLoader workers can unpickle it."""

    def __init__(
        self,
        image_column: str,
        transform: Callable,
        skipped: SkippedImageCounter | None,
        keep_columns: tuple[str, ...],
    ):
        self.image_column = image_column
        self.transform = transform
        self.skipped = skipped
        self.keep_columns = keep_columns

    def _transform_image(self, value, rng: np.random.Generator | None = None) -> dict | None:
        image = decode_image(value)
        if image is None:
            if self.skipped is not None:
                self.skipped.increment()
            return None
        return self.transform(image) if rng is None else self.transform(image, rng=rng)

    def transform_example(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        # An undecodable image yields {"pixel_values": None}, all the collator needs to drop the example.
        outputs = self._transform_image(example[self.image_column], rng) or {"pixel_values": None}
        if rng is not None:
            outputs = {**outputs, "rng": rng}
        return {**outputs, **{name: example[name] for name in self.keep_columns}}

    def transform_batch(self, batch: dict[str, list]) -> dict[str, list]:
        outputs = [self._transform_image(value) for value in batch[self.image_column]]
        keys = next((list(output) for output in outputs if output is not None), ["pixel_values"])
        transformed = {key: [None if output is None else output[key] for output in outputs] for key in keys}
        return {**transformed, **{name: batch[name] for name in self.keep_columns}}


def _decoded(example: dict) -> bool:
    return example["pixel_values"] is not None


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of example `index` in epoch `epoch` of a run seeded with `seed`."""
    return np.random.default_rng((seed, epoch, index))


class SeededTransformedDataset(torch.utils.data.Dataset):
    r"""A map-style dataset whose example `index` is transformed, in epoch `epoch`, with `example_rng(seed, epoch, index)`.

    Each example also carries that generator under `"rng"`, from which [`MimDataCollator`] draws the example's mask.
    An example's crop, jitter, flip and mask are thus a function of (seed, epoch, index) alone: they do not depend on
    torch's global RNG, on DataLoader workers or prefetching, or on the other examples of the batch, which is what
    makes a resumed run redraw exactly the data of an uninterrupted one. `set_epoch` must be called before each
    epoch ([`MimTrainer`] does it). The epoch lives in shared memory, so persistent DataLoader workers, which keep
    the copy of the dataset they started with, see every `set_epoch` of the main process.
    """

    def __init__(self, dataset: datasets.Dataset, function: _TransformImages, seed: int):
        if seed < 0:
            raise UsageError(f"seed must be a non-negative integer to seed per-example generators, got {seed}")
        self.dataset = dataset.select_columns([function.image_column, *function.keep_columns])
        self.function = function
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.function.transform_example(self.dataset[index], example_rng(self.seed, self.epoch, int(index)))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # One Arrow read per batch, as `datasets.Dataset.__getitems__` does.
        columns = self.dataset[list(indices)]
        epoch = self.epoch
        return [
            self.function.transform_example(
                {name: values[i] for name, values in columns.items()}, example_rng(self.seed, epoch, int(index))
            )
            for i, index in enumerate(indices)
        ]


def apply_transform(
    dataset: datasets.Dataset | IterableDataset,
    image_column: str,
    transform: Callable,
    skipped: SkippedImageCounter | None = None,
    keep_columns: Iterable[str] = (),
    seed: int | None = None,
) -> datasets.Dataset | IterableDataset | SeededTransformedDataset:
    """Decode and transform images lazily, on access (map-style) or while iterating (streaming).

    Each example becomes the dict `transform(image)` returns (e.g. `pixel_values` and
    `tokenizer_pixel_values`) plus the `keep_columns`. An undecodable image gives an example
    whose transform outputs are None; [`MimDataCollator`] drops those.

    Args:
        dataset: A map-style `datasets.Dataset` or a streaming `IterableDataset`.
        image_column: The column holding the images (decoded or not).
        transform: Maps an RGB PIL image to a dict of tensors, e.g. a [`TwoViewTransform`].
        skipped: Counts undecodable images. Give it here or to the collator, not both.
        keep_columns: Other columns to pass through unchanged, e.g. `("label",)`.
        seed: Give each example its own generator, seeded by (seed, epoch, index), for the transform (called as
            `transform(image, rng=...)`) and the collator's mask: a [`SeededTransformedDataset`], needed for exact
            resumption. Without it, randomness comes from torch's global RNG. Map-style datasets only.

    Returns:
        A new dataset; the input is not modified.
    """
    keep_columns = tuple(keep_columns)
    column_names = dataset.column_names
    missing = [name for name in (image_column, *keep_columns) if name not in (column_names or [])]
    if column_names is not None and missing:
        raise UsageError(f"Columns {missing} are not in the dataset (columns: {column_names})")

    dataset = _undecoded(dataset, image_column)
    function = _TransformImages(image_column, transform, skipped, keep_columns)
    if seed is not None:
        if isinstance(dataset, IterableDataset):
            raise UsageError(
                "seed gives each example a generator keyed by its index, which a streaming dataset does not have; "
                "load the dataset without streaming or pass seed=None"
            )
        return SeededTransformedDataset(dataset, function, seed)
    if isinstance(dataset, IterableDataset):
        # Without known features the input columns cannot be listed for removal and pass through.
        remove_columns = [name for name in dataset.column_names or [] if name not in keep_columns]
        # Dropped here, not in the collator: accelerate dispatches a stream's batches and cannot pass an empty one.
        return dataset.map(function.transform_example, remove_columns=remove_columns).filter(_decoded)
    return dataset.with_transform(function.transform_batch, columns=[image_column, *keep_columns])


__all__ = [
    "ImageFolderScan",
    "SeededTransformedDataset",
    "apply_transform",
    "example_rng",
    "load_image_datasets",
    "require_image_folder",
    "require_label_column",
    "unseen_labels",
]
