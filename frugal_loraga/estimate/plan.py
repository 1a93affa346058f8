"""The estimate's plan: which layers each group holds, how far each group's backward runs, which inputs to keep.

Groups are walked from the top of the network down, each over all batches, and each pays only for its own blocks
(decoder layers) in backward:
  top group   the whole forward to the loss; backward stops at the input of its lowest block (or of its lowest
              layer, for a group of layers outside the blocks such as lm_head).
  lower group its blocks run with grad from the input of its lowest block, and backward starts from the gradient at
              the input of the block above them, which the group above recorded.
  parts       a block that does not fit the budget whole is cut into parts, consecutive groups that each tap only
              their own layers but run the whole block from the same upstream gradient (the loss for the top block,
              else the one recorded above the block); its last part records the gradient at the block's input.
              A layer's dY does not depend on which layers are tapped: the gradients are those of whole blocks.
Groups hold whole blocks while a block fits the budget (a part costs one more forward and backward of its block).
The budget covers each group's accumulators (4 m n bytes a layer) and the activations of the blocks it runs with grad
(about tokens x (m + n) values a layer of them, all the block's layers for a part): no block is recomputed in backward.
The top group's forward also keeps the lower groups' start inputs on the CPU (all of them, or as many as a host budget
holds, spread evenly: plan_cache), so the groups below skip re-running the network up to their blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..blocks import block_layout, without_cudnn_attention
from ..config import ConfigError
from ..experts import dequantized, routes
from ..lora import features
from ..memory import activation_bytes, gradient_bytes


@dataclass
class Segment:
    """How one group's backward is bounded: from the input of block `start` (None: the embeddings' output) up to
    the loss (stop None) or up to the input of block `stop`, whose gradient a group above recorded. records: the
    gradient at the input of block `start` is recorded, for the group below, which runs up to that block."""
    names: list[str]
    start: Optional[int]
    stop: Optional[int]
    records: bool = False


@dataclass
class Plan:
    """What the walk does, worked out before it starts."""
    order: list[str]  # the targets in the order a forward pass calls them
    shapes: dict[str, tuple[int, ...]]  # target -> (out, in), or (experts, out, in) for an expert stack
    blocks: list[nn.Module]  # the decoder layers
    index: dict[str, Optional[int]]  # target -> its block, None for a layer outside the blocks
    segments: list[Segment]  # the groups, top down
    kept_starts: list[int]  # the blocks whose inputs the top group's forward keeps (plan_cache)
    hidden_bytes: int  # one batch's hidden state (the widest batch's)

    @property
    def groups(self) -> list[list[str]]:
        return [segment.names for segment in self.segments]

    def detaches_below(self, segment: Segment) -> bool:
        """Whether a group that runs from the loss has blocks below its lowest block or layer, which then run
        without a graph: its lowest block is above block 0, or its lowest layer is above every block's layers."""
        if segment.start is not None:
            return segment.start > 0
        in_blocks = [p for p, name in enumerate(self.order) if self.index[name] is not None]
        return bool(in_blocks) and self.order.index(segment.names[-1]) > max(in_blocks)

    def blocks_kept_by(self, i: int) -> int:
        """How many of the lowest blocks have their inputs kept by group i's forward: those below the top group's
        lowest block (all blocks if it holds only layers outside them), when there are groups below it; else none."""
        if i > 0 or len(self.segments) == 1:
            return 0
        start = self.segments[0].start
        return len(self.blocks) if start is None else start

    def last_over_start(self, i: int) -> bool:
        """Whether group i is the last to start at its block (no part of that block comes after it)."""
        return i + 1 == len(self.segments) or self.segments[i + 1].start != self.segments[i].start


def make_plan(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], budget_bytes: int,
              host_budget_bytes: int) -> Plan:
    """The plan of an estimate of `targets` over `batches` holding at most budget_bytes on the device and
    host_budget_bytes of kept block inputs on the CPU."""
    order = execution_order(model, targets, batches[0])
    shapes = {n: features(targets[n]) for n in order}
    blocks, index = block_layout(model, order)
    embedding = model.get_input_embeddings().weight
    tokens = max(b["input_ids"].numel() for b in batches)
    groups = plan_groups(order, gradient_bytes(shapes),
                         activation_bytes(shapes, tokens, embedding.element_size(), routes(targets),
                                          dequantized(targets)), index,
                         budget_bytes)
    segments = plan_segments(groups, index)
    all_inputs_bytes = sum(b["input_ids"].numel() for b in batches) * embedding.shape[1] * embedding.element_size()
    return Plan(order, shapes, blocks, index, segments, plan_cache(segments, all_inputs_bytes, host_budget_bytes),
                tokens * embedding.shape[1] * embedding.element_size())


def execution_order(model: nn.Module, targets: dict[str, nn.Module], batch: dict) -> list[str]:
    """Target names in the order a forward pass calls them (one short no-grad forward, 8 tokens wide, which cuDNN's
    attention would plan kernels for and never meet again)."""
    order: list[str] = []
    handles = [getattr(m, "owner", m).register_forward_hook(lambda *_, n=n: order.append(n) if n not in order else None)
               for n, m in targets.items()]  # an expert stack's: on its experts module (in parameter order)
    try:
        with torch.no_grad(), without_cudnn_attention():
            model(input_ids=batch["input_ids"][:1, :8])
    finally:
        for h in handles:
            h.remove()
    return order


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
