"""estimate_gradient_svd: the planned groups walked from the top of the network down, each over all batches, then
reduced to the top-k SVD of its mean gradients.

For each group (plan.py): open it (accumulators on its taps), run each batch's backward (from the loss, or through
its blocks from the gradient recorded above them, with the hooks that bound the graph, record the gradient for the
group below and keep the lower groups' inputs), then close it: each G = (sum of dY^T X) / batches is reduced to its
top-k singular triplets (svd.py, the group's layers at once) and freed. The estimate costs one forward of the network
plus one forward and backward of each block, or of each part (and a no-grad run up to each group whose start input
was not kept), against a forward and backward of the network per group when every group backpropagates from the
loss. On CUDA the blocks are compiled for the estimate: a block is tapped whole, in the same few parts, or not at
all, so it compiles to few graphs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..blocks import attention_for, compiled, no_checkpointing
from ..distributed import from_rank0_, share, sum_over_ranks_
from ..lora import Correction, replace
from ..loss import causal_lm_loss
from ..memory import available_ram_bytes
from ..progress import Phase, ProgressFn
from ..svd import LayerSVD, top_singular
from ..transfers import HostTransfers
from .inputs import KeptInputs, cut_hook, cut_input_hook, detach_hook, hidden_of, moved, run_blocks
from .plan import Plan, Segment, make_plan
from .tap import GradientState, GradientTap, make_taps


@dataclass
class EstimationStats:
    groups: list[list[str]]
    budget_bytes: int
    peak_state_bytes: int
    batches: int
    seconds: float
    svd_seconds: float  # in close_group, the device synchronized around each group's SVDs


def estimate_gradient_svd(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], k: int,
                          budget_bytes: int, svd: str = "lowrank", progress: Optional[ProgressFn] = None,
                          host_budget_bytes: Optional[int] = None, compile: bool = False,
                          corrections: Optional[dict[str, Correction]] = None,
                          ) -> tuple[dict[str, LayerSVD], EstimationStats]:
    """Top-k SVD of the mean gradient dL/dW over `batches` for every target, never holding more than
    `budget_bytes` of fp32 gradients and their blocks' activations on the device, nor more than `host_budget_bytes`
    (default: a quarter of the available RAM) of cached block inputs on the CPU. compile: torch.compile the blocks
    for the estimate. corrections: name -> (L, R), frozen corrections in place while estimating (the gradient is then
    that of the corrected weights; nf4_error.py). The model is left as it was found. Returns the factors (on the model's device) and the costs.
    In a process group (distributed.py) every rank passes all the batches and walks its share of them; the groups,
    the mean gradients and the factors are those of all the batches, the same bits on every rank."""
    start = time.perf_counter()
    device = batches[0]["input_ids"].device
    host_budget_bytes = available_ram_bytes() // 4 if host_budget_bytes is None else host_budget_bytes
    plan = make_plan(model, targets, batches, budget_bytes, host_budget_bytes)  # from all batches: the same groups
    total_batches, batches = len(batches), share(batches)
    transfers = (HostTransfers(device, plan.hidden_bytes) if device.type == "cuda" and len(plan.segments) > 1
                 else None)
    kept = KeptInputs(len(batches), len(plan.blocks), plan.kept_starts, transfers)
    state = GradientState(budget_bytes)
    taps = make_taps({name: targets[name] for name in plan.order}, corrections or {})
    widths = {b["input_ids"].shape[1] for b in batches}
    results: dict[str, LayerSVD] = {}
    svd_seconds = 0.0
    done, total = 0, len(plan.segments) * len(batches)
    upstream: list[torch.Tensor] = []  # per batch: dL/d(input of block segment.stop) on the CPU, for all its groups
    try:
        with estimating(model, targets, taps, plan.blocks, compile, len(widths) > 1), attention_for(widths):
            if progress:
                progress(Phase.COMPILING if compile else Phase.ESTIMATING, done, total, {})
            for i, segment in enumerate(plan.segments):
                open_group(segment, taps, state, plan.shapes, device)
                recorded: list[Optional[torch.Tensor]] = [None] * len(batches)
                for batch_index, batch in enumerate(batches):
                    with group_hooks(plan, i, taps, kept, recorded, batch_index):
                        backward(model, plan, segment, kept, batch_index, batch, upstream, device)
                    done += 1
                    if progress:
                        progress(Phase.ESTIMATING, done, total, {})
                if segment.records:
                    upstream = recorded
                if plan.last_over_start(i):
                    kept.drop(segment.start)
                svd_start = _synchronized(device)
                results.update(close_group(segment, taps, state, total_batches, k, svd))
                svd_seconds += _synchronized(device) - svd_start
    finally:
        if transfers is not None:
            transfers.close()
    stats = EstimationStats(plan.groups, budget_bytes, state.peak_bytes, total_batches, time.perf_counter() - start,
                            svd_seconds)
    return results, stats


def _synchronized(device: torch.device) -> float:
    """The time once the device has done what was queued (once a group: the estimate waits on it then anyway)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def estimating(model: nn.Module, targets: dict[str, nn.Module], taps: dict[str, GradientTap],
               blocks: list[nn.Module], compile: bool, any_width: bool):
    """The model as the estimate runs it while inside: taps in place of the targets, the blocks compiled (when
    asked) and without gradient checkpointing, in eval mode: the gradient of the model as it is, without dropout
    (which would keep about 0.6 of it at OPT's and GPT-2's 0.1) or a router's training noise. On exit, whatever
    raises (a progress callback too), the model is as it was."""
    was_training, used_cache = model.training, model.config.use_cache
    replace(model, taps)
    try:
        model.eval()
        model.config.use_cache = False  # no KV cache: a kept one would be shared by the groups below
        with compiled(blocks, compile, any_width), no_checkpointing(blocks):
            yield
    finally:
        replace(model, targets)
        model.train(was_training)
        model.config.use_cache = used_cache


def open_group(segment: Segment, taps: dict[str, GradientTap], state: GradientState,
               shapes: dict[str, tuple[int, int]], device: torch.device) -> None:
    """Give the group's taps their zeroed fp32 accumulators (out x in)."""
    for name in segment.names:
        taps[name].accumulator = state.allocate(name, shapes[name], device)


@contextlib.contextmanager
def group_hooks(plan: Plan, i: int, taps: dict[str, GradientTap], kept: KeptInputs, recorded: list,
                batch_index: int):
    """While inside, the forward of group i on batch `batch_index` builds only the graph the group's backward needs
    (cut at its lowest block or layer, nothing below it), records the gradient at its start block's input for the
    group below (into recorded), and, for the top group, keeps the lower blocks' inputs (kept)."""
    segment, blocks = plan.segments[i], plan.blocks
    handles = []
    if segment.stop is None:  # backward from the loss down to the group's lowest block, or layer
        handles.append(blocks[segment.start].register_forward_pre_hook(cut_hook, with_kwargs=True)
                       if segment.start is not None else
                       taps[segment.names[-1]].register_forward_pre_hook(cut_input_hook))
        if plan.detaches_below(segment):
            handles.append(blocks[0].register_forward_pre_hook(detach_hook, with_kwargs=True))
    if segment.records:
        handles.append(blocks[segment.start].register_forward_pre_hook(
            lambda m, args, kwargs: record_grad(hidden_of(args, kwargs), recorded, batch_index), with_kwargs=True))
    handles += [blocks[j].register_forward_pre_hook(
        lambda m, args, kwargs, j=j: kept.keep(j, batch_index, args, kwargs), with_kwargs=True)
        for j in range(plan.blocks_kept_by(i))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_grad(hidden: torch.Tensor, recorded: list, batch_index: int) -> None:
    """Keep dL/d(hidden) of this batch on the CPU when backward reaches it."""
    if hidden.requires_grad:
        hidden.register_hook(lambda grad: recorded.__setitem__(batch_index, moved(grad, "cpu")))


def backward(model: nn.Module, plan: Plan, segment: Segment, kept: KeptInputs, batch_index: int, batch: dict,
             upstream: list[torch.Tensor], device: torch.device) -> None:
    """One batch through the group: the forward to the loss and backward, or its blocks from their kept (or re-run)
    input and backward from the gradient the group above recorded at their top."""
    if segment.stop is None:
        causal_lm_loss(model, batch).backward()
        return
    copies: dict = {}  # the batch's other inputs move to the device once
    kept.prefetch(segment.start, batch_index)
    kept.prefetch(segment.start, batch_index + 1)
    hidden = kept.start_hidden(model, plan.blocks, segment.start, batch_index, batch, device, copies)
    top = run_blocks(plan.blocks[segment.start:segment.stop], hidden,
                     kept.inputs(batch_index, segment.start, segment.stop, device, copies))
    top.backward(moved(upstream[batch_index], device))


def close_group(segment: Segment, taps: dict[str, GradientTap], state: GradientState, batches: int, k: int,
                svd: str) -> dict[str, LayerSVD]:
    """Take the accumulators back from the group's taps: the mean gradients G = (sum of dY^T X) / batches (summed
    over the ranks first), reduced to their top-k singular triplets, rank 0's on every rank; the accumulators are
    freed on return."""
    for name in segment.names:
        taps[name].accumulator = None
    mean_gradients = {name: sum_over_ranks_(state.release(name)).div_(batches) for name in segment.names}
    svds = top_singular(mean_gradients, k, svd)
    from_rank0_([t for layer in svds.values() for t in (layer.U, layer.S, layer.V)])
    return svds
