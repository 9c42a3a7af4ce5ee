"""Mask generators for masked image modeling: BEiT blockwise masking and uniform random masking.

Both return a boolean `(height, width)` grid over the ViT's patches (True = masked); flatten it
row-major to get the `bool_masked_pos` a model expects. This is the one masking module of
hf_mim; the data collator, the training scripts and the tests all use it.

Randomness: a generator is called with an explicit `numpy.random.Generator` (the training scripts
pass each example's own, see `apply_transform(..., seed=...)`), or with none, in which case it
seeds a fresh one from torch's global RNG. DataLoader seeds torch differently in
every worker, and `transformers.set_seed` and checkpoint resumption restore torch's RNG state,
so masks are reproducible and differ across workers without any hidden global state.
"""

import math

import numpy as np
import torch


def numpy_rng_from_torch() -> np.random.Generator:
    """A fresh numpy Generator seeded from torch's global CPU RNG (advances that RNG by one draw)."""
    # The CPU generator whatever the default device: masks are drawn in DataLoader workers, which cannot use CUDA.
    seed = int(torch.randint(0, 2**63 - 1, (1,), device="cpu").item())
    return np.random.default_rng(seed)


def _grid_shape(input_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (input_size, input_size) if np.ndim(input_size) == 0 else tuple(input_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"input_size must be a positive number of patches per side or a (height, width) pair of them, "
            f"got {input_size}"
        )
    return int(size[0]), int(size[1])


def scale_num_patches(num_patches: int, to_grid: int, from_grid: int = 196) -> int:
    """Rescale a patch count chosen for a grid of `from_grid` patches to a grid of `to_grid` patches.

    BEiT's defaults (75 masked, blocks of at least 16) are given for the 14x14 = 196 grid of a
    224 px ViT-B/16; `scale_num_patches(75, to_grid=64)` keeps the same masked fraction on an
    8x8 grid. A positive count never scales to 0.
    """
    if from_grid <= 0 or to_grid <= 0:
        raise ValueError(
            f"from_grid and to_grid are numbers of patches and must be positive, got from_grid={from_grid}, "
            f"to_grid={to_grid}"
        )
    if num_patches <= 0:
        return 0
    return max(1, round(num_patches * to_grid / from_grid))


class BlockwiseMaskingGenerator:
    r"""BEiT's blockwise masking: masks random rectangular blocks until a patch budget is used.

    Each block has an area drawn uniformly from [`min_num_patches`, remaining budget (capped at
    `max_num_patches`)] and an aspect ratio drawn log-uniformly from [`min_aspect`, `max_aspect`];
    a block is kept only if it adds between 1 and budget new patches (10 attempts per block).

    Args:
        input_size (`int` or `tuple[int, int]`):
            Grid size in patches, e.g. 14 for a 224 px image with 16 px patches, or (height, width).
        num_masking_patches (`int`):
            Patches to mask per image (BEiT: 75 of 196, about 40%).
        min_num_patches (`int`, *optional*, defaults to 16):
            Smallest block area, in patches.
        max_num_patches (`int`, *optional*):
            Largest block area; defaults to `num_masking_patches`.
        min_aspect (`float`, *optional*, defaults to 0.3):
            Smallest block aspect ratio (height / width).
        max_aspect (`float`, *optional*):
            Largest block aspect ratio; defaults to `1 / min_aspect`.
        exact (`bool`, *optional*, defaults to `True`):
            BEiT v2 behaviour: after placing blocks, mask random extra patches so that exactly
            `num_masking_patches` are masked. With `False` (BEiT v1) the count is at most
            `num_masking_patches` and falls short when no block fits the remaining budget.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = True,
    ):
        self.height, self.width = _grid_shape(input_size)
        self.num_patches = self.height * self.width
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be between 0 and the {self.num_patches} patches of a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}; lower it or scale it to the grid "
                f"with scale_num_patches"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be at least 1, got {min_num_patches}")
        if num_masking_patches > 0 and min_num_patches > num_masking_patches:
            raise ValueError(
                f"min_num_patches ({min_num_patches}) exceeds num_masking_patches ({num_masking_patches}), so no "
                f"block fits the budget; lower min_num_patches, e.g. to scale_num_patches(16, "
                f"to_grid={self.num_patches})"
            )
        if num_masking_patches > 0 and max_num_patches < min_num_patches:
            raise ValueError(
                f"max_num_patches ({max_num_patches}) must be at least min_num_patches ({min_num_patches}); "
                f"raise it or leave it unset to use num_masking_patches"
            )
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive (a height / width ratio), got {min_aspect}")
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(
                f"max_aspect ({max_aspect}) must be at least min_aspect ({min_aspect}); leave it unset to use "
                f"1 / min_aspect"
            )

        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.exact = exact

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({math.exp(self.log_aspect_ratio[0]):.3g}, "
            f"{math.exp(self.log_aspect_ratio[1]):.3g}), exact={self.exact})"
        )

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Masks one block adding 1..`budget` new patches (10 attempts); returns how many it added."""
        for _ in range(10):
            # `a + (b - a) * u` like Python's random.uniform, which BEiT uses: valid when the budget is
            # below min_num_patches (the last blocks), where numpy's uniform(low > high) is undefined.
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            low, high = self.log_aspect_ratio
            aspect = math.exp(low + (high - low) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # Strict '<' as in BEiT: a block never spans a whole side of the grid.
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                added = h * w - int(block.sum())
                if 0 < added <= budget:
                    block[...] = True
                    return added
        return 0

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A boolean mask of shape `(height, width)`, True at masked patches."""
        rng = numpy_rng_from_torch() if rng is None else rng
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            added = self._place_block(mask, min(self.num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        # Blocks never overshoot the budget, so the v2 fix-up only ever has to add patches.
        if self.exact and count < self.num_masking_patches:
            extra = rng.choice(np.flatnonzero(~mask), self.num_masking_patches - count, replace=False)
            mask.flat[extra] = True
        return mask


class RandomMaskingGenerator:
    r"""Masks a uniformly random subset of patches (mc-BEiT's `--mask_type random`, SimMIM-style).

    Args:
        input_size (`int` or `tuple[int, int]`):
            Grid size in patches, or (height, width).
        mask_ratio (`float`, *optional*):
            Fraction of patches to mask; `int(mask_ratio * num_patches)` are masked (mc-BEiT: 0.75 -> 147 of 196).
        num_masking_patches (`int`, *optional*):
            Exact number of patches to mask. Give exactly one of `mask_ratio` and `num_masking_patches`.
    """

    # Every mask has exactly `num_masking_patches` patches (see `MimDataCollator.exact_counts`).
    exact = True

    def __init__(
        self,
        input_size: int | tuple[int, int],
        mask_ratio: float | None = None,
        num_masking_patches: int | None = None,
    ):
        self.height, self.width = _grid_shape(input_size)
        self.num_patches = self.height * self.width
        if (mask_ratio is None) == (num_masking_patches is None):
            raise ValueError(
                f"give exactly one of mask_ratio and num_masking_patches, got mask_ratio={mask_ratio}, "
                f"num_masking_patches={num_masking_patches}"
            )
        if mask_ratio is not None:
            if not 0.0 <= mask_ratio <= 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
            # Truncated as mc-BEiT's code does: int(0.6 * 196) = 117 (rounding would mask 118).
            num_masking_patches = int(mask_ratio * self.num_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be between 0 and the {self.num_patches} patches of a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}"
            )
        self.num_masking_patches = num_masking_patches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches})"
        )

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A boolean mask of shape `(height, width)` with exactly `num_masking_patches` True entries."""
        rng = numpy_rng_from_torch() if rng is None else rng
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, self.num_masking_patches, replace=False)] = True
        return mask.reshape(self.height, self.width)


class ReplacementPositionGenerator:
    r"""CCViT's centroid replacement positions: patches drawn uniformly among those a mask leaves visible.

    The model overwrites these patches with their centroid's pixels; like masked patches, they are predicted. The
    two sets never overlap, and exactly `num_replaced_patches` patches are drawn for every mask.

    Args:
        input_size (`int` or `tuple[int, int]`):
            Grid size in patches, or (height, width).
        num_replaced_patches (`int`):
            Patches to replace per image (CCViT: 20 of 196; `scale_num_patches(20, to_grid=...)` for other grids).
    """

    def __init__(self, input_size: int | tuple[int, int], num_replaced_patches: int):
        self.height, self.width = _grid_shape(input_size)
        self.num_patches = self.height * self.width
        if not 0 <= num_replaced_patches <= self.num_patches:
            raise ValueError(
                f"num_replaced_patches must be between 0 and the {self.num_patches} patches of a "
                f"{self.height}x{self.width} grid, got {num_replaced_patches}; scale it to the grid with "
                f"scale_num_patches"
            )
        self.num_replaced_patches = num_replaced_patches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_replaced_patches={self.num_replaced_patches})"
        )

    def __call__(self, mask: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """A boolean `(height, width)` grid with exactly `num_replaced_patches` True entries, all outside `mask`."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.height, self.width):
            raise ValueError(f"mask has shape {mask.shape}, expected the ({self.height}, {self.width}) patch grid")
        visible = np.flatnonzero(~mask)
        if len(visible) < self.num_replaced_patches:
            raise ValueError(
                f"Only {len(visible)} patches are left visible by the mask but {self.num_replaced_patches} must be "
                f"replaced; mask fewer patches or replace fewer"
            )
        rng = numpy_rng_from_torch() if rng is None else rng
        replaced = np.zeros(self.num_patches, dtype=bool)
        replaced[rng.choice(visible, self.num_replaced_patches, replace=False)] = True
        return replaced.reshape(self.height, self.width)


__all__ = [
    "BlockwiseMaskingGenerator",
    "RandomMaskingGenerator",
    "ReplacementPositionGenerator",
    "numpy_rng_from_torch",
    "scale_num_patches",
]
