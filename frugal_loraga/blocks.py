"""The decoder layers (blocks): finding the ones that hold the targets, compiling them, the attention kernels they may
use, switching off their gradient checkpointing for a while, and whether their 4-bit layers dequantize again in
backward."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lora import FrozenLinear
from .models import cache_dir


def block_layout(model: nn.Module, names: list[str]) -> tuple[list[nn.Module], dict[str, Optional[int]]]:
    """The outermost ModuleList holding targets (the decoder layers) and each target's index in it (None outside)."""
    for prefix, module_list in model.named_modules():
        if isinstance(module_list, nn.ModuleList):
            index = {n: next((i for i in range(len(module_list)) if n.startswith(f"{prefix}.{i}.")), None)
                     for n in names}
            if any(i is not None for i in index.values()):
                return list(module_list), index
    return [], dict.fromkeys(names)


KINDS_PER_PROCESS = 64  # compiled graphs of one block forward's code that a process may hold (torch's default: 8)


def compile_blocks(blocks: list[nn.Module], any_width: bool = False) -> None:
    """torch.compile each block's forward in place: names and state dict unchanged, and hooks on the block itself stay
    eager. The blocks share compiled graphs, which fuse norms, RoPE, SwiGLU and NF4 dequantization and launch a block's
    kernels from generated code instead of op by op from Python, the bottleneck of a 4-bit step at a few thousand
    tokens. A block compiles once per kind of call (with or without grad, tapped or not), not once per block.
    any_width: the graphs take any batch width (sequence length) from the first call, for batches of many widths
    (examples of many lengths), which would otherwise compile each kind twice: for the first width met, then for any.
    Without it they are compiled for the one width of the batches (examples that all reach max_length). (Compiling
    every dimension for any size, dynamic=True, made a first estimate slower: bench/RESULTS.md.)
    Compiled graphs are cached on disk for the next process, in torch's cache folder (TORCHINDUCTOR_CACHE_DIR; the
    CLI and the app point it at ours: keep_compiled_graphs), the traced autograd of our taps and adapters
    (autograd.Functions) included, which torch otherwise leaves out of its cache, so a later process compiles little.
    torch's recompile_limit is raised to KINDS_PER_PROCESS for the process (never lowered): the blocks of a model
    family share their forward's code, whose graphs torch keeps per process, a few for each run (estimate, training,
    with or without grad, each model shape), and past its default of 8 torch runs the blocks eagerly, at a fraction
    of the speed, with only a warning; the app trains run after run in one process."""
    torch._dynamo.config.recompile_limit = max(KINDS_PER_PROCESS, torch._dynamo.config.recompile_limit)
    for block in blocks:
        block.forward = _compiled_forward(torch.compile(block.forward), any_width)


def _compiled_forward(compiled, any_width: bool):
    """compiled, called with AOTAutograd's disk cache open to graphs holding autograd.Functions (their forward and
    backward are traced into the graph, so the cache key covers their code); any_width: with every dimension of the
    block's tensor inputs that has the hidden state's width (dimension 1) marked as of any size."""
    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        if any_width:
            width = (args[0] if args else kwargs["hidden_states"]).shape[1]
            for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor):
                    for dim, size in enumerate(tensor.shape):
                        if size == width:
                            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        with torch._functorch.config.patch(autograd_cache_allow_custom_autograd_functions=True):
            return compiled(*args, **kwargs)
    return forward


def attention_for(widths: set[int]):
    """The attention kernels that batches of these widths (sequence lengths) may use, in the estimate and in training:
    all, or for several widths all but cuDNN's. cuDNN's attention, which SDPA prefers on recent GPUs, plans its
    kernels anew for each sequence length it meets, forward and backward, where flash attention plans nothing; on
    examples of many lengths that planning dominated the training steps (bench/RESULTS.md). Steps at widths seen
    before take as long with either. torch's compile caches do not key on this choice, so it depends only
    on what decides the compiled graphs: one width or any."""
    return contextlib.nullcontext() if len(widths) <= 1 else without_cudnn_attention()


def without_cudnn_attention():
    """SDPA may use flash, memory-efficient or math attention, not cuDNN's: for batches of several widths, the
    estimate's short probe, and generation (each new token a new length, which cuDNN would plan for anew)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def keep_compiled_graphs() -> None:
    """For a program that owns its process (the CLI, the app), called before torch compiles anything: torch's compile
    cache in our cache folder, which outlives a reboot (torch's default is under /tmp), unless TORCHINDUCTOR_CACHE_DIR
    is set. The library itself leaves the environment alone: a Python caller sets the variable if it wants the same."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "compiled"))


def start_compile_workers() -> None:
    """Start torch inductor's pool of compile worker processes now, so that it comes up while the model loads. torch
    starts it at the first compile, and until its workers are up it compiles the kernels one by one in this process:
    starting the pool early shortens a fresh machine's first estimate (bench/RESULTS.md). A private torch function: a
    torch without it just starts the pool later."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:
        return
    maybe_warm_pool()


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


@contextlib.contextmanager
def compiled(blocks: list[nn.Module], enabled: bool, any_width: bool = False):
    """The blocks compiled (compile_blocks) while inside, when enabled; their own forwards back on exit."""
    if enabled:
        compile_blocks(blocks, any_width)
    try:
        yield
    finally:
        if enabled:
            uncompile_blocks(blocks)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' per-layer activation checkpointing, non-reentrant: activation_checkpointing_enable where
    transformers has it (gradient_checkpointing_enable, its old name, warns that it goes in v6), else the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def keeping_weights(blocks: list[nn.Module]):
    """Inside, the blocks' compiled 4-bit layers keep each weight they dequantize for backward, as checkpointed blocks
    should (there the copy lives only while the block's recompute and backward run), and as blocks that keep their
    activations may where the card has room for their copies from forward to backward (memory.keeping_plan):
    dequantizing once saves time. Elsewhere (by default) they dequantize it again in backward."""
    layers = [m for block in blocks for m in block.modules() if isinstance(m, FrozenLinear)]
    for layer in layers:
        layer.recompute_weight = False
    try:
        yield
    finally:
        for layer in layers:
            layer.recompute_weight = True


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
