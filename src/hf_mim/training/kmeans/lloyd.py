"""Lloyd's k-means on a tensor of points, under any number of processes.

`fit_kmeans` assigns points to centroids by a blocked matrix product with a fused argmin (the same
`nearest_centroids` the tokenizer uses at training time), on the points' device; 8-bit pixel points on CPU use an exact
integer kernel instead (`_PixelAssignment`), and a GPU one bfloat16 product whose two nearest centroids are re-checked
in float32 (`_Bfloat16Assignment`). `init_centroids` draws the initial centroids ("random" or k-means++).

Under `accelerate launch` (any `torch.distributed` process group) every process holds its own share of the points,
and per-cluster sums, counts and the inertia are all-reduced each iteration. Every random choice is keyed by a
point's global id rather than by its position in a process's share, so the fit equals a single-process fit on the
same data: exactly for 8-bit patches (their sums are exact), up to float summation order for float points.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...models.centroids import nearest_centroids
from ...models.distributed import all_gather_rows, all_reduce_, computed_on_main, is_distributed, world
from ...models.modeling_tokenizer import code_counts

logger = logging.getLogger(__name__)

INIT_METHODS = ("random", "k-means++")
BACKENDS = ("torch", "faiss")
DISTANCE_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class KmeansFit:
    """The result of [`fit_kmeans`].

    Args:
        centroids (`torch.FloatTensor` of shape `(num_clusters, dim)`): The final centroids, on the CPU.
        inertia (`list[float]`): Sum of squared distances of all points to their nearest centroid, at the
            assignment step of each iteration (non-increasing).
        num_points (`int`): Points fitted, over all processes.
        counts (`torch.LongTensor` of shape `(num_clusters,)`, *optional*): Points per cluster at the last
            assignment step, over all processes (the codebook usage of the training points); None from faiss.
        skipped_images (`int`, *optional*): Undecodable images left out of the points, over all processes; set by
            [`fit_centroids`] when it counts them.
    """

    centroids: torch.Tensor
    inertia: list[float]
    num_points: int
    counts: torch.Tensor | None = None
    skipped_images: int | None = None


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


def as_float_points(points: torch.Tensor) -> torch.Tensor:
    """float32 points; uint8 points are 8-bit pixels, i.e. `value / 255` exactly as the image pipeline computes it."""
    if points.dtype == torch.uint8:
        return points.float().div_(255.0)
    return points.float()


def _smallest_keys(points: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` points with the smallest keys over all processes, as float32, in key order."""
    local = torch.argsort(keys)[:count]
    all_keys, all_points = all_gather_rows(keys[local], points[local])
    return as_float_points(all_points[torch.argsort(all_keys)[:count]])


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
    pool = _smallest_keys(points, keys, pool_size or 16 * num_clusters)
    # Computed once and broadcast: every process would get the same result, but k-means++ is sequential work.
    return computed_on_main(
        lambda: _kmeans_plus_plus(pool, num_clusters, seed), (num_clusters, pool.shape[1]), pool.dtype, pool.device
    )


def _default_point_ids(points: torch.Tensor, point_ids: torch.Tensor | None) -> torch.Tensor:
    if point_ids is None:
        if is_distributed():
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
    all_sq, all_keys, all_points = all_gather_rows(sq_distances[order].double(), keys[order], points[order])
    chosen = np.lexsort((all_keys.cpu().numpy(), -all_sq.cpu().numpy()))[:count]
    centroids[empty] = as_float_points(all_points[torch.from_numpy(chosen).to(points.device)])


class _FloatAssignment:
    """Nearest centroids by float32 products `||c||^2 - 2 x.c` (the tokenizer's own search), on any device."""

    # Blocks are returned in the points' units.
    sum_scale = 1.0

    @staticmethod
    def accumulate(sums: torch.Tensor, ids: torch.Tensor, block: torch.Tensor) -> None:
        # On the CPU index_add_ sums in a fixed order (reproducible sums); on a GPU it adds atomically, so float
        # sums, hence centroids, can differ in their last bits between runs.
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


class _Bfloat16Assignment:
    """Nearest centroids from one bfloat16 matrix product (tensor cores on a GPU), its two best re-checked in float32.

    Points and centroids are shifted by the centroids' mean (distances do not change; the rounding shrinks with the
    coordinates) and rounded to bfloat16. One product of `[x, 1, 1, 1]` with `[-2c, n_1, n_2, n_3]`, where
    `n_1 + n_2 + n_3` is `||c||^2` of the rounded centroid split into three bfloat16 terms (float32's precision),
    accumulated in float32, gives `||x - c||^2 - ||x||^2` of the rounded vectors. The two smallest per point are
    the candidates, and their float32 distances `sum (x - c)^2` pick the nearest and are the distances returned.
    Rounding moves a score by about `2 (x - c).delta` (delta: the rounding, 2^-9 of a shifted coordinate), so the
    nearest centroid is missed only where two others are within that margin of it, and then one of those is taken.
    8-bit pixels are summed as bytes, exactly in any order: a GPU's atomic sums give the same centroids every time.
    """

    accumulate = staticmethod(_FloatAssignment.accumulate)

    def __init__(self, points: torch.Tensor, num_clusters: int, chunk_size: int):
        self.points = points
        dim, device = points.shape[1], points.device
        rows = max(1, min(chunk_size, len(points)))
        self.pixels = points.dtype == torch.uint8
        self.sum_scale = 255.0 if self.pixels else 1.0
        self.values = torch.empty(rows, dim, device=device)
        self.block = torch.empty(rows, dim, device=device) if self.pixels else self.values
        self.differences = torch.empty(rows, dim, device=device)
        # The product's inner size: the coordinates and the three ones, padded to a multiple of 8 (tensor cores).
        width = -(-(dim + 3) // 8) * 8
        self.rounded = torch.zeros(rows, width, dtype=torch.bfloat16, device=device)
        self.rounded[:, dim : dim + 3] = 1
        # CPUs have no bfloat16 product with a float32 result; float32 products of the same bfloat16 values are the
        # same sums (each product of two bfloat16 values is exact in float32), so the CPU computes those.
        self.emulated = device.type == "cpu"
        self.workspace = torch.empty(rows, num_clusters, device=device) if self.emulated else None

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids
        dim = centroids.shape[1]
        self.shift = centroids.mean(dim=0)
        rounded = (centroids - self.shift).to(torch.bfloat16)
        operand = torch.zeros(len(centroids), self.rounded.shape[1], dtype=torch.bfloat16, device=centroids.device)
        operand[:, :dim] = rounded * -2
        remainder = rounded.float().square().sum(dim=1)
        for column in range(dim, dim + 3):
            operand[:, column] = remainder.to(torch.bfloat16)
            remainder = remainder - operand[:, column].float()
        self.operand = operand.t().float() if self.emulated else operand.t()

    def _sq_distances(self, block: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        differences = torch.sub(block, self.centroids[ids], out=self.differences[: len(block)])
        return differences.square_().sum(dim=1)

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block in summing units, nearest-centroid ids, float32 squared distances) of points `start:stop`."""
        rows, dim = stop - start, self.points.shape[1]
        values = self.values[:rows].copy_(self.points[start:stop])
        block = torch.div(values, 255.0, out=self.block[:rows]) if self.pixels else values
        rounded = self.rounded[:rows]
        rounded[:, :dim].copy_(torch.sub(block, self.shift, out=self.differences[:rows]))
        if self.emulated:
            scores = torch.mm(rounded.float(), self.operand, out=self.workspace[:rows])
        else:
            scores = torch.mm(rounded, self.operand, out_dtype=torch.float32)
        first = scores.argmin(dim=1)
        scores.scatter_(1, first.unsqueeze(1), float("inf"))
        candidates = torch.stack([first, scores.argmin(dim=1)], dim=1)
        sq_distances = torch.stack([self._sq_distances(block, ids) for ids in candidates.unbind(dim=1)], dim=1)
        sq_distances, nearest = sq_distances.min(dim=1)
        return values, candidates.gather(1, nearest.unsqueeze(1)).squeeze(1), sq_distances


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
    distance_precision: str = "auto",
) -> KmeansFit:
    """Lloyd's k-means of `points` (of this process; under several processes, of all of them together).

    Each iteration assigns every point to its nearest centroid (blocked matrix products with a fused argmin),
    then moves every centroid to the mean of its points; a cluster left empty is moved onto a point far from its
    centroid. 8-bit pixel points on CPU use exact integer products (see `_PixelAssignment`), a GPU bfloat16 products
    with float32 re-checks (`distance_precision`), everything else float32 `||c||^2 - 2 x.c`. Sums are accumulated in float32 over at most 65536 points (exact for 8-bit pixels)
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
        distance_precision (`str`, *optional*, defaults to `"auto"`): How the assignment step's products are computed.
            `"bfloat16"`: one bfloat16 product (tensor cores), the two nearest centroids it finds re-checked in
            float32 (see `_Bfloat16Assignment`); `"float32"`: float32 products (exact integer ones for 8-bit pixels
            on CPU); `"auto"`: bfloat16 on a CUDA GPU whose torch has bfloat16 products with float32 results,
            float32 elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown k-means backend {backend!r}; choose one of {list(BACKENDS)}")
    if points.ndim != 2:
        raise ValueError(f"points must be a (num_points, dim) tensor, got shape {tuple(points.shape)}")
    if points.dtype != torch.uint8 and not points.is_floating_point():
        raise ValueError(f"points must be float or uint8 pixels, got {points.dtype}")
    if distance_precision not in DISTANCE_PRECISIONS:
        raise ValueError(
            f"Unknown distance precision {distance_precision!r}; choose one of {list(DISTANCE_PRECISIONS)}"
        )
    rank, world_size = world()
    num_points = torch.tensor([points.shape[0]], dtype=torch.long, device=points.device)
    all_reduce_(num_points)
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
        if world_size > 1:
            raise ValueError("The faiss backend runs in one process; use backend='torch' under accelerate launch")
        return _fit_faiss(points, centroids, num_iterations, seed, show_progress)

    assignment_class = _assignment_class(points, distance_precision)
    # bfloat16 products are fast enough on a GPU that larger blocks pay: fewer, longer kernels (512 MiB of scores).
    block_elements = 2**27 if assignment_class is _Bfloat16Assignment and points.device.type != "cpu" else 2**24
    chunk_size = min(chunk_size or max(256, block_elements // num_clusters), 2**16)
    assignment = assignment_class(points, num_clusters, chunk_size)
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
        all_reduce_(sums, counts, inertia)
        history.append(float(inertia))
        progress.set_postfix(inertia=f"{history[-1]:.6g}")
        empty = torch.nonzero(counts == 0).flatten()
        centroids = (sums / (counts.clamp(min=1).unsqueeze(1) * assignment.sum_scale)).float()
        if empty.numel():
            logger.info("Re-seeding %d empty clusters", empty.numel())
            _reseed_empty_clusters(centroids, empty, points, keys, sq_distances)
    progress.close()
    logger.info(
        "k-means: %d points in %d processes, %d clusters, inertia per iteration %s", num_points, world_size, num_clusters,
        history,
    )
    return KmeansFit(centroids=centroids.cpu(), inertia=history, num_points=num_points, counts=counts.cpu())


def _assignment_class(points: torch.Tensor, distance_precision: str) -> type:
    """The assignment step of a fit of `points` at `distance_precision` (see [`fit_kmeans`])."""
    # torch.mm(..., out_dtype=torch.float32) of bfloat16 operands: torch 2.8 and later.
    bfloat16_products = "dtype" in torch.ops.aten.mm.overloads()
    if distance_precision == "auto":
        distance_precision = "bfloat16" if points.device.type == "cuda" and bfloat16_products else "float32"
    if distance_precision == "bfloat16":
        if points.device.type != "cpu" and not bfloat16_products:
            raise ValueError(
                f"bfloat16 k-means distances need torch.mm with out_dtype (torch 2.8 or later; this is "
                f"{torch.__version__}): upgrade torch or use float32 distances"
            )
        return _Bfloat16Assignment
    return _PixelAssignment if points.dtype == torch.uint8 and points.device.type == "cpu" else _FloatAssignment


def _fit_faiss(
    points: torch.Tensor, centroids: torch.Tensor, num_iterations: int, seed: int, show_progress: bool
) -> KmeansFit:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install 'hf_mim[faiss]' (faiss-cpu)") from error
    data = np.ascontiguousarray(as_float_points(points).cpu().numpy())
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



__all__ = [
    "BACKENDS",
    "DISTANCE_PRECISIONS",
    "INIT_METHODS",
    "KmeansFit",
    "as_float_points",
    "fit_kmeans",
    "init_centroids",
    "point_keys",
]
