"""A run shared by several processes (torchrun: one per GPU, torch.distributed). The estimate: each rank walks its
share of the batches, the ranks sum their gradients before the SVD, and every rank ends with rank 0's factors.
Training (data parallel): each rank runs its share of a step's grad_accum micro-batches, the adapters' gradients are
summed over the ranks before the optimizer step, so every rank takes the same step, that of one process running all
the micro-batches. Only rank 0 writes files. Without a process group the world is one process and every function
here leaves its input as it is.
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


def join(device_type: str) -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group once: NCCL with one GPU per
    process (LOCAL_RANK), gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def check_shares(grad_accum: int) -> None:
    """The ranks share each step's micro-batches: grad_accum a multiple of the number of processes."""
    processes = rank_and_size()[1]
    if grad_accum % processes:
        raise ConfigError(f"grad_accum={grad_accum} cannot be shared by {processes} processes: make it a multiple of "
                          f"{processes} (each runs grad_accum / {processes} micro-batches; a step's batch stays "
                          "batch_size x grad_accum)")


def is_writer() -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return rank_and_size()[0] == 0


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()


def sum_grads_over_ranks_(params: list[torch.Tensor]) -> None:
    """Each parameter's .grad replaced by its sum over the ranks, in one collective over them all."""
    if rank_and_size()[1] > 1:
        grads = [p.grad for p in params]
        flat = sum_over_ranks_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_values_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Numbers summed over the ranks (in fp64, on the device the backend needs)."""
    if rank_and_size()[1] == 1:
        return values
    return sum_over_ranks_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()
