"""hf_mim.models.distributed: the same results on every process of a real (gloo) process group, no-ops without one."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_mim.models.distributed import (
    all_gather_rows,
    all_reduce_,
    barrier,
    computed_on_main,
    is_distributed,
    world,
)


def test_single_process_helpers_return_their_inputs():
    rows, ids = torch.arange(6.0).reshape(3, 2), torch.arange(3)
    gathered = all_gather_rows(rows, ids)
    assert gathered[0] is rows and gathered[1] is ids
    total = torch.ones(2)
    all_reduce_(total)
    barrier()
    assert world() == (0, 1) and not is_distributed() and torch.equal(total, torch.ones(2))
    computed = computed_on_main(lambda: torch.full((2,), 7.0), (2,), torch.float32, torch.device("cpu"))
    assert torch.equal(computed, torch.full((2,), 7.0))


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Unequal shares: rank 0 holds 2 rows, rank 1 holds 3.
        rows = torch.full((2 + rank, 2), float(rank))
        ids = torch.arange(2 + rank) + 10 * rank
        gathered_rows, gathered_ids = all_gather_rows(rows, ids)
        total = torch.tensor([rank + 1.0])
        all_reduce_(total)
        # Only process 0 runs `compute`; the others would return something else if they did.
        shared = computed_on_main(lambda: torch.full((3,), 5.0 + rank), (3,), torch.float32, torch.device("cpu"))
        barrier()
        results[rank] = (world(), is_distributed(), gathered_rows, gathered_ids, total, shared)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_rows_sums_and_the_main_result(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        (world_, distributed, rows, ids, total, shared) = results[rank]
        assert world_ == (rank, 2) and distributed
        assert torch.equal(rows, torch.tensor([[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 3))
        assert torch.equal(ids, torch.tensor([0, 1, 10, 11, 12]))
        assert torch.equal(total, torch.tensor([3.0]))
        assert torch.equal(shared, torch.full((3,), 5.0))
