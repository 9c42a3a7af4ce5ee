"""Fitting CCViT's centroid tokenizer: k-means (Lloyd's algorithm) on raw pixel patches of an image dataset.

`fit_kmeans` runs on a tensor of points, `sample_patches` turns an image dataset into such a tensor, and
`fit_kmeans_tokenizer` does both and returns a [`KmeansModel`]. Assignments are a blocked matrix product with a
fused argmin (the same `nearest_centroids` the tokenizer uses at training time), on the points' device.

Under `accelerate launch` (any `torch.distributed` process group) every process reads its own share of the images,
and per-cluster sums, counts and the inertia are all-reduced each iteration. Every random choice is keyed by a
point's global id rather than by its position in a process's share, so the fit equals a single-process fit on the
same data: exactly for 8-bit patches (their sums are exact), up to float summation order for float points.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data import SkippedImageCounter, TwoViewTransform, apply_transform, decode_image
from ..data.arguments import require_validation_split
from ..errors import UsageError
from ..evaluation.codebook import codebook_metrics
from ..hub.cards import write_model_card
from ..hub.push import push_folder
from ..models.configuration_kmeans import KmeansConfig
from ..models.image_processing_kmeans import KmeansImageProcessor
from ..models.modeling_kmeans import KmeansModel, nearest_centroids, patchify
from ..models.modeling_tokenizer import code_counts

logger = logging.getLogger(__name__)

INIT_METHODS = ("random", "k-means++")
BACKENDS = ("torch", "faiss")


@dataclass
class KmeansFit:
    """The result of [`fit_kmeans`].

    Args:
        centroids (`torch.FloatTensor` of shape `(num_clusters, dim)`): The final centroids, on the CPU.
        inertia (`list[float]`): Sum of squared distances of all points to their nearest centroid, at the
            assignment step of each iteration (non-increasing).
        num_points (`int`): Points fitted, over all processes.
    """

    centroids: torch.Tensor
    inertia: list[float]
    num_points: int


@dataclass
class KmeansFitArguments:
    """Command-line options of a k-means fit, shared by `train_tokenizer.py --tokenizer_type kmeans` and
    `run_mim.py --fit_tokenizer`."""

    kmeans_iterations: int = field(default=20, metadata={"help": "Lloyd iterations (CCViT: 20)."})
    kmeans_init: str = field(default="random", metadata={"help": "Initial centroids.", "choices": list(INIT_METHODS)})
    kmeans_patches_per_image: int | None = field(
        default=None, metadata={"help": "Patches sampled per image (default: all, as CCViT)."}
    )
    kmeans_max_images: int | None = field(
        default=None,
        metadata={"help": "Fit on this many training images (default: all; CCViT: 50 per class, 50,000)."},
    )
    kmeans_backend: str = field(
        default="torch",
        metadata={"help": "'torch' (any device, multi-process) or 'faiss' (one process).", "choices": list(BACKENDS)},
    )
    kmeans_batch_size: int = field(default=64, metadata={"help": "Images per data-loading batch."})


# ----------------------------------------------------------------------------------------------------------------
# Process group helpers: no-ops in a single process.


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(*tensors: torch.Tensor) -> None:
    if _world()[1] > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


def _all_gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Row-wise concatenation, in rank order, of tensors whose first dimension may differ across processes."""
    if _world()[1] == 1:
        return list(tensors)
    world = _world()[1]
    length = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, lengths)]))
    return gathered


# ----------------------------------------------------------------------------------------------------------------
# Keys: every random choice (initial centroids, re-seeding, patch sampling) ranks points by a pseudo-random key of
# their global id, so it does not depend on how points are split across processes.


def point_keys(point_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Pseudo-random int64 keys of integer ids (splitmix64 of `id + seed * golden ratio`), deterministic for a seed."""
    with np.errstate(over="ignore"):
        state = point_ids.cpu().numpy().astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        state = state ^ (state >> np.uint64(31))
    return torch.from_numpy((state >> np.uint64(1)).astype(np.int64)).to(point_ids.device)


def _as_float(points: torch.Tensor) -> torch.Tensor:
    """float32 points; uint8 points are 8-bit pixels, i.e. `value / 255` exactly as the image pipeline computes it."""
    if points.dtype == torch.uint8:
        return points.float().div_(255.0)
    return points.float()


def _smallest_keys(points: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` points with the smallest keys over all processes, as float32, in key order."""
    local = torch.argsort(keys)[:count]
    all_keys, all_points = _all_gather_rows(keys[local], points[local])
    return _as_float(all_points[torch.argsort(all_keys)[:count]])


def _kmeans_plus_plus(pool: torch.Tensor, num_clusters: int, seed: int) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) on `pool`: each next centroid is drawn with probability proportional
    to its squared distance to the nearest centroid chosen so far."""
    generator = torch.Generator(device=pool.device).manual_seed(seed)
    centroids = torch.empty(num_clusters, pool.shape[1], device=pool.device)
    pool_sq_norms = pool.square().sum(dim=1)
    centroids[0] = pool[0]  # the pool is in key order, so its first point is a uniformly random one
    min_sq = (pool_sq_norms - 2 * pool @ centroids[0] + pool_sq_norms[0]).clamp_(min=0)
    for index in range(1, num_clusters):
        total = min_sq.sum()
        if total <= 0:
            raise ValueError(
                f"k-means++ found only {index} distinct points in its pool but needs {num_clusters}; lower the "
                f"number of clusters or fit on more (or more varied) images"
            )
        choice = torch.multinomial(min_sq / total, 1, generator=generator)[0]
        centroids[index] = pool[choice]
        sq = (pool_sq_norms - 2 * pool @ pool[choice] + pool_sq_norms[choice]).clamp_(min=0)
        torch.minimum(min_sq, sq, out=min_sq)
    return centroids


def init_centroids(
    points: torch.Tensor,
    num_clusters: int,
    method: str = "random",
    seed: int = 0,
    point_ids: torch.Tensor | None = None,
    pool_size: int | None = None,
) -> torch.Tensor:
    """Initial centroids `(num_clusters, dim)` (float32, on the points' device), identical on every process.

    Args:
        points (`torch.Tensor` of shape `(num_points, dim)`): This process's points, float32 or uint8 pixels.
        num_clusters (`int`): Number of centroids.
        method (`str`, *optional*, defaults to `"random"`): `"random"`: `num_clusters` distinct points drawn
            uniformly (faiss's and CCViT's initialisation). `"k-means++"`: D^2 sampling on a random pool of points.
        seed (`int`, *optional*, defaults to 0): Seed of every random choice.
        point_ids (`torch.LongTensor` of shape `(num_points,)`, *optional*): Global ids of the points, unique across
            processes; defaults to `0..num_points-1` (single process only).
        pool_size (`int`, *optional*): k-means++ candidates, by default `min(num_points, 16 * num_clusters)`
            (each k-means++ step reads the whole pool, so it is sequential work of `pool_size * num_clusters`).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"Unknown k-means initialisation {method!r}; choose one of {list(INIT_METHODS)}")
    point_ids = _default_point_ids(points, point_ids)
    keys = point_keys(point_ids, seed)
    if method == "random":
        return _smallest_keys(points, keys, num_clusters)
    rank, _ = _world()
    pool = _smallest_keys(points, keys, pool_size or 16 * num_clusters)
    # Computed once and broadcast: every process would get the same result, but k-means++ is sequential work.
    if rank == 0:
        centroids = _kmeans_plus_plus(pool, num_clusters, seed)
    else:
        centroids = pool.new_empty(num_clusters, pool.shape[1])
    if _world()[1] > 1:
        dist.broadcast(centroids, src=0)
    return centroids


def _default_point_ids(points: torch.Tensor, point_ids: torch.Tensor | None) -> torch.Tensor:
    if point_ids is None:
        if _world()[1] > 1:
            raise ValueError(
                "Under several processes, pass point_ids (global ids of this process's points, unique across "
                "processes) so that random choices do not depend on how the points are split"
            )
        return torch.arange(points.shape[0], device=points.device)
    if point_ids.shape != points.shape[:1]:
        raise ValueError(f"point_ids has shape {tuple(point_ids.shape)}, expected ({points.shape[0]},), one per point")
    return point_ids.to(points.device)


def _reseed_empty_clusters(
    centroids: torch.Tensor, empty: torch.Tensor, points: torch.Tensor, keys: torch.Tensor, sq_distances: torch.Tensor
) -> None:
    """Move each empty cluster onto one of the points farthest from their centroids (scikit-learn's relocation):
    the objective can only go down, and the choice is the same however the points are split over processes."""
    count = int(empty.numel())
    # Farthest first; ties broken by key, so the order is total and identical on every process.
    order = np.lexsort((keys.cpu().numpy(), -sq_distances.double().cpu().numpy()))[:count]
    order = torch.from_numpy(order).to(points.device)
    all_sq, all_keys, all_points = _all_gather_rows(sq_distances[order].double(), keys[order], points[order])
    chosen = np.lexsort((all_keys.cpu().numpy(), -all_sq.cpu().numpy()))[:count]
    centroids[empty] = _as_float(all_points[torch.from_numpy(chosen).to(points.device)])


class _FloatAssignment:
    """Nearest centroids by float32 products `||c||^2 - 2 x.c` (the tokenizer's own search), on any device."""

    # Blocks are returned in the points' units.
    sum_scale = 1.0

    @staticmethod
    def accumulate(sums: torch.Tensor, ids: torch.Tensor, block: torch.Tensor) -> None:
        # index_add_ sums in a fixed order: float sums are reproducible.
        sums.index_add_(0, ids, block)

    def __init__(self, points: torch.Tensor, num_clusters: int, chunk_size: int):
        self.points = points
        # A process may hold no points (fewer images than processes); its buffers still need a shape.
        rows = max(1, min(chunk_size, len(points)))
        self.block = torch.empty(rows, points.shape[1], device=points.device)
        self.workspace = torch.empty(rows, num_clusters, device=points.device)
        self.point_sq_norms = torch.empty(len(points), device=points.device)
        for start in range(0, len(points), rows):
            block = self._load(start, min(start + rows, len(points)))
            self.point_sq_norms[start : start + len(block)] = block.square().sum(dim=1)

    def _load(self, start: int, stop: int) -> torch.Tensor:
        block = self.block[: stop - start]
        block.copy_(self.points[start:stop])
        return block.div_(255.0) if self.points.dtype == torch.uint8 else block

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids
        self.centroid_sq_norms = centroids.square().sum(dim=1)

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block as float32, nearest-centroid ids, squared distances) of points `start:stop`."""
        block = self._load(start, stop)
        ids, sq_distances = nearest_centroids(
            block, self.centroids, self.centroid_sq_norms, stop - start, self.point_sq_norms[start:stop], self.workspace
        )
        return block, ids, sq_distances


class _PixelAssignment:
    """Nearest centroids of 8-bit pixel points by exact integer products, faster than float32 on CPU.

    A centroid `c` in [0, 1] is rounded to the fixed-point grid `q / (255 * 256)` and split into bytes
    `q = 256 h + l`; with points `x` in 0..255, `x.q = 256 x.h + x.l` comes from one int8 matrix product against
    both byte planes (x, h, l shifted by -128 into int8, the shifts corrected per point and per centroid), which
    CPUs run at several times the float32 rate (VNNI) with no rounding. The only approximation is the rounding of
    the centroids, at most 7.7e-6 per coordinate: far below the gaps that decide assignments, and finer than what
    float32 products of 768 terms resolve.
    """

    SCALE = 255 * 256
    # Blocks are returned in 0..255 levels, exact in float32 sums.
    sum_scale = 255.0

    @staticmethod
    def accumulate(sums: torch.Tensor, ids: torch.Tensor, block: torch.Tensor) -> None:
        # Sums of bytes are exact in any order, so the faster (unordered) accumulating index_put_ is safe here.
        sums.index_put_((ids,), block, accumulate=True)

    def __init__(self, points: torch.Tensor, num_clusters: int, chunk_size: int):
        self.points = points
        self.num_clusters = num_clusters
        # A process may hold no points (fewer images than processes); its buffers still need a shape.
        rows = max(1, min(chunk_size, len(points)))
        # Reused every block: fresh allocations of this size cost page faults comparable to the products.
        device = points.device
        self.shifted = torch.empty(rows, points.shape[1], dtype=torch.int8, device=device)
        self.products = torch.empty(rows, 2 * num_clusters, dtype=torch.int32, device=device)
        self.float_products = torch.empty(rows, 2 * num_clusters, device=device)
        self.scores = torch.empty(rows, num_clusters, device=device)
        self.minima = torch.empty(rows, device=device)
        self.ids = torch.empty(rows, dtype=torch.long, device=device)
        self.block = torch.empty(rows, points.shape[1], device=device)
        # The terms of ||x/255 - c||^2 (in the units of `__call__`) that do not depend on the centroid.
        self.point_terms = torch.empty(len(points), dtype=torch.float64, device=device)
        for start in range(0, len(points), rows):
            block = self.block[: min(rows, len(points) - start)].copy_(points[start : start + rows])
            # Sums of bytes are exact in float32; sums of squared bytes (up to 5e7) to 1e-7, which only the
            # reported distances see, never the assignments.
            sums = block.sum(dim=1).double()
            squares = block.square_().sum(dim=1).double()
            self.point_terms[start : start + len(block)] = 256 * squares - 2 * 128 * 257 * sums

    def set_centroids(self, centroids: torch.Tensor) -> None:
        q = torch.round(centroids.double() * self.SCALE).long().clamp_(0, self.SCALE)
        # (d, 2k) int8 operand: the high bytes then the low bytes of every centroid, shifted by -128.
        self.bytes = (torch.cat([q >> 8, q & 255]) - 128).to(torch.int8).t().contiguous()
        column_terms = 128 * (q.sum(dim=1) - 257 * 128 * q.shape[1])
        self.bias = (q.square().sum(dim=1).double() / 256 - 2 * column_terms.double()).float()

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, k = stop - start, self.num_clusters
        block = self.points[start:stop]
        shifted = torch.bitwise_xor(block.view(torch.int8), -128, out=self.shifted[:rows])
        products = torch._int_mm(shifted, self.bytes, out=self.products[:rows])
        # Exact in float32 (|x'.h'| <= 768 * 128^2 < 2^24); converting first is several times faster than letting
        # each float op below read int32.
        products = self.float_products[:rows].copy_(products)
        # bias - 2 (256 x'.h' + x'.l'): the squared distance up to per-point terms, in units of 256 / SCALE^2.
        scores = torch.add(self.bias, products[:, :k], alpha=-512, out=self.scores[:rows])
        scores.add_(products[:, k:], alpha=-2.0)
        minima, ids = torch.min(scores, dim=1, out=(self.minima[:rows], self.ids[:rows]))
        sq_distances = (minima.double() + self.point_terms[start:stop]).mul_(256.0 / self.SCALE**2).clamp_(min=0)
        return self.block[:rows].copy_(block), ids, sq_distances.float()


def fit_kmeans(
    points: torch.Tensor,
    num_clusters: int,
    num_iterations: int = 20,
    init: str | torch.Tensor = "random",
    seed: int = 0,
    point_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "torch",
    show_progress: bool = True,
) -> KmeansFit:
    """Lloyd's k-means of `points` (of this process; under several processes, of all of them together).

    Each iteration assigns every point to its nearest centroid (blocked matrix products with a fused argmin),
    then moves every centroid to the mean of its points; a cluster left empty is moved onto a point far from its
    centroid. 8-bit pixel points on CPU use exact integer products (see `_PixelAssignment`), everything else
    float32 `||c||^2 - 2 x.c`. Sums are accumulated in float32 over at most 65536 points (exact for 8-bit pixels)
    and in float64 beyond, so a multi-process fit of pixels matches a single-process one exactly.

    Args:
        points (`torch.Tensor` of shape `(num_points, dim)`):
            float points, or uint8 8-bit pixels (read as `value / 255`; four times less memory), on the device
            to compute on.
        num_clusters (`int`): Number of centroids `k`.
        num_iterations (`int`, *optional*, defaults to 20): Assignment + update steps.
        init (`str` or `torch.Tensor`, *optional*, defaults to `"random"`):
            `"random"`, `"k-means++"` (see [`init_centroids`]) or the initial centroids `(num_clusters, dim)`.
        seed (`int`, *optional*, defaults to 0): Seed of the initialisation and of empty-cluster re-seeding.
        point_ids (`torch.LongTensor` of shape `(num_points,)`, *optional*):
            Global ids of the points, unique across processes (required under several processes).
        chunk_size (`int`, *optional*): Points per assignment block (default: about 64 MiB of distances; at most
            65536, the most 8-bit pixels whose sums stay exact in float32).
        backend (`str`, *optional*, defaults to `"torch"`): `"faiss"` uses `faiss.Kmeans` (CPU, one process) from the
            same initial centroids.
        show_progress (`bool`, *optional*, defaults to `True`): A progress bar with the inertia, on process 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown k-means backend {backend!r}; choose one of {list(BACKENDS)}")
    if points.ndim != 2:
        raise ValueError(f"points must be a (num_points, dim) tensor, got shape {tuple(points.shape)}")
    if points.dtype != torch.uint8 and not points.is_floating_point():
        raise ValueError(f"points must be float or uint8 pixels, got {points.dtype}")
    rank, world = _world()
    num_points = torch.tensor([points.shape[0]], dtype=torch.long, device=points.device)
    _all_reduce_(num_points)
    num_points = int(num_points)
    if num_points < num_clusters:
        raise ValueError(
            f"k-means with {num_clusters} clusters needs at least as many points, got {num_points}; fit on more "
            f"images (or more patches per image) or lower the number of clusters"
        )
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {num_iterations}")
    point_ids = _default_point_ids(points, point_ids)
    if isinstance(init, str):
        centroids = init_centroids(points, num_clusters, init, seed=seed, point_ids=point_ids)
    else:
        centroids = init.to(device=points.device, dtype=torch.float32).clone()
        if tuple(centroids.shape) != (num_clusters, points.shape[1]):
            raise ValueError(
                f"Initial centroids have shape {tuple(centroids.shape)}, expected ({num_clusters}, {points.shape[1]})"
            )
    if backend == "faiss":
        if world > 1:
            raise ValueError("The faiss backend runs in one process; use backend='torch' under accelerate launch")
        return _fit_faiss(points, centroids, num_iterations, seed, show_progress)

    chunk_size = min(chunk_size or max(256, 2**24 // num_clusters), 2**16)
    pixels_on_cpu = points.dtype == torch.uint8 and points.device.type == "cpu"
    assignment = (_PixelAssignment if pixels_on_cpu else _FloatAssignment)(points, num_clusters, chunk_size)
    keys = point_keys(point_ids, seed)
    # float32 partial sums of 8-bit pixels stay exact up to 2^24 / 255 > 65535 points per cluster.
    flush_every = 2**16 // chunk_size * chunk_size
    sq_distances = torch.empty(points.shape[0], device=points.device)
    history = []
    progress = tqdm(range(num_iterations), desc="k-means", disable=not show_progress or rank != 0)
    for _ in progress:
        assignment.set_centroids(centroids)
        sums = torch.zeros(num_clusters, points.shape[1], dtype=torch.float64, device=points.device)
        partial_sums = torch.zeros(num_clusters, points.shape[1], device=points.device)
        counts = torch.zeros(num_clusters, dtype=torch.long, device=points.device)
        for start in range(0, points.shape[0], chunk_size):
            stop = min(start + chunk_size, points.shape[0])
            block, ids, sq_distances[start:stop] = assignment(start, stop)
            assignment.accumulate(partial_sums, ids, block)
            counts += code_counts(ids, num_clusters)
            if stop % flush_every == 0 or stop == points.shape[0]:
                sums += partial_sums
                partial_sums.zero_()
        inertia = sq_distances.sum(dtype=torch.float64).reshape(1)
        _all_reduce_(sums, counts, inertia)
        history.append(float(inertia))
        progress.set_postfix(inertia=f"{history[-1]:.6g}")
        empty = torch.nonzero(counts == 0).flatten()
        centroids = (sums / (counts.clamp(min=1).unsqueeze(1) * assignment.sum_scale)).float()
        if empty.numel():
            logger.info("Re-seeding %d empty clusters", empty.numel())
            _reseed_empty_clusters(centroids, empty, points, keys, sq_distances)
    progress.close()
    logger.info(
        "k-means: %d points in %d processes, %d clusters, inertia per iteration %s", num_points, world, num_clusters,
        history,
    )
    return KmeansFit(centroids=centroids.cpu(), inertia=history, num_points=num_points)


def _fit_faiss(
    points: torch.Tensor, centroids: torch.Tensor, num_iterations: int, seed: int, show_progress: bool
) -> KmeansFit:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install 'hf_mim[faiss]' (faiss-cpu)") from error
    data = np.ascontiguousarray(_as_float(points).cpu().numpy())
    kmeans = faiss.Kmeans(
        data.shape[1],
        centroids.shape[0],
        niter=num_iterations,
        seed=seed,
        verbose=show_progress,
        # Use every point (faiss otherwise subsamples to 256 per centroid), as CCViT does.
        max_points_per_centroid=math.ceil(data.shape[0] / centroids.shape[0]) + 1,
    )
    kmeans.train(data, init_centroids=np.ascontiguousarray(centroids.cpu().numpy()))
    inertia = [float(value) for value in kmeans.obj]
    return KmeansFit(centroids=torch.from_numpy(kmeans.centroids.copy()), inertia=inertia, num_points=len(data))


# ----------------------------------------------------------------------------------------------------------------
# Patches of an image dataset.


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

    Each image is rendered by `image_processor`'s deterministic view (CCViT: 224 px bicubic, not normalised) and
    cut into `patch_size` patches flattened (C, py, px). Process `r` of `n` reads images `r, r + n, r + 2n, ...`;
    undecodable images are skipped (and counted in `skipped`).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): Images, e.g. from `load_image_datasets`.
            Map-style datasets are decoded by `num_workers` DataLoader workers, streaming ones in this process.
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
    rank, world = _world()
    transform = TwoViewTransform(image_processor, train=False)
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        # Streaming: iterated here, so each image's global index is its position in the stream.
        def images():
            for index, example in enumerate(dataset):
                if index % world == rank:
                    image = decode_image(example[image_column])
                    if image is None and skipped is not None:
                        skipped.increment()
                    yield index, None if image is None else transform(image)["pixel_values"]

        batches, total = ([item] for item in images()), None
    else:
        views = apply_transform(dataset, image_column, transform, skipped=skipped)
        shard = _ShardViews(views, range(rank, len(dataset), world))
        batches = torch.utils.data.DataLoader(
            shard, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_views
        )
        total = len(batches)

    patches, patch_ids = [], []
    for batch in tqdm(batches, total=total, desc="sampling patches", disable=not show_progress or rank != 0):
        for index, view in batch:
            if view is None:
                continue
            # The view is `uint8 / 255` in float32; rounding recovers the 8-bit values exactly.
            image_patches = patchify(view.unsqueeze(0), patch_size)[0].mul_(255.0).round_().to(torch.uint8)
            ids = index * image_patches.shape[0] + torch.arange(image_patches.shape[0])
            if patches_per_image is not None and patches_per_image < len(ids):
                keep = torch.argsort(point_keys(ids, seed))[:patches_per_image].sort().values
                image_patches, ids = image_patches[keep], ids[keep]
            patches.append(image_patches)
            patch_ids.append(ids)
    if not patches:
        dim = 3 * patch_size**2
        return torch.empty(0, dim, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(patches), torch.cat(patch_ids)


def kmeans_image_processor(config: KmeansConfig) -> KmeansImageProcessor:
    """The view a tokenizer of `config` reads: `image_size` px, bicubic, raw [0, 1] pixels."""
    size = {"height": config.image_size, "width": config.image_size}
    return KmeansImageProcessor(size=size, crop_size=size)


def fit_kmeans_tokenizer(
    dataset,
    image_column: str,
    config: KmeansConfig,
    num_iterations: int = 20,
    init: str | torch.Tensor = "random",
    patches_per_image: int | None = None,
    seed: int = 0,
    backend: str = "torch",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    skipped: SkippedImageCounter | None = None,
    show_progress: bool = True,
) -> tuple[KmeansModel, KmeansImageProcessor, KmeansFit]:
    """Fit a centroid tokenizer on the images of `dataset`: sample patches ([`sample_patches`]), run [`fit_kmeans`].

    Args:
        dataset: Images, e.g. `load_image_datasets(...)[0]["train"]`.
        image_column (`str`): The image column.
        config ([`KmeansConfig`]): View size, patch size and number of centroids.
        device (`torch.device` or `str`, *optional*): Where Lloyd's iterations run (default: the GPU if any).
        Other arguments: see [`sample_patches`] and [`fit_kmeans`].

    Returns:
        `(tokenizer, image_processor, fit)`: the [`KmeansModel`] holding the centroids, its
        [`KmeansImageProcessor`] and the [`KmeansFit`] (inertia per iteration).
    """
    image_processor = kmeans_image_processor(config)
    patches, patch_ids = sample_patches(
        dataset,
        image_column,
        image_processor,
        config.patch_size,
        patches_per_image=patches_per_image,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        skipped=skipped,
        show_progress=show_progress,
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fit = fit_kmeans(
        patches.to(device),
        config.codebook_size,
        num_iterations=num_iterations,
        init=init,
        seed=seed,
        point_ids=patch_ids.to(device),
        backend=backend,
        show_progress=show_progress,
    )
    tokenizer = KmeansModel(config)
    tokenizer.set_centroids(fit.centroids)
    return tokenizer, image_processor, fit


def select_images(dataset, max_images: int | None, seed: int = 0):
    """At most `max_images` images of `dataset`: a seeded random subset of a map-style dataset, the first ones of a
    streaming one (CCViT fits on 50 images per ImageNet class, 50,000 in all)."""
    if max_images is None:
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return dataset.take(max_images)
    if max_images >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_images))


def require_enough_patches(dataset, config: KmeansConfig, fit_args: KmeansFitArguments, codebook_flag: str) -> None:
    """A one-line error, before any image is read, when the images cannot give one patch per centroid; names the flag
    that sets the number of centroids. Streaming datasets (no length) are checked by the fit itself."""
    if not hasattr(dataset, "__len__"):
        return
    images = min(len(dataset), fit_args.kmeans_max_images or len(dataset))
    per_image = fit_args.kmeans_patches_per_image or config.grid_size**2
    if images * per_image >= config.codebook_size:
        return
    fewer = 2 ** int(math.log2(max(images * per_image, 1)))
    raise UsageError(
        f"k-means of {config.codebook_size} centroids needs at least as many patches, but {images} images x "
        f"{per_image} patches give {images * per_image}: lower {codebook_flag} (e.g. {fewer}), or fit on more images"
    )


def _fit_from_arguments(
    dataset, image_column, config, fit_args: KmeansFitArguments, init, seed, device, num_workers, codebook_flag
):
    require_enough_patches(dataset, config, fit_args, codebook_flag)
    return fit_kmeans_tokenizer(
        select_images(dataset, fit_args.kmeans_max_images, seed),
        image_column,
        config,
        num_iterations=fit_args.kmeans_iterations,
        init=init,
        patches_per_image=fit_args.kmeans_patches_per_image,
        seed=seed,
        backend=fit_args.kmeans_backend,
        batch_size=fit_args.kmeans_batch_size,
        num_workers=num_workers,
        device=device,
    )


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def fit_tokenizer_for_mim(
    dataset,
    image_column: str,
    config: KmeansConfig,
    fit_args: KmeansFitArguments,
    folder: str,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    refit: bool = False,
) -> str:
    """`run_mim.py --fit_tokenizer`: fit centroids on the pre-training images and save the tokenizer in `folder`.

    Every process takes part in the fit (each reads its share of the images); process 0 writes the folder. A folder
    that already holds a tokenizer (an interrupted run being resumed) is reused unless `refit`.

    Returns:
        `folder`, to load as the MIM model's tokenizer.
    """
    if os.path.isfile(os.path.join(folder, "config.json")) and not refit:
        logger.info("Using the k-means tokenizer already fitted in %s (pass --overwrite_output_dir to refit)", folder)
        return folder
    logger.info("Fitting %d k-means centroids of %d px patches on the training images", config.codebook_size,
                config.patch_size)
    tokenizer, image_processor, fit = _fit_from_arguments(
        dataset, image_column, config, fit_args, fit_args.kmeans_init, seed, device, num_workers, "--fit_codebook_size"
    )
    if _world()[0] == 0:
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
    _barrier()
    logger.info("Fitted the tokenizer on %d patches: inertia %.6g -> %.6g", fit.num_points, fit.inertia[0],
                fit.inertia[-1])
    return folder


@torch.no_grad()
def _evaluate(tokenizer: KmeansModel, image_processor, dataset, image_column, fit_args, seed, num_workers, device):
    """Mean squared distance of validation patches to their centroid, and the codebook usage and perplexity of their
    nearest centroids, computed on `device` (the fit's: where the process group reduces)."""
    patches, _ = sample_patches(
        dataset, image_column, image_processor, tokenizer.config.patch_size, seed=seed,
        batch_size=fit_args.kmeans_batch_size, num_workers=num_workers, show_progress=False,
    )
    centroids = tokenizer.centroids.to(device)
    # Sum of squared distances and number of patches.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    totals[1] = len(patches)
    counts = torch.zeros(tokenizer.config.codebook_size, dtype=torch.long, device=device)
    # Block by block: the float32 copy of a whole validation set need not fit on the device.
    for block in patches.split(2**16):
        ids, sq_distances = nearest_centroids(_as_float(block.to(device)), centroids)
        totals[0] += sq_distances.sum(dtype=torch.float64)
        counts += code_counts(ids, tokenizer.config.codebook_size)
    _all_reduce_(totals, counts)
    return {
        "eval_mean_sq_distance": float(totals[0] / totals[1].clamp(min=1)),
        **{f"eval_{name}": value for name, value in codebook_metrics(counts).items()},
        "eval_num_patches": int(totals[1]),
    }


def train_kmeans_tokenizer(
    tokenizer: KmeansModel,
    image_processor: KmeansImageProcessor,
    raw,
    image_column: str,
    args,
    training_args,
    dataset_tags: str | None = None,
) -> dict[str, float]:
    """`train_tokenizer.py --tokenizer_type kmeans`: fit (`--do_train`) and measure (`--do_eval`), save, card, push.

    k-means is not gradient training, so there is no `Trainer`: the fit is one pass of patch sampling followed by
    Lloyd iterations, in every process of the launch.

    Args:
        tokenizer ([`KmeansModel`]): Its config sets view, patch size and number of centroids.
        image_processor ([`KmeansImageProcessor`]): Saved with the tokenizer.
        raw (`DatasetDict`): "train" (and "validation" for `--do_eval`, checked before any fit) images.
        args: The script's tokenizer arguments: the `--kmeans_*` options of [`KmeansFitArguments`], and
            `tokenizer_name_or_path`, which (when set) makes Lloyd's iterations continue from the loaded centroids
            instead of starting from `--kmeans_init`.
        training_args (`TrainingArguments`): `output_dir`, `seed`, `do_train`/`do_eval`, `dataloader_num_workers`,
            the device and the Hub options.
        dataset_tags (`str`, *optional*): Hub dataset id for the model card.
    """
    if training_args.do_eval:
        require_validation_split(raw)
    seed, workers, output_dir = training_args.seed, training_args.dataloader_num_workers, training_args.output_dir
    is_main = _world()[0] == 0
    metrics = {}
    if training_args.do_train:
        start = time.perf_counter()
        init = tokenizer.centroids.detach().clone() if args.tokenizer_name_or_path else args.kmeans_init
        _, _, fit = _fit_from_arguments(
            raw["train"], image_column, tokenizer.config, args, init, seed, training_args.device, workers,
            "codebook_size in --config_overrides",
        )
        tokenizer.set_centroids(fit.centroids)
        metrics.update(
            train_inertia=fit.inertia[-1],
            train_mean_sq_distance=fit.inertia[-1] / fit.num_points,
            train_num_patches=fit.num_points,
            train_runtime=time.perf_counter() - start,
        )
        if is_main:
            tokenizer.save_pretrained(output_dir)
            image_processor.save_pretrained(output_dir)
    if training_args.do_eval:
        metrics.update(
            _evaluate(
                tokenizer, image_processor, raw["validation"], image_column, args, seed, workers, training_args.device
            )
        )
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "all_results.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        for name, value in metrics.items():
            logger.info("  %s = %s", name, value)
        if training_args.do_train:
            write_model_card(output_dir, repo_id=training_args.hub_model_id, datasets=dataset_tags)
            if training_args.push_to_hub:
                push_folder(
                    output_dir,
                    training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
                    private=training_args.hub_private_repo,
                    revision=training_args.hub_revision,
                    token=training_args.hub_token,
                    datasets=dataset_tags,
                )
    _barrier()
    return metrics


__all__ = [
    "BACKENDS",
    "INIT_METHODS",
    "KmeansFit",
    "KmeansFitArguments",
    "fit_kmeans",
    "fit_kmeans_tokenizer",
    "fit_tokenizer_for_mim",
    "init_centroids",
    "kmeans_image_processor",
    "point_keys",
    "sample_patches",
    "select_images",
    "train_kmeans_tokenizer",
]
