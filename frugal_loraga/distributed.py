"""The gradient estimate shared by several processes (torch.distributed, as torchrun starts them): each rank walks
its share of the batches, the ranks sum their gradients before the SVD, and every rank ends with rank 0's factors.
Without a process group the world is one process and every function here leaves its input as it is.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import ConfigError


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: list) -> list:
    """This rank's items: rank r of s takes items r, r + s, r + 2s, ..."""
    rank, size = rank_and_size()
    return items[rank::size]


def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """tensor replaced in place by its sum over the ranks, the same on every rank."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_rank0_(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced in place by rank 0's, so that every rank holds the same bits."""
    if rank_and_size()[1] > 1:
        for tensor in tensors:
            buffer = tensor.contiguous()  # the backends send contiguous memory only
            dist.broadcast(buffer, src=0)
            if buffer is not tensor:
                tensor.copy_(buffer)


def check_one_process() -> None:
    """finetune trains in one process: several (torchrun) would each train and write the same out folder."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise ConfigError(f"WORLD_SIZE={processes}: finetune runs in one process, and {processes} would each train "
                          "and write the same out folder; start it with python (python -m frugal_loraga train ...), "
                          "not torchrun: training over several GPUs is not supported yet")
