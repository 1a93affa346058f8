"""The decoder layers (blocks): finding the ones that hold the targets, compiling them, and switching off their
gradient checkpointing for a while."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def block_layout(model: nn.Module, names: list[str]) -> tuple[list[nn.Module], dict[str, Optional[int]]]:
    """The outermost ModuleList holding targets (the decoder layers) and each target's index in it (None outside)."""
    for prefix, module_list in model.named_modules():
        if isinstance(module_list, nn.ModuleList):
            index = {n: next((i for i in range(len(module_list)) if n.startswith(f"{prefix}.{i}.")), None)
                     for n in names}
            if any(i is not None for i in index.values()):
                return list(module_list), index
    return [], dict.fromkeys(names)


def compile_blocks(blocks: list[nn.Module]) -> None:
    """torch.compile each block's forward in place: names and state dict unchanged, and hooks on the block itself stay
    eager. The blocks share compiled graphs, which fuse norms, RoPE, SwiGLU and NF4 dequantization and launch a block's
    kernels from generated code instead of op by op from Python, the bottleneck of a 4-bit step at a few thousand
    tokens. A block compiles once per kind of call (with or without grad, tapped or not), not once per block, for the
    first batch width it meets; a second width compiles each kind again, for any width. (Compiling for any width
    from the start, dynamic=True, made the first 7B estimate slower: 65 s against 48 s.)"""
    for block in blocks:
        block.forward = torch.compile(block.forward)


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


@contextlib.contextmanager
def no_checkpointing(blocks: list[nn.Module]):
    """Blocks keep their activations for backward for a while (transformers' per-layer gradient_checkpointing off)."""
    checkpointed = [block for block in blocks if block.__dict__.get("gradient_checkpointing")]
    for block in checkpointed:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in checkpointed:
            block.gradient_checkpointing = True
