"""Raw pixel patches of an image dataset, the points of a k-means tokenizer's fit: each process reads its share of the
images, and every patch carries a global id so that random choices do not depend on that split.
"""

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ...data import SkippedImageCounter, TwoViewTransform, apply_transform, decode_image
from ...errors import UsageError
from ...models.distributed import world
from ...models.image_processing_kmeans import KmeansImageProcessor
from ...models.modeling_kmeans import patchify
from .lloyd import point_keys

logger = logging.getLogger(__name__)


class _ShardViews(torch.utils.data.Dataset):
    """The views of this process's images (`indices` of a map-style dataset), tagged with their global index."""

    def __init__(self, views, indices: range):
        self.views = views
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None]:
        index = self.indices[position]
        return index, self.views[index]["pixel_values"]


def _collate_views(items):
    return items


def view_batches(
    dataset,
    image_column: str,
    image_processor,
    batch_size: int = 64,
    num_workers: int = 0,
    skipped: SkippedImageCounter | None = None,
):
    """This process's share of the images of `dataset` as batches of `(global index, view)` pairs, and the number of
    batches (None for a streaming dataset).

    Each image is rendered by `image_processor`'s deterministic view; process `r` of `n` reads images `r, r + n,
    r + 2n, ...`; an undecodable image has the view None (and is counted in `skipped`). Map-style datasets are decoded
    by `num_workers` DataLoader workers, streaming ones in this process.
    """
    rank, world_size = world()
    transform = TwoViewTransform(image_processor, train=False)
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        # Streaming: iterated here, so each image's global index is its position in the stream.
        def images():
            for index, example in enumerate(dataset):
                if index % world_size == rank:
                    image = decode_image(example[image_column])
                    if image is None and skipped is not None:
                        skipped.increment()
                    yield index, None if image is None else transform(image)["pixel_values"]

        def batches():
            batch = []
            for item in images():
                batch.append(item)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        return batches(), None
    views = apply_transform(dataset, image_column, transform, skipped=skipped)
    shard = _ShardViews(views, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_views
    )
    return loader, len(loader)


def sampled_patches(index: int, num_patches: int, patches_per_image: int | None, seed: int):
    """`(positions, global ids)` of the patches kept of image `index` (of `num_patches`): `patches_per_image` random
    ones in increasing position order, keyed by their global ids `index * num_patches + position`, or all of them."""
    ids = index * num_patches + torch.arange(num_patches)
    positions = torch.arange(num_patches)
    if patches_per_image is not None and patches_per_image < num_patches:
        positions = torch.argsort(point_keys(ids, seed))[:patches_per_image].sort().values
    return positions, ids[positions]


def sample_patches(
    dataset,
    image_column: str,
    image_processor: KmeansImageProcessor,
    patch_size: int,
    patches_per_image: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the raw [0, 1] patches of an image dataset, as 8-bit pixels.

    Each image of this process's share ([`view_batches`]) is rendered by `image_processor`'s deterministic view
    (CCViT: 224 px bicubic, not normalised) and cut into `patch_size` patches flattened (C, py, px); undecodable
    images are skipped (and counted in `skipped`).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): Images, e.g. from `load_image_datasets`.
        image_column (`str`): The image column.
        image_processor ([`KmeansImageProcessor`]): The tokenizer's view.
        patch_size (`int`): Side of a patch in pixels.
        patches_per_image (`int`, *optional*): Keep this many random patches of each image (default: all).
        seed (`int`, *optional*, defaults to 0): Seed of the patch sampling.

    Returns:
        `(patches, patch_ids)`: `torch.uint8` of shape `(num_patches, num_channels * patch_size**2)` and the patches'
        global ids `image_index * patches_per_view + position` (`torch.long`), for [`fit_kmeans`]'s `point_ids`.
    """
    if image_processor.do_normalize:
        raise ValueError(
            "k-means centroids are fitted on raw [0, 1] pixels, but the image processor normalises them; use a "
            "KmeansImageProcessor (do_normalize=False)"
        )
    batches, total = view_batches(dataset, image_column, image_processor, batch_size, num_workers, skipped)
    patches, patch_ids = [], []
    for batch in tqdm(batches, total=total, desc="sampling patches", disable=not show_progress or world()[0] != 0):
        for index, view in batch:
            if view is None:
                continue
            # The view is `uint8 / 255` in float32; rounding recovers the 8-bit values exactly.
            image_patches = patchify(view.unsqueeze(0), patch_size)[0].mul_(255.0).round_().to(torch.uint8)
            positions, ids = sampled_patches(index, image_patches.shape[0], patches_per_image, seed)
            patches.append(image_patches[positions])
            patch_ids.append(ids)
    if not patches:
        dim = 3 * patch_size**2
        return torch.empty(0, dim, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(patches), torch.cat(patch_ids)


def select_images(dataset, max_images: int | None, seed: int = 0, per_class: int | None = None):
    """The images a k-means fit reads: all of `dataset`, at most `max_images` (a seeded random subset of a map-style
    dataset, the first ones of a streaming one), or `per_class` of each class of its `label` column (a seeded random
    choice within each class; all of a class with fewer), as CCViT fits on 50 images per ImageNet class."""
    if per_class is not None:
        return _images_per_class(dataset, per_class, seed)
    if max_images is None:
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return dataset.take(max_images)
    if max_images >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_images))


def _images_per_class(dataset, per_class: int, seed: int):
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise UsageError(
            "--kmeans_images_per_class draws from each class of the whole dataset, which a streamed one is not: "
            "remove --streaming, or use --kmeans_max_images"
        )
    if "label" not in dataset.column_names:
        raise UsageError(
            "--kmeans_images_per_class needs the class of each image, and the training images have no 'label' "
            "column (imagefolder gives one when images sit in class folders): use --kmeans_max_images instead"
        )
    labels = np.asarray(dataset["label"])
    # Images ordered by class, then by a seeded random rank within it; each class keeps its first `per_class`.
    order = np.lexsort((np.random.default_rng(seed).permutation(len(labels)), labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    chosen = np.sort(order[np.arange(len(order)) - starts < per_class])
    classes, counts = np.unique(labels, return_counts=True)
    short = classes[counts < per_class]
    if len(short):
        logger.warning(
            "%d of %d classes have fewer than %d images (--kmeans_images_per_class); all of theirs are used",
            len(short), len(classes), per_class,
        )
    return dataset.select(chosen)


__all__ = [
    "sample_patches",
    "sampled_patches",
    "select_images",
    "view_batches",
]
