"""Nearest-centroid search of k-means codebooks (CCViT's pixel centroids, feature k-means' teacher-feature centroids,
and the k-means fit), as matrix products: `||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2`."""

import torch

# Rows per block of the nearest-centroid search: a block's distance matrix holds about this many floats (64 MiB),
# large enough for an efficient matrix product, small enough that 8192 centroids never need gigabytes.
DISTANCE_BLOCK_ELEMENTS = 2**24


def nearest_centroids(
    points: torch.Tensor,
    centroids: torch.Tensor,
    centroid_sq_norms: torch.Tensor | None = None,
    chunk_size: int | None = None,
    point_sq_norms: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Index of, and squared L2 distance to, the nearest centroid of every point.

    Distances are `||x||^2 - 2 x.c + ||c||^2`, so the search is a matrix product; it runs over blocks of
    `chunk_size` points so the `(points, centroids)` distance matrix is never held whole.

    Args:
        points (`torch.FloatTensor` of shape `(num_points, dim)`): The points, float32.
        centroids (`torch.FloatTensor` of shape `(num_centroids, dim)`): The centroids, float32.
        centroid_sq_norms (`torch.FloatTensor` of shape `(num_centroids,)`, *optional*):
            `||c||^2`, when the caller already has it (k-means reuses it across blocks).
        chunk_size (`int`, *optional*): Points per block; by default about 64 MiB of distances per block.
        point_sq_norms (`torch.FloatTensor` of shape `(num_points,)`, *optional*): `||x||^2`, likewise.
        workspace (`torch.FloatTensor` of shape `(chunk_size, num_centroids)`, *optional*):
            Memory for a block's distances, reused across calls (k-means calls this once per block of every
            iteration; fresh allocations of this size cost page faults comparable to the product itself).

    Returns:
        `(indices, sq_distances)`: `torch.LongTensor` and `torch.FloatTensor` of shape `(num_points,)`.
    """
    if centroid_sq_norms is None:
        centroid_sq_norms = centroids.square().sum(dim=1)
    chunk_size = chunk_size or max(256, DISTANCE_BLOCK_ELEMENTS // centroids.shape[0])
    indices = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    sq_distances = torch.empty(points.shape[0], dtype=centroids.dtype, device=points.device)
    centroids_t = centroids.t()
    if workspace is None:
        workspace = points.new_empty(min(chunk_size, points.shape[0]), centroids.shape[0])
    for start in range(0, points.shape[0], chunk_size):
        block = points[start : start + chunk_size]
        # ||x||^2 does not change which centroid wins; it is added back only to the minima.
        partial = torch.addmm(centroid_sq_norms, block, centroids_t, alpha=-2.0, out=workspace[: len(block)])
        torch.min(partial, dim=1, out=(sq_distances[start : start + chunk_size], indices[start : start + chunk_size]))
    if point_sq_norms is None:
        point_sq_norms = points.square().sum(dim=1)
    sq_distances.add_(point_sq_norms).clamp_(min=0.0)
    return indices, sq_distances


def negative_sq_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """`-||x - c||^2` of every point `(num_points, dim)` to every centroid `(num_centroids, dim)`, float32, as a
    `(num_points, num_centroids)` tensor: a k-means tokenizer's code logits, whose argmax is the nearest centroid."""
    # Written in place into the one output tensor: no (points x centroids) temporaries besides it.
    logits = torch.addmm(centroids.square().sum(dim=1), points, centroids.t(), beta=1.0, alpha=-2.0)
    return logits.add_(points.square().sum(dim=1, keepdim=True)).clamp_(min=0.0).neg_()


def check_centroids(centroids: torch.Tensor, shape: tuple[int, int], shape_words: str) -> None:
    """Errors for centroids to load into a codebook of `shape` (described as `shape_words`) that do not fit it."""
    if tuple(centroids.shape) != tuple(shape):
        raise ValueError(f"Expected centroids of shape {tuple(shape)} ({shape_words}), got {tuple(centroids.shape)}")
    if not torch.isfinite(centroids).all():
        raise ValueError("centroids contain NaN or infinite values")


def float32_centroids(centroids: torch.Tensor, owner: str) -> torch.Tensor:
    """`centroids` if float32, else an error: half precision changes which centroid is nearest."""
    if centroids.dtype != torch.float32:
        raise ValueError(
            f"{owner} computes distances in float32 (half precision changes which centroid wins), but its centroids "
            f"are {centroids.dtype}; call `.float()` on the tokenizer."
        )
    return centroids


__all__ = [
    "DISTANCE_BLOCK_ELEMENTS",
    "check_centroids",
    "float32_centroids",
    "nearest_centroids",
    "negative_sq_distances",
]
