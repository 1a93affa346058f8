"""The gradient tap: what a target layer becomes during the estimate.

For a linear layer y = x W^T with W of shape (m = out, n = in), over the N tokens of a batch with inputs
X (N x n) and output gradients dY (N x m):   dL/dW = dY^T X   (m x n).
W itself is not needed, so a 4-bit base works: G is the gradient at the quantized model.
While its layer's group is being estimated, a tap's backward adds dY^T X into the layer's fp32 accumulator
(accumulate_outer: on CUDA one cuBLAS GEMM of the 16-bit inputs into the fp32 accumulator, a custom op that
torch.compile keeps in the compiled backward). Only the current group's layers hold accumulators (GradientState).
An expert stack (experts.py, E x m x n) is tapped the same way per expert: dL/dW_e = dY_e^T X_e over the tokens routed
to expert e (ExpertsTap).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..experts import ExpertParameter, adapted
from ..lora import Correction, FrozenLinear


@dataclass
class GradientState:
    """The fp32 gradient accumulators alive at one time, with their bytes accounted against the budget."""
    budget_bytes: int
    accumulators: dict[str, torch.Tensor] = field(default_factory=dict)
    live_bytes: int = 0
    peak_bytes: int = 0

    def allocate(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        self.accumulators[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.live_bytes += 4 * self.accumulators[name].numel()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return self.accumulators[name]

    def release(self, name: str) -> torch.Tensor:
        accumulator = self.accumulators.pop(name)
        self.live_bytes -= 4 * accumulator.numel()
        return accumulator


@torch.library.custom_op("frugal_loraga::accumulate_outer", mutates_args=("acc",))
def accumulate_outer(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc (m x n, fp32) += dy^T x for dy (..., m), x (..., n), in place.
    16-bit inputs on CUDA: one cuBLAS GEMM that adds its fp32 result into acc (beta = 1), with no fp32 copies of the
    inputs and no m x n temporary; it beat a Triton kernel for the same product and the fp32 casts
    (bench/bench_kernels.py, bench/RESULTS.md). Elsewhere: addmm_ in fp32. A custom op that mutates acc, so that
    torch.compile keeps the update inside a compiled backward."""
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if acc.is_cuda and dy.dtype in (torch.bfloat16, torch.float16) and x.dtype == dy.dtype:
        torch.addmm(acc, dy.T, x, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dy.T.float(), x.float())


@accumulate_outer.register_fake
def _(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    return None


class _AddWeightGradient(torch.autograd.Function):
    """y unchanged in forward; in backward, dL/dW = dY^T X (m x n) added into the accumulator, dY passed on.
    y is returned itself, marked as changed in place (it is not: nothing else holds it), rather than as a view: the
    model may then add into it in place, as Falcon's parallel attention does, which a view made by an
    autograd.Function forbids."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, accumulator: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, accumulator)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, accumulator = ctx.saved_tensors
        accumulate_outer(accumulator, dy, x)
        return dy, None, None


class GradientTap(FrozenLinear):
    """A target during the estimate: y = base(x); while `accumulator` (fp32, m x n) is set, each backward adds
    dY^T X into it. A buffer, so that a compiled block takes it as an input rather than compiling once per layer.
    With a correction (nf4_error.py) the gradient is that of the corrected layer's weight W + L R."""

    def __init__(self, base: nn.Module, correction: Correction | None = None):
        super().__init__(base, correction)
        self.register_buffer("accumulator", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.accumulator is None else _AddWeightGradient.apply(y, x, self.accumulator)


@torch.library.custom_op("frugal_loraga::accumulate_grouped", mutates_args=("acc",))
def accumulate_grouped(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> None:
    """acc[e] (m x n, fp32) += dy_e^T x_e for the rows of each expert e (dy (S x m), x (S x n) grouped by expert,
    group e ending at row offsets[e]), each by accumulate_outer."""
    start = 0
    for e, end in enumerate(offsets.tolist()):  # one sync with the device
        if end > start:
            accumulate_outer(acc[e], dy[start:end], x[start:end])
        start = end


@accumulate_grouped.register_fake
def _(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> None:
    return None


class _AddExpertsGradient(torch.autograd.Function):
    """y unchanged in forward; in backward, dL/dW_e = dY_e^T X_e added into the accumulator (E x m x n)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, accumulator: torch.Tensor):
        ctx.save_for_backward(x, offsets, accumulator)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, offsets, accumulator = ctx.saved_tensors
        accumulate_grouped(accumulator, dy, x, offsets)
        return dy, None, None, None


class ExpertsTap(nn.Module):
    """An expert stack during the estimate: while `accumulator` (fp32, E x m x n) is set, each backward adds every
    expert's dY_e^T X_e into it (a buffer, as GradientTap's)."""

    def __init__(self, target: ExpertParameter):
        super().__init__()
        self.target = target
        self.register_buffer("accumulator", None, persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return y if self.accumulator is None else _AddExpertsGradient.apply(y, x, offsets, self.accumulator)


def make_taps(targets: dict, corrections: dict[str, Correction]) -> dict[str, nn.Module]:
    """A tap for each target: GradientTap for a linear layer (with its correction, if any), ExpertsTap for an expert
    stack (in the AdaptedExperts of its experts module)."""
    taps = {name: ExpertsTap(target) for name, target in targets.items() if isinstance(target, ExpertParameter)}
    adapted(taps)
    return {name: taps.get(name) or GradientTap(target, corrections.get(name)) for name, target in targets.items()}
