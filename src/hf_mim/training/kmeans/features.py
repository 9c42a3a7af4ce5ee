"""The points of a feature k-means fit: a frozen teacher's patch features of an image dataset, computed batch by batch
on the tokenizer's device; and the tokenizer holding that teacher, built from a teacher checkpoint."""

import torch
from tqdm.auto import tqdm

from ...data import SkippedImageCounter
from ...models.configuration_feature_kmeans import FeatureKmeansConfig
from ...models.distributed import world
from ...models.image_processing_feature_kmeans import FeatureKmeansImageProcessor
from ...models.modeling_feature_kmeans import FeatureKmeansModel
from ...models.teacher import PatchFeatureTeacher
from ..loading import pretrained
from ..teacher import load_teacher_model, teacher_feature_dim
from .patches import sampled_patches, view_batches


def feature_kmeans_tokenizer(
    config: FeatureKmeansConfig,
    teacher_name_or_path: str,
    feature_layer: int | None = None,
    flag: str = "teacher_name_or_path",
) -> FeatureKmeansModel:
    """An unfitted tokenizer of `config` (view, grid, codebook size, feature normalisation) holding the teacher of
    `teacher_name_or_path` (a folder or Hub id; `--flag` in errors) and its features of `feature_layer`.

    The teacher's config, class, normalisation and feature size go into the tokenizer's config, its weights into the
    tokenizer. A teacher whose output has no patch tokens on the tokenizer's grid is refused with a one-line error.
    """
    model, mean, std = pretrained(load_teacher_model, teacher_name_or_path, flag)
    teacher = PatchFeatureTeacher(model, mean, std, config.grid_size, feature_layer)
    feature_dim = teacher_feature_dim(teacher, config.image_size, teacher_name_or_path, flag)
    config = FeatureKmeansConfig.from_dict(
        {
            **config.to_dict(),
            "teacher_config": model.config.to_dict(),
            "teacher_class": type(model).__name__,
            "teacher_feature_layer": feature_layer,
            "teacher_image_mean": list(mean),
            "teacher_image_std": list(std),
            "feature_dim": feature_dim,
        }
    )
    tokenizer = FeatureKmeansModel(config)
    tokenizer.teacher.model.load_state_dict(model.state_dict())
    return tokenizer.eval()


@torch.no_grad()
def sample_features(
    dataset,
    image_column: str,
    image_processor: FeatureKmeansImageProcessor,
    tokenizer: FeatureKmeansModel,
    patches_per_image: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the patch features of an image dataset, as [`FeatureKmeansModel.encode`] gives them.

    Images are read as [`sample_patches`] reads them (this process's share, the deterministic view, `patches_per_image`
    random patches keyed by global id); each batch goes through the teacher on the tokenizer's device, where the
    features stay.

    Returns:
        `(features, patch_ids)`: float32 `(num_patches, feature_dim)` and the patches' global ids (`torch.long`), on
        the tokenizer's device.
    """
    device = tokenizer.centroids.device
    num_patches = tokenizer.config.grid_size**2
    batches, total = view_batches(dataset, image_column, image_processor, batch_size, num_workers, skipped)
    features, patch_ids = [], []
    for batch in tqdm(batches, total=total, desc="teacher features", disable=not show_progress or world()[0] != 0):
        batch = [(index, view) for index, view in batch if view is not None]
        if not batch:
            continue
        batch_features = tokenizer.encode(torch.stack([view for _, view in batch]).to(device))
        sampled = [sampled_patches(index, num_patches, patches_per_image, seed) for index, _ in batch]
        # The batch's rows among its images' patches, moved to the device in one copy (not one per image).
        rows = torch.cat([positions + offset * num_patches for offset, (positions, _) in enumerate(sampled)])
        features.append(batch_features.reshape(-1, batch_features.shape[-1])[rows.to(device)])
        patch_ids.extend(ids for _, ids in sampled)
    if not features:
        empty = torch.empty(0, tokenizer.config.feature_dim, device=device)
        return empty, torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(patch_ids).to(device)


__all__ = ["feature_kmeans_tokenizer", "sample_features"]
