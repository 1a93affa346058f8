"""The inputs of the decoder layers (blocks) during the estimate: starting a backward at a block, stopping a forward
at one, and keeping what the top group's forward passes to each block for the groups below.

A block's call is (hidden state, other inputs): the hidden state (batch x tokens x hidden) changes from block to
block; the others (attention mask, rotary embeddings, positions) may differ between blocks too, as Gemma's
sliding-window and global layers' do.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Optional

import torch
from torch import nn

from ..transfers import HostTransfers


class _Reached(Exception):
    """Ends a forward pass at a block, carrying the block's inputs."""
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state in a block's call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: Optional[torch.Tensor]) -> tuple[tuple, dict]:
    """A block's call with another hidden state."""
    return ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def cut_hook(module, args, kwargs):
    """Make the block's incoming hidden state a fresh leaf that needs grad: backward starts its graph here."""
    return with_hidden(args, kwargs, hidden_of(args, kwargs).detach().requires_grad_())


def cut_input_hook(module, args):
    """Make a layer's input a fresh leaf that needs grad: backward from the loss stops there."""
    return (args[0].detach().requires_grad_(),) + tuple(args[1:])


def detach_hook(module, args, kwargs):
    """Detach the block's incoming hidden state (made to need grad by transformers when checkpointing is on): the
    blocks below a top group's lowest block then build no graph and keep no activations."""
    return with_hidden(args, kwargs, hidden_of(args, kwargs).detach())


def _stop_hook(module, args, kwargs):
    raise _Reached(args, kwargs)


def block_inputs(model: nn.Module, block: nn.Module, batch: dict) -> tuple[tuple, dict]:
    """The positional and keyword inputs `block` gets for `batch`: a no-grad forward that stops there."""
    handle = block.register_forward_pre_hook(_stop_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    except _Reached as reached:
        return reached.args, reached.kwargs
    finally:
        handle.remove()
    raise RuntimeError("the forward pass never called the block to start from")


def run_blocks(blocks: list[nn.Module], hidden: torch.Tensor, inputs: list[tuple[tuple, dict]]) -> torch.Tensor:
    """Run consecutive blocks from the hidden state entering the first, made a leaf that needs grad, each block with its
    own other inputs (args, kwargs); the last output."""
    hidden = hidden.detach().requires_grad_()
    for block, (args, kwargs) in zip(blocks, inputs, strict=True):
        args, kwargs = with_hidden(args, kwargs, hidden)
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def moved(value, device, copies: Optional[dict] = None, transfers: Optional[HostTransfers] = None):
    """Tensors (also inside tuples, lists and dicts, or futures of them) detached and moved to device. From CUDA to
    the CPU: through transfers into pageable memory (a future), else into page-locked memory by a copy that the CUDA
    stream orders with the kernels around it, so the CPU goes on launching.
    copies: id(tensor) -> (tensor, moved), so that a tensor met again is moved once (the tensor is held, so its id
    is not reused)."""
    if isinstance(value, Future):
        value = value.result()
    if isinstance(value, torch.Tensor):
        if copies is not None and id(value) in copies:
            return copies[id(value)][1]
        out = value.detach()
        if out.is_cuda and torch.device(device).type == "cpu":
            out = (transfers.to_host(out) if transfers is not None else
                   torch.empty_like(out, device="cpu", pin_memory=True).copy_(out, non_blocking=True))
        else:
            out = out.to(device, non_blocking=True)
        if copies is not None:
            copies[id(value)] = (value, out)
        return out
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device, copies, transfers) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device, copies, transfers) for k, v in value.items()}
    return value


def identical(a, b) -> bool:
    """Whether two values (tensors, also inside tuples, lists and dicts) are the same: structure, shapes, dtypes and
    bits."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and bool(a == b))


class KeptInputs:
    """What the top group's forward keeps on the CPU (pageable) for the lower groups, for each batch: every block's
    other inputs (a tensor that blocks share is kept once), and the hidden state entering each of the start blocks
    `starts` (plan_cache). On CUDA the copies go through `transfers` (kept as futures until used), and a lower group
    stages the next batch's start input while the GPU works on this one's."""

    def __init__(self, batches: int, blocks: int, starts: list[int], transfers: Optional[HostTransfers] = None):
        self.others: list[list] = [[None] * blocks for _ in range(batches)]  # (args, kwargs), hidden state None
        self.hidden: dict[int, list] = {start: [None] * batches for start in starts}
        self.copies: dict[int, dict] = {}  # the current batch's tensors already on the CPU (and held on the GPU)
        self.transfers = transfers
        self.staged: dict[tuple[int, int], Future] = {}  # (kept start, batch) -> staged for the device

    def keep(self, block: int, batch: int, args: tuple, kwargs: dict) -> None:
        if batch not in self.copies:  # a new batch: let the last one's GPU tensors go
            self.copies = {batch: {}}
        self.others[batch][block] = moved(with_hidden(args, kwargs, None), "cpu", self.copies[batch], self.transfers)
        if block in self.hidden:
            self.hidden[block][batch] = moved(hidden_of(args, kwargs), "cpu", transfers=self.transfers)

    def inputs(self, batch: int, start: int, stop: int, device, copies: dict) -> list[tuple[tuple, dict]]:
        """The other inputs of blocks start .. stop - 1 for this batch, on device; copies: what is there already."""
        return [moved(self.others[batch][j], device, copies) for j in range(start, stop)]

    def source(self, start: int) -> Optional[int]:
        """The kept start that block `start`'s input is run from: itself, the nearest below, or None (embeddings)."""
        return max((c for c in self.hidden if c <= start), default=None)

    def prefetch(self, start: int, batch: int) -> None:
        """Begin moving what start_hidden(start, batch) will need to the device's side of the ring (CUDA only)."""
        source = self.source(start)
        if self.transfers is not None and source is not None and batch < len(self.others):
            key = (source, batch)
            if key not in self.staged:
                self.staged[key] = self.transfers.stage(self.hidden[source][batch])

    def kept_hidden(self, source: int, batch: int, device) -> torch.Tensor:
        staged = self.staged.pop((source, batch), None)
        if staged is not None:
            return self.transfers.to_device(staged)
        return moved(self.hidden[source][batch], device)

    def start_hidden(self, model: nn.Module, blocks: list[nn.Module], start: int, batch_index: int, batch: dict,
                     device, copies: dict) -> torch.Tensor:
        """The hidden state entering block `start`: kept, or a no-grad run of the blocks from the nearest kept start
        below it, or a no-grad forward of the model that stops there. copies: as for inputs."""
        source = self.source(start)
        if source is None:
            return hidden_of(*block_inputs(model, blocks[start], batch))
        hidden = self.kept_hidden(source, batch_index, device)
        if source == start:
            return hidden
        with torch.no_grad():
            return run_blocks(blocks[source:start], hidden, self.inputs(batch_index, source, start, device, copies))

    def drop(self, start: int) -> None:
        """The groups still to come start below `start`: its kept inputs go."""
        self.hidden.pop(start, None)
        self.copies.clear()
