"""Collectives of the default `torch.distributed` process group, for code that must give every process the same result
(VQ-KD's codebook updates, the k-means fit); each is a no-op in a single process or without a process group.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether there are other processes to communicate with."""
    return world()[1] > 1


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all processes, in place."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)


def all_gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The rows of each tensor from every process, concatenated in rank order; the tensors of one process have the
    same number of rows, which may differ across processes."""
    if not is_distributed():
        return list(tensors)
    length = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    lengths = [torch.zeros_like(length) for _ in range(world()[1])]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    gathered = []
    for tensor in tensors:
        # all_gather needs equal shapes: pad to the longest share, then drop the padding.
        padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, lengths)]))
    return gathered


def computed_on_main(
    compute: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`compute()`, run on process 0 only and broadcast to the others, which pass the result's `shape`, `dtype` and
    `device`: for random or sequential work whose result every process must share."""
    if world()[0] == 0:
        result = compute()
    else:
        result = torch.empty(shape, dtype=dtype, device=device)
    if is_distributed():
        dist.broadcast(result, src=0)
    return result


def barrier() -> None:
    """Wait for every process (e.g. until process 0 has written a folder the others read)."""
    if is_distributed():
        dist.barrier()


__all__ = ["all_gather_rows", "all_reduce_", "barrier", "computed_on_main", "is_distributed", "world"]
