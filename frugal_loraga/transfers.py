"""Tensors moved between the GPU and pageable host memory without holding the GPU up.

Between the GPU and pageable memory CUDA copies through a small page-locked staging buffer, and the CPU waits: for the
kernels queued before the copy, then for the copy itself, while the GPU runs out of queued work. On a small card the
estimate's top group makes thousands of such copies and each lower group waits so for each batch's input: they took
over half of a small card's estimate (bench/RESULTS.md). Here every copy goes through one slot of a small ring of page-locked buffers, and
worker threads do the CPU's part:
  to the host   the GPU copies into a slot on a side stream; a worker waits for that copy and moves the slot on into
                pageable memory (cheap to allocate, and it can be swapped; page-locked memory is neither).
  to the GPU    a worker fills a slot ahead of use (stage); the GPU then copies the slot in on the current stream.
The calling thread waits only when every slot is in use. A tensor larger than a slot is copied the plain way.
"""
from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view."""
    return tensor.reshape(-1).view(torch.uint8)


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


RING_BYTES = 256 * 2**20  # the most page-locked memory for the ring (Llama-2-7B, 2 x 1024 tokens: 8 slots of 16 MiB)


class HostTransfers:
    """A ring of page-locked buffers of `slot_bytes` each, for copies between `device` and pageable memory: `slots`
    of them, by default as many as RING_BYTES holds, from 3 (one being copied in, two staged ahead) to 8."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: Optional[int] = None, workers: int = 2):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.slot_bytes = slot_bytes
        slots = slots or max(3, min(8, RING_BYTES // max(slot_bytes, 1)))
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self.free.put(slot)
        self.workers = ThreadPoolExecutor(workers, thread_name_prefix="frugal-loraga-transfers")

    def to_host(self, tensor: torch.Tensor) -> Future:
        """A future of the CUDA tensor's value in pageable CPU memory, as of now in the current stream's order (the
        tensor must not be changed in place afterwards: the copy may read it later)."""
        source = tensor.detach().contiguous()
        nbytes = source.numel() * source.element_size()
        if nbytes > self.slot_bytes:
            return _done(source.to("cpu"))
        slot = self.free.get()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.slots[slot][:nbytes].copy_(_as_bytes(source), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        source.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return self.workers.submit(self._unstage, slot, copied, source.shape, source.dtype)

    def _unstage(self, slot: int, copied: torch.cuda.Event, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        copied.synchronize()
        out = torch.empty(shape, dtype=dtype)
        _as_bytes(out).copy_(self.slots[slot][:out.numel() * out.element_size()])
        self.free.put(slot)
        return out

    def stage(self, source) -> Future:
        """Start copying a CPU tensor (or a future of one) into a slot, for to_device: a future of (slot, tensor),
        slot None for a tensor larger than a slot. Take each staged future to to_device, or its slot stays taken."""
        slot = self.free.get()
        return self.workers.submit(self._stage, slot, source)

    def _stage(self, slot: int, source) -> tuple[Optional[int], torch.Tensor]:
        tensor = source.result() if isinstance(source, Future) else source
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.slot_bytes:
            self.free.put(slot)
            return None, tensor
        self.slots[slot][:nbytes].copy_(_as_bytes(tensor.contiguous()))
        return slot, tensor

    def to_device(self, staged: Future) -> torch.Tensor:
        """The staged tensor on the device, copied in on the current stream; the slot is free once that copy is."""
        slot, tensor = staged.result()
        if slot is None:
            return tensor.to(self.device, non_blocking=True)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        _as_bytes(out).copy_(self.slots[slot][:out.numel() * out.element_size()], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.workers.submit(self._release, slot, copied)
        return out

    def _release(self, slot: int, copied: torch.cuda.Event) -> None:
        copied.synchronize()
        self.free.put(slot)

    def close(self) -> None:
        self.workers.shutdown(wait=True)
        self.slots.clear()
