"""The full fine-tuning gradient of every target layer, streamed a group of layers at a time, and its top-2r SVD.

For a linear layer y = x W^T with W of shape (m = out, n = in), over the N tokens of a batch with inputs
X (N x n) and output gradients dY (N x m):   dL/dW = dY^T X   (m x n).
W itself is not needed, so a 4-bit base works: G is the gradient at the quantized model.

During the estimate each target is wrapped in a GradientTap: while the layer's group is being estimated, the tap's
backward adds dY^T X into the layer's fp32 accumulator (accumulate_outer: on CUDA one cuBLAS GEMM of the 16-bit inputs
into the fp32 accumulator, a custom op that torch.compile keeps in the compiled backward). Only the current group's
layers hold accumulators.

Groups are walked from the top of the network down, each over all batches, and each pays only for its own blocks
(decoder layers) in backward:
  top group   the whole forward to the loss; backward stops at the input of its lowest block (or of its lowest
              layer, for a group of layers outside the blocks such as lm_head).
  lower group a no-grad forward stopped at its lowest block captures that block's inputs; its blocks are then run
              with grad, and backward starts from the gradient at the input of the block above them, which the group
              above recorded (kept on the CPU: batches x tokens x hidden values).
  parts       a block that does not fit the budget whole is cut into parts, consecutive groups that each tap only
              their own layers but run the whole block, forward with grad and backward, from the same upstream
              gradient: the loss for the top block (each part runs the forward to the loss), else the one recorded
              above the block, kept until its last part, which records the gradient at the block's input for the
              group below. A layer's dY does not depend on which layers are tapped: the gradients are those of
              whole blocks.
The top group's forward also keeps the lower groups' start inputs on the CPU (all of them, or as many as a host
budget holds, spread evenly), so those groups skip their no-grad forward, and the groups between run only the blocks
from the nearest kept start below theirs. The estimate then costs one forward of the network plus one
forward and backward of each block, or of each part (and a no-grad forward per group whose start did not fit),
against a forward and backward of the network per group when every group backpropagates from the loss.
Groups hold whole blocks while a block fits the budget (a part costs one more forward and backward of its block),
and a backward only spans its own group's blocks, so the estimate needs no gradient checkpointing: the budget covers
each group's accumulators (4 m n bytes a layer) and the activations of the blocks it runs with grad (about
tokens x (m + n) values a layer of them, all the block's layers for a part), and no block is recomputed in backward.
On CUDA the blocks are compiled for the estimate: a block is tapped whole, in the same few parts, or not at all, so
it compiles to few graphs.
After a group's batches, each G = (sum of dY^T X) / batches is reduced to its top-2r singular triplets (svd.py, the
group's layers at once) and freed.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .blocks import attention_for, block_layout, compiled, no_checkpointing, without_cudnn_attention
from .config import ConfigError
from .lora import FrozenLinear, replace
from .loss import causal_lm_loss
from .memory import activation_bytes, available_ram_bytes, gradient_bytes
from .progress import Phase, ProgressFn
from .svd import LayerSVD, top_singular
from .transfers import HostTransfers


@dataclass
class GradientState:
    """The fp32 gradient accumulators alive at one time, with their bytes accounted against the budget."""
    budget_bytes: int
    accumulators: dict[str, torch.Tensor] = field(default_factory=dict)
    live_bytes: int = 0
    peak_bytes: int = 0

    def allocate(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        self.accumulators[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.live_bytes += 4 * shape[0] * shape[1]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return self.accumulators[name]

    def release(self, name: str) -> torch.Tensor:
        accumulator = self.accumulators.pop(name)
        self.live_bytes -= 4 * accumulator.numel()
        return accumulator


@dataclass
class EstimationStats:
    groups: list[list[str]]
    budget_bytes: int
    peak_state_bytes: int
    batches: int
    seconds: float


@torch.library.custom_op("frugal_loraga::accumulate_outer", mutates_args=("acc",))
def accumulate_outer(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc (m x n, fp32) += dy^T x for dy (..., m), x (..., n), in place.
    16-bit inputs on CUDA: one cuBLAS GEMM that adds its fp32 result into acc (beta = 1), with no fp32 copies of the
    inputs and no m x n temporary; it beat a Triton kernel for the same product and the fp32 casts
    (bench/bench_kernels.py, bench/RESULTS.md). Elsewhere: addmm_ in fp32. A custom op that mutates acc, so that torch.compile keeps the update inside a compiled backward."""
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if acc.is_cuda and dy.dtype in (torch.bfloat16, torch.float16) and x.dtype == dy.dtype:
        torch.addmm(acc, dy.T, x, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dy.T.float(), x.float())


@accumulate_outer.register_fake
def _(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    return None


class _AddWeightGradient(torch.autograd.Function):
    """y unchanged in forward; in backward, dL/dW = dY^T X (m x n) added into the accumulator, dY passed on."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, accumulator: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, accumulator)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, accumulator = ctx.saved_tensors
        accumulate_outer(accumulator, dy, x)
        return dy, None, None


class GradientTap(FrozenLinear):
    """A target during the estimate: y = base(x); while `accumulator` (fp32, m x n) is set, each backward adds
    dY^T X into it. A buffer, so that a compiled block takes it as an input rather than compiling once per layer."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.register_buffer("accumulator", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.accumulator is None else _AddWeightGradient.apply(y, x, self.accumulator)


def plan_groups(order: list[str], gradients: dict[str, int], activations: dict[str, int],
                index: dict[str, Optional[int]], budget_bytes: int) -> list[list[str]]:
    """Layers in reverse execution order, cut into consecutive groups that fit the budget. A group holds its layers'
    fp32 gradients and the activations of the layers it runs with grad (bytes, per layer). Groups hold whole blocks
    (a block's layers tapped all together or not at all) while a block fits: each group over a block costs one more
    forward and backward of it. A block that does not fit alone is cut into parts, groups of their own that each run
    the whole block, so each holds its own layers' gradients and all the block's activations."""
    groups: list[list[str]] = []
    whole: list[tuple[list[str], int]] = []  # the units met since the last one cut into parts, with their bytes
    for unit in _units(order, index):
        size = sum(gradients[n] + activations[n] for n in unit)
        if size <= budget_bytes:
            whole.append((unit, size))
        else:
            groups += _pack(whole, budget_bytes) + _parts(unit, gradients, activations, index, budget_bytes)
            whole = []
    return groups + _pack(whole, budget_bytes)


def _units(order: list[str], index: dict[str, Optional[int]]) -> list[list[str]]:
    """Layers in reverse execution order as units: a block's layers, or one layer outside the blocks."""
    units: list[list[str]] = []
    for name in reversed(order):
        if units and index[name] is not None and index[name] == index[units[-1][0]]:
            units[-1].append(name)
        else:
            units.append([name])
    return units


def _pack(pieces: list[tuple[list[str], int]], budget_bytes: int) -> list[list[str]]:
    """Consecutive pieces (layers, bytes) into groups of at most budget_bytes, each filled before the next begins."""
    groups: list[list[str]] = []
    used = budget_bytes
    for layers, size in pieces:
        if used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1] += layers
        used += size
    return groups


def _parts(unit: list[str], gradients: dict[str, int], activations: dict[str, int], index: dict[str, Optional[int]],
           budget_bytes: int) -> list[list[str]]:
    """A unit that does not fit the budget whole, cut into parts whose gradients fit beside the activations of the
    whole unit (each part runs its whole block with grad); refused, naming the largest layer, if that does not fit."""
    unit_activations = sum(activations[n] for n in unit)
    largest = max(unit, key=gradients.__getitem__)
    if gradients[largest] + unit_activations > budget_bytes:
        raise _budget_error(largest, index[largest], gradients[largest] + unit_activations, budget_bytes)
    return _pack([([name], gradients[name]) for name in unit], budget_bytes - unit_activations)


def _budget_error(name: str, block: Optional[int], size: int, budget_bytes: int) -> ConfigError:
    held = (f"{name} ({size / 2**30:.3g} GiB of fp32 gradient and activations)" if block is None else
            f"decoder layer {block} with only {name} tapped ({size / 2**30:.3g} GiB: that layer's fp32 gradient and "
            "the activations of the whole decoder layer, which it runs)")
    return ConfigError(f"grad_budget_gib={budget_bytes / 2**30:.3g} is smaller than what the estimate holds for "
                       f"{held}; raise grad_budget_gib or lower estimation_batch_size")


def execution_order(model: nn.Module, targets: dict[str, nn.Module], batch: dict) -> list[str]:
    """Target names in the order a forward pass calls them (one short no-grad forward, 8 tokens wide, which cuDNN's
    attention would plan kernels for and never meet again)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n) if n not in order else None)
               for n, m in targets.items()]
    try:
        with torch.no_grad(), without_cudnn_attention():
            model(input_ids=batch["input_ids"][:1, :8])
    finally:
        for h in handles:
            h.remove()
    return order


@dataclass
class Segment:
    """How one group's backward is bounded: from the input of block `start` (None: the embeddings' output) up to
    the loss (stop None) or up to the input of block `stop`, whose gradient a group above recorded. records: the
    gradient at the input of block `start` is recorded, for the group below, which runs up to that block."""
    names: list[str]
    start: Optional[int]
    stop: Optional[int]
    records: bool = False


def plan_segments(groups: list[list[str]], index: dict[str, Optional[int]]) -> list[Segment]:
    """Top-down groups -> segments. A group that starts at the block the group above starts at (a part of a block cut
    into parts) runs the same blocks, from the same upstream gradient (the loss, or the one recorded above them).
    Otherwise a group runs to the loss if it is the top one, or it or the group above holds a layer outside the
    blocks, and else runs its blocks up to the block the group above starts at: that group, the last over its
    blocks, records the gradient there."""
    segments: list[Segment] = []
    for group in groups:
        start = index[group[-1]]
        above = segments[-1] if segments else None
        if above is not None and start is not None and above.start == start:
            stop = above.stop
        elif above is None or above.start is None or any(index[n] is None for n in group):
            stop = None
        else:
            stop = above.start
            above.records = True
        segments.append(Segment(group, start, stop))
    return segments


class _Reached(Exception):
    """Ends a forward pass at a block, carrying the block's inputs."""
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _cut_hook(module, args, kwargs):
    """Make the block's incoming hidden state a fresh leaf that needs grad: backward starts its graph here."""
    return _with_hidden(args, kwargs, _hidden(args, kwargs).detach().requires_grad_())


def _cut_input_hook(module, args):
    """Make a layer's input a fresh leaf that needs grad: backward from the loss stops there."""
    return (args[0].detach().requires_grad_(),) + tuple(args[1:])


def _detach_hook(module, args, kwargs):
    """Detach the block's incoming hidden state (made to need grad by transformers when checkpointing is on): the
    blocks below a top group's lowest block then build no graph and keep no activations."""
    return _with_hidden(args, kwargs, _hidden(args, kwargs).detach())


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


def plan_cache(segments: list[Segment], input_bytes: int, host_budget_bytes: int) -> list[int]:
    """The lower groups' start blocks whose inputs (input_bytes each, all batches) the top group's forward keeps on the
    CPU: all of them if the host budget holds them, else as many as it holds, spread evenly over the starts, since a
    group whose start is not kept runs the blocks from the nearest kept start below it, or from the embeddings, which
    give block 0's input for almost nothing (so it is never kept)."""
    starts = sorted({s.start for s in segments[1:] if s.stop is not None} - {0})
    room = host_budget_bytes // max(input_bytes, 1)
    if room >= len(starts):
        return starts
    return [starts[round(j * (len(starts) + 1) / (room + 1)) - 1] for j in range(1, room + 1)]


class KeptInputs:
    """What the top group's forward keeps on the CPU (pageable) for the lower groups, for each batch: every block's
    inputs besides the hidden state (attention mask, rotary embeddings, positions; they may differ between blocks, as
    Gemma's sliding-window and global layers' do; a tensor that blocks share is kept once), and the hidden state
    entering each of the start blocks `starts` (plan_cache). On CUDA the copies go through `transfers` (kept as futures
    until used), and a lower group stages the next batch's start input while the GPU works on this one's."""

    def __init__(self, batches: int, blocks: int, starts: list[int], transfers: Optional[HostTransfers] = None):
        self.others: list[list] = [[None] * blocks for _ in range(batches)]  # (args, kwargs), hidden state None
        self.hidden: dict[int, list] = {start: [None] * batches for start in starts}
        self.copies: dict[int, dict] = {}  # the current batch's tensors already on the CPU (and held on the GPU)
        self.transfers = transfers
        self.staged: dict[tuple[int, int], Future] = {}  # (kept start, batch) -> staged for the device

    def keep(self, block: int, batch: int, args: tuple, kwargs: dict) -> None:
        if batch not in self.copies:  # a new batch: let the last one's GPU tensors go
            self.copies = {batch: {}}
        self.others[batch][block] = _to(_with_hidden(args, kwargs, None), "cpu", self.copies[batch], self.transfers)
        if block in self.hidden:
            self.hidden[block][batch] = _to(_hidden(args, kwargs), "cpu", transfers=self.transfers)

    def inputs(self, batch: int, start: int, stop: int, device, copies: dict) -> list[tuple[tuple, dict]]:
        """The other inputs of blocks start .. stop - 1 for this batch, on device; copies: what is there already."""
        return [_to(self.others[batch][j], device, copies) for j in range(start, stop)]

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
        return _to(self.hidden[source][batch], device)

    def start_hidden(self, model: nn.Module, blocks: list[nn.Module], start: int, batch_index: int, batch: dict,
                     device, copies: dict) -> torch.Tensor:
        """The hidden state entering block `start`: kept, or a no-grad run of the blocks from the nearest kept start
        below it, or a no-grad forward of the model that stops there. copies: as for inputs."""
        source = self.source(start)
        if source is None:
            return _hidden(*block_inputs(model, blocks[start], batch))
        hidden = self.kept_hidden(source, batch_index, device)
        if source == start:
            return hidden
        with torch.no_grad():
            return run_blocks(blocks[source:start], hidden, self.inputs(batch_index, source, start, device, copies))

    def drop(self, start: int) -> None:
        """The groups still to come start below `start`: its kept inputs go."""
        self.hidden.pop(start, None)
        self.copies.clear()


def _to(value, device, copies: Optional[dict] = None, transfers: Optional[HostTransfers] = None):
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
        moved = value.detach()
        if moved.is_cuda and torch.device(device).type == "cpu":
            moved = (transfers.to_host(moved) if transfers is not None else
                     torch.empty_like(moved, device="cpu", pin_memory=True).copy_(moved, non_blocking=True))
        else:
            moved = moved.to(device, non_blocking=True)
        if copies is not None:
            copies[id(value)] = (value, moved)
        return moved
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, copies, transfers) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, copies, transfers) for k, v in value.items()}
    return value


def run_blocks(blocks: list[nn.Module], hidden: torch.Tensor, inputs: list[tuple[tuple, dict]]) -> torch.Tensor:
    """Run consecutive blocks from the hidden state entering the first, made a leaf that needs grad, each block with its
    own other inputs (args, kwargs); the last output."""
    hidden = hidden.detach().requires_grad_()
    for block, (args, kwargs) in zip(blocks, inputs, strict=True):
        args, kwargs = _with_hidden(args, kwargs, hidden)
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _record_grad(hidden: torch.Tensor, recorded: list, batch_index: int) -> None:
    """Keep dL/d(hidden) of this batch on the CPU when backward reaches it."""
    if hidden.requires_grad:
        hidden.register_hook(lambda grad: recorded.__setitem__(batch_index, _to(grad, "cpu")))


@contextlib.contextmanager
def estimating(model: nn.Module, targets: dict[str, nn.Module], taps: dict[str, GradientTap],
               blocks: list[nn.Module], compile: bool, any_width: bool):
    """The model as the estimate runs it while inside: taps in place of the targets, the blocks compiled (when
    asked) and without gradient checkpointing, train mode. On exit, whatever raises (a progress callback too), the
    model is as it was."""
    was_training = model.training
    replace(model, taps)
    try:
        model.train()
        with compiled(blocks, compile, any_width), no_checkpointing(blocks):
            yield
    finally:
        replace(model, targets)
        model.train(was_training)


def estimate_gradient_svd(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], k: int,
                          budget_bytes: int, svd: str = "lowrank", progress: Optional[ProgressFn] = None,
                          host_budget_bytes: Optional[int] = None,
                          compile: bool = False) -> tuple[dict[str, LayerSVD], EstimationStats]:
    """Top-k SVD of the mean gradient dL/dW over `batches` for every target, never holding more than
    `budget_bytes` of fp32 gradients and their blocks' activations on the device, nor more than `host_budget_bytes`
    (default: a quarter of the available RAM) of cached block inputs on the CPU. compile: torch.compile the blocks
    for the estimate. The model is left as it was found. Returns the factors (on the model's device) and the costs."""
    start = time.perf_counter()
    device = batches[0]["input_ids"].device
    order = execution_order(model, targets, batches[0])
    shapes = {n: (targets[n].out_features, targets[n].in_features) for n in order}
    blocks, index = block_layout(model, order)
    embedding = model.get_input_embeddings().weight
    tokens = max(b["input_ids"].numel() for b in batches)
    groups = plan_groups(order, gradient_bytes(shapes), activation_bytes(shapes, tokens, embedding.element_size()),
                         index, budget_bytes)
    segments = plan_segments(groups, index)
    if host_budget_bytes is None:
        host_budget_bytes = available_ram_bytes() // 4
    input_bytes = sum(b["input_ids"].numel() for b in batches) * embedding.shape[1] * embedding.element_size()
    transfers = HostTransfers(device, tokens * embedding.shape[1] * embedding.element_size()) if (
        device.type == "cuda" and len(segments) > 1) else None
    kept = KeptInputs(len(batches), len(blocks), plan_cache(segments, input_bytes, host_budget_bytes), transfers)
    state = GradientState(budget_bytes)
    results: dict[str, LayerSVD] = {}
    taps = {name: GradientTap(targets[name]) for name in order}
    widths = {b["input_ids"].shape[1] for b in batches}
    done, total = 0, len(groups) * len(batches)
    last_in_blocks = max((p for p, name in enumerate(order) if index[name] is not None), default=-1)
    upstream: list[torch.Tensor] = []  # per batch: dL/d(input of block segment.stop) on the CPU, for all its groups
    try:
        with estimating(model, targets, taps, blocks, compile, len(widths) > 1), attention_for(widths):
            if progress:
                progress(Phase.COMPILING if compile else Phase.ESTIMATING, done, total, {})
            for i, segment in enumerate(segments):
                recorded: list[Optional[torch.Tensor]] = [None] * len(batches)
                hooks = []
                if segment.stop is None:  # backward from the loss down to the group's lowest block, or layer
                    hooks.append(blocks[segment.start].register_forward_pre_hook(_cut_hook, with_kwargs=True)
                                 if segment.start is not None else
                                 taps[segment.names[-1]].register_forward_pre_hook(_cut_input_hook))
                    if segment.start or (segment.start is None and order.index(segment.names[-1]) > last_in_blocks):
                        hooks.append(blocks[0].register_forward_pre_hook(_detach_hook, with_kwargs=True))
                if segment.records:
                    hooks.append(blocks[segment.start].register_forward_pre_hook(
                        lambda m, args, kwargs: _record_grad(_hidden(args, kwargs), recorded, batch_index),
                        with_kwargs=True))
                if i == 0 and len(segments) > 1:  # the top group's forward runs every block: keep what the lower
                    hooks += [blocks[j].register_forward_pre_hook(  # groups need of those below its own
                        lambda m, args, kwargs, j=j: kept.keep(j, batch_index, args, kwargs), with_kwargs=True)
                        for j in range(len(blocks) if segment.start is None else segment.start)]
                for name in segment.names:
                    taps[name].accumulator = state.allocate(name, shapes[name], device)
                try:
                    for batch_index, batch in enumerate(batches):
                        if segment.stop is None:
                            causal_lm_loss(model, batch).backward()
                        else:
                            copies: dict = {}  # the batch's other inputs move to the device once
                            kept.prefetch(segment.start, batch_index)
                            kept.prefetch(segment.start, batch_index + 1)
                            hidden = kept.start_hidden(model, blocks, segment.start, batch_index, batch, device,
                                                       copies)
                            run_blocks(blocks[segment.start:segment.stop], hidden,
                                       kept.inputs(batch_index, segment.start, segment.stop, device, copies)).backward(
                                _to(upstream[batch_index], device))
                        done += 1
                        if progress:
                            progress(Phase.ESTIMATING, done, total, {})
                finally:
                    for hook in hooks:
                        hook.remove()
                if segment.records:
                    upstream = recorded
                if i + 1 == len(segments) or segments[i + 1].start != segment.start:  # no part of this block to come
                    kept.drop(segment.start)
                for name in segment.names:
                    taps[name].accumulator = None
                mean_gradients = {name: state.release(name).div_(len(batches)) for name in segment.names}
                results.update(top_singular(mean_gradients, k, svd))
                del mean_gradients
    finally:
        if transfers is not None:
            transfers.close()
    stats = EstimationStats(groups, budget_bytes, state.peak_bytes, len(batches), time.perf_counter() - start)
    return results, stats
