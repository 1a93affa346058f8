"""Cross-entropy's value and its gradient in the logits, from one chunk's logits, the gradient written over them:
    loss_t = lse_t - z_{t, y_t},    lse_t = log sum_v exp z_{t, v}              (per row t, fp32)
    Z[t] <- (softmax(z_t) - onehot(y_t)) * scale                             (in Z's own dtype, 16 bits in training)
for Z (C x V) the logits of C rows over a vocabulary of V words (loss.HeadLoss's chunks; scale = 1 / N for a mean over
N targets). One program per row, two passes over it: a running max and sum of exponentials, then the gradient. Its
reads and writes are two reads and one write of the 16-bit logits, where the same maths in torch ops (the reference)
makes fp32 copies and ten passes over them: most of a 128k-word head's time that is not its GEMMs.
"""
from __future__ import annotations

import torch

from .lora import jit, tl, triton


@jit
def _cross_entropy_kernel(z_ptr, y_ptr, loss_ptr, V, stride_z, scale, BLOCK_V: tl.constexpr):
    """loss[row] = lse - z[row, y[row]]; z[row] = (softmax(z[row]) - onehot(y[row])) * scale."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK_V)
    top = float("-inf")  # the row's running max; sum_exp: sum of exp(z - top), rescaled as top grows
    sum_exp = 0.0
    for v0 in range(0, V, BLOCK_V):  # the first tile holds a word: top is finite from there on
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, 0))
        sum_exp = sum_exp * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), 0)
        top = new_top
    lse = top + tl.log(sum_exp)
    target = tl.load(y_ptr + row)
    tl.store(loss_ptr + row, lse - tl.load(z_row + target).to(tl.float32))
    for v0 in range(0, V, BLOCK_V):
        inside = v0 + cols < V
        z = tl.load(z_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
        tl.store(z_row + v0 + cols, (grad * scale).to(z_ptr.dtype.element_ty), mask=inside)


BLOCK_V = 4096


def cross_entropy_grad_triton_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The rows' losses (C, fp32); logits (C x V, contiguous rows) overwritten by their gradient times scale."""
    losses = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
    _cross_entropy_kernel[(len(targets),)](logits, targets, losses, logits.shape[1], logits.stride(0), scale,
                                           BLOCK_V=min(BLOCK_V, triton.next_power_of_2(logits.shape[1])), num_warps=8)
    return losses


def cross_entropy_grad_reference_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch reference, in fp32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    losses = lse - z.gather(1, targets[:, None])[:, 0]
    grad = z.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, targets[:, None], grad.new_full((len(targets), 1), -1.0))
    logits.copy_(grad.mul_(scale))
    return losses


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel on CUDA (Triton installed), the torch reference elsewhere."""
    if triton is None or not logits.is_cuda or logits.stride(1) != 1:
        return cross_entropy_grad_reference_(logits, targets, scale)
    return cross_entropy_grad_triton_(logits, targets, scale)
