"""Cross-entropy's value and its gradient in the logits, from one chunk's logits, the gradient written over them:
    loss_t = lse_t - z_{t, y_t},    lse_t = log sum_v exp z_{t, v}              (per row t, fp32)
    Z[t] <- (softmax(z_t) - onehot(y_t)) * scale                             (in Z's own dtype, 16 bits in training)
for Z (C x V) the logits of C rows over a vocabulary of V words (loss.HeadLoss's chunks; scale = 1 / N for a mean over
N targets). One program per row, two passes over it: a running max and sum of exponentials (picking up z_{t, y_t} on
the way), then the gradient. That is two reads and one write of the 16-bit logits, where the same maths in torch ops
(the reference) makes an fp32 copy, reads it for logsumexp's max, its shifted exponentials and their sum, then
subtracts, exponentiates, scales and casts in passes of their own: 8.5x the kernel's time at 128k words
(bench/RESULTS.md, session 29).
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
    target = tl.load(y_ptr + row)
    top = float("-inf")  # the row's running max; sum_exp: sum of exp(z - top), rescaled as top grows
    sum_exp = 0.0
    picked = 0.0  # z[row, target], read in this pass: the second one overwrites it
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, 0))
        grown = tl.where(new_top == float("-inf"), 0.0, tl.exp(top - new_top))  # no -inf - -inf before a word
        sum_exp = sum_exp * grown + tl.sum(tl.exp(z - new_top), 0)
        top = new_top
        picked += tl.sum(tl.where(v0 + cols == target, z, 0.0), 0)
    lse = top + tl.log(sum_exp)
    tl.store(loss_ptr + row, lse - picked)
    for v0 in range(0, V, BLOCK_V):
        inside = v0 + cols < V
        z = tl.load(z_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
        tl.store(z_row + v0 + cols, (grad * scale).to(z_ptr.dtype.element_ty), mask=inside)


VOCABULARY_BLOCK = 4096  # the words a program reads at a time


def cross_entropy_grad_triton_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The rows' losses (C, fp32); logits (C x V, finite, rows of unit stride) overwritten by their gradient times
    scale. targets (C,): one word in [0, V) a row (not checked here: loss.py has dropped the ignored ones)."""
    assert len(targets) == len(logits) and logits.stride(1) == 1
    losses = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
    block = min(VOCABULARY_BLOCK, triton.next_power_of_2(logits.shape[1]))
    _cross_entropy_kernel[(len(targets),)](logits, targets.contiguous(), losses, logits.shape[1], logits.stride(0),
                                           scale, BLOCK_V=block, num_warps=8)
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
