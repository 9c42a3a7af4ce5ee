"""PIL's antialiased Lanczos resampling in torch, for the training views of the dVAE and VQGAN tokenizers.

PIL resizes in two separable passes: each output pixel is a weighted sum of a band of input pixels, the weights
being Lanczos-3 stretched by the downscaling factor and normalised to sum to one. Its inner loop is scalar C with
fixed-point weights and 8-bit rounding after each pass, which made the 112 px Lanczos view the most expensive step
of BEiT's and mc-BEiT's training transform. Here the same weights are applied as float32 matrix products, one per
band of `_BLOCK` output pixels (a dense product would multiply mostly zeros): 0.64 ms instead of PIL's 1.04 ms for
BEiT's crops of 500x375 photos to 112 px on one core (benchmarks/bench_data.py). The result is PIL's without its
rounding, within 1.5 levels (tests/test_resampling.py).
"""

import functools

import numpy as np
import torch


# Output pixels per matrix product: each product reads the input band its pixels cover. Smaller bands waste fewer
# multiplications on zeros but pay a call each: on BEiT's crops to 112 px, 8 was as slow as PIL, 16 to 48 about equal.
_BLOCK = 16
# Lanczos-3: the filter reaches three input pixels either side at scale 1, as PIL's.
_SUPPORT = 3.0


def _lanczos(x: np.ndarray) -> np.ndarray:
    """sinc(x) sinc(x / 3) on [-3, 3), zero elsewhere (PIL's half-open support)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sinc = np.where(x == 0, 1.0, np.sin(np.pi * x) / (np.pi * x))
        sinc_3 = np.where(x == 0, 1.0, np.sin(np.pi * x / 3) / (np.pi * x / 3))
    return np.where((x >= -_SUPPORT) & (x < _SUPPORT), sinc * sinc_3, 0.0)


@functools.lru_cache(maxsize=2048)
def _bands(in_size: int, out_size: int) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """PIL's Lanczos weights from `in_size` to `out_size` pixels, as `(start, stop, first, last, weights)`: output
    pixels [start, stop) read input pixels [first, last) with `weights` of shape (stop - start, last - first)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _SUPPORT * filter_scale
    centers = (np.arange(out_size) + 0.5) * scale
    # C's truncating casts, as PIL computes each output pixel's input range.
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    inputs = np.arange(in_size)
    weights = _lanczos((inputs[None, :] - centers[:, None] + 0.5) / filter_scale)
    weights = np.where((inputs[None, :] >= first[:, None]) & (inputs[None, :] < last[:, None]), weights, 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(totals == 0.0, 1.0, totals)
    bands = []
    for start in range(0, out_size, _BLOCK):
        stop = min(start + _BLOCK, out_size)
        low, high = int(first[start:stop].min()), int(last[start:stop].max())
        bands.append((start, stop, low, high, torch.from_numpy(weights[start:stop, low:high].astype(np.float32))))
    return tuple(bands)


def _resample_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, H, size): each row resampled, clipped to [0, 255] as PIL clips after a pass."""
    channels, height, width = x.shape
    rows = x.reshape(channels * height, width)
    out = x.new_empty((channels * height, size))
    for start, stop, low, high, weights in _bands(width, size):
        torch.mm(rows[:, low:high], weights.T, out=out[:, start:stop])
    return out.view(channels, height, size).clamp_(0.0, 255.0)


def _resample_columns(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, W): each column resampled, clipped to [0, 255]."""
    channels, height, width = x.shape
    out = x.new_empty((channels, size, width))
    for start, stop, low, high, weights in _bands(height, size):
        torch.matmul(weights, x[:, low:high], out=out[:, start:stop])
    return out.clamp_(0.0, 255.0)


def lanczos_resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an 8-bit image as PIL's `Image.resize(size, Image.LANCZOS)` does, in float32 without its rounding.

    Args:
        pixels (`torch.Tensor` of shape `(channels, height, width)`): The image's 8-bit values, any dtype and memory
            layout (e.g. a channels-last view of a PIL image's array).
        size (`tuple[int, int]`): The output's (height, width).

    Returns:
        `torch.Tensor` of shape `(channels, *size)`, float32 in [0, 255].
    """
    out_height, out_width = size
    if pixels.ndim != 3 or min(out_height, out_width) < 1:
        raise ValueError(
            f"Expected a (channels, height, width) image and a positive size, got {tuple(pixels.shape)} and {size}"
        )
    # A copy even of a float32 input: a dimension that keeps its size returns it, and it must not be the input.
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _, height, width = x.shape
    # PIL runs the vertical pass first when the height shrinks more than twice as much as the width (its pass order
    # decides where it clips); a dimension that keeps its size is not filtered at all.
    passes = [(_resample_rows, width, out_width), (_resample_columns, height, out_height)]
    if height - out_height > 0 and height - out_height > 2 * (width - out_width):
        passes.reverse()
    for resample, current, target in passes:
        if current != target:
            x = resample(x, target)
    return x


__all__ = ["lanczos_resize"]
