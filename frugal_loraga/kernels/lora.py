"""The LoRA-GA adapter on top of the base output, fused: y += eta * ((x A^T) B^T - (x A0^T) B0^T).

x (N x n) tokens, y (N x m) the base layer's output, A (r x n), B (m x r) trainable fp32, A0, B0 frozen (empty for
plain LoRA). Two kernels, each keeping the two adapters in separate dots so that at step 0 (A == A0, B == B0) they
cancel bit for bit:
  shrink:  T = [x A^T | x A0^T]                       (N x 2r, fp32): one pass over x serves both adapters
  expand:  y + eta * (T[:, :r] B^T - T[:, r:] B0^T)   one read of the base output y and one write of the sum
Backward, from dY (N x m):  dT = eta * [dY B | dY B0] (a shrink),  dx = dT[:, :r] A - dT[:, r:] A0 (an expand into a
fresh tensor),  dB = eta * dY^T T[:, :r],  dA = dT[:, :r]^T x  (small GEMMs, left to cuBLAS).
16-bit x goes through 16-bit tensor-core dots with fp32 accumulation, as torch.autocast computes the reference; the
reference (lora_add_reference) is LoraLinear's torch code.
"""
from __future__ import annotations

import torch

from . import dot_precision

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:  # a CPU install without Triton: lora_add takes the torch reference
    triton = tl = None
    jit = lambda kernel: kernel  # noqa: E731 (the kernels are then never launched)


@jit
def _shrink_kernel(x_ptr, w_ptr, w2_ptr, out_ptr, N, K, R, scale, stride_xn, stride_xk, stride_wr, stride_wk,
                   stride_w2r, stride_w2k, stride_on,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SECOND: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out = scale * [x w^T | x w2^T] (N x 2R, fp32; N x R without w2) for x (N x K), w and w2 (R x K)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    total2 = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        w_mask = (ranks[None, :] < R) & (k[:, None] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                    mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)
        w_t = tl.load(w_ptr + ranks[None, :] * stride_wr + k[:, None] * stride_wk, mask=w_mask, other=0.0)
        if UPCAST:
            x, w_t = x.to(tl.float32), w_t.to(tl.float32)
        else:
            w_t = w_t.to(x_ptr.dtype.element_ty)
        total += tl.dot(x, w_t, input_precision=PRECISION)
        if SECOND:  # its own dot: equal w and w2 give bit-equal halves
            w2_t = tl.load(w2_ptr + ranks[None, :] * stride_w2r + k[:, None] * stride_w2k, mask=w_mask, other=0.0)
            w2_t = w2_t.to(tl.float32) if UPCAST else w2_t.to(x_ptr.dtype.element_ty)
            total2 += tl.dot(x, w2_t, input_precision=PRECISION)
    out_mask = (rows[:, None] < N) & (ranks[None, :] < R)
    tl.store(out_ptr + rows[:, None] * stride_on + ranks[None, :], total * scale, mask=out_mask)
    if SECOND:
        tl.store(out_ptr + rows[:, None] * stride_on + R + ranks[None, :], total2 * scale, mask=out_mask)


@jit
def _expand_kernel(t_ptr, w_ptr, w2_ptr, src_ptr, y_ptr, N, M, R, scale, stride_tn, stride_wm, stride_wr, stride_w2m,
                   stride_w2r, stride_sn, stride_sm, stride_yn, stride_ym,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SECOND: tl.constexpr,
                   ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """y (N x M) = [src +] scale * (t[:, :R] w^T - t[:, R:] w2^T), t (N x 2R, fp32; N x R without w2), w, w2 (M x R)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_ym
    inside = (rows[:, None] < N) & (cols[None, :] < M)
    t_mask = (rows[:, None] < N) & (ranks[None, :] < R)
    w_mask = (cols[None, :] < M) & (ranks[:, None] < R)
    t = tl.load(t_ptr + rows[:, None] * stride_tn + ranks[None, :], mask=t_mask, other=0.0)
    w_t = tl.load(w_ptr + cols[None, :] * stride_wm + ranks[:, None] * stride_wr, mask=w_mask, other=0.0)
    if UPCAST:
        w_t = w_t.to(tl.float32)
    else:
        t, w_t = t.to(y_ptr.dtype.element_ty), w_t.to(y_ptr.dtype.element_ty)
    delta = tl.dot(t, w_t, input_precision=PRECISION)
    if SECOND:  # its own dot: at step 0 both products are bit-equal and cancel exactly
        t2 = tl.load(t_ptr + rows[:, None] * stride_tn + R + ranks[None, :], mask=t_mask, other=0.0)
        w2_t = tl.load(w2_ptr + cols[None, :] * stride_w2m + ranks[:, None] * stride_w2r, mask=w_mask, other=0.0)
        if UPCAST:
            w2_t = w2_t.to(tl.float32)
        else:
            t2, w2_t = t2.to(y_ptr.dtype.element_ty), w2_t.to(y_ptr.dtype.element_ty)
        delta -= tl.dot(t2, w2_t, input_precision=PRECISION)
    delta *= scale
    if ACCUMULATE:
        src = tl.load(src_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_sm, mask=inside, other=0.0)
        delta += src.to(tl.float32)
    tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=inside)


def shrink(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """scale * [x w^T | x w2^T] in fp32, for x (N x K) and thin w, w2 (R x K), R <= 64 (w2 may be None)."""
    N, K = x.shape
    R = w.shape[0]
    second = w2 is not None
    w2 = w2 if second else w
    out = torch.empty(N, 2 * R if second else R, dtype=torch.float32, device=x.device)
    block_n = 16 if N <= 8192 else 64
    precision, upcast = dot_precision(x.dtype)
    _shrink_kernel[(triton.cdiv(N, block_n),)](
        x, w, w2, out, N, K, R, scale, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w2.stride(0), w2.stride(1),
        out.stride(0), BLOCK_N=block_n, BLOCK_K=128, BLOCK_R=max(16, triton.next_power_of_2(R)), SECOND=second,
        PRECISION=precision, UPCAST=upcast, num_warps=4)
    return out


def expand(t: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, scale: float, out: torch.Tensor,
           src: torch.Tensor | None = None) -> torch.Tensor:
    """out (N x M) = [src +] scale * (t[:, :R] w^T - t[:, R:] w2^T) for fp32 t and thin w, w2 (M x R); returns out."""
    N, M = out.shape
    accumulate = src is not None
    src = src if accumulate else out
    R = w.shape[1]
    second = w2 is not None
    w2 = w2 if second else w
    precision, upcast = dot_precision(out.dtype)
    grid = (triton.cdiv(N, 64), triton.cdiv(M, 128))
    _expand_kernel[grid](
        t, w, w2, src, out, N, M, R, scale, t.stride(0), w.stride(0), w.stride(1), w2.stride(0), w2.stride(1),
        src.stride(0), src.stride(1), out.stride(0), out.stride(1), BLOCK_N=64, BLOCK_M=128,
        BLOCK_R=max(16, triton.next_power_of_2(R)), SECOND=second, ACCUMULATE=accumulate, PRECISION=precision,
        UPCAST=upcast, num_warps=4)
    return out


class _LoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, A, B, A0, B0, eta):
        frozen = A0.numel() > 0
        x2 = x.reshape(-1, x.shape[-1])
        T = shrink(x2, A, A0 if frozen else None)                         # [x A^T | x A0^T]
        y2 = y.reshape(-1, y.shape[-1])
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)  # returned itself, not a view: the model may add
        expand(T, B, B0 if frozen else None, eta, out=out.view(-1, y.shape[-1]), src=y2)  # into it in place (Falcon)
        ctx.save_for_backward(x2, T, A, B, A0, B0)
        ctx.eta, ctx.frozen, ctx.x_shape = eta, frozen, x.shape
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, T, A, B, A0, B0 = ctx.saved_tensors
        eta, frozen, r = ctx.eta, ctx.frozen, A.shape[0]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dT = shrink(dy2, B.T, B0.T if frozen else None, eta)              # [eta dY B | eta dY B0]
        dx = dA = dB = None
        if ctx.needs_input_grad[1]:                                       # dx = dT_1 A - dT_2 A0
            dx = expand(dT, A.T, A0.T if frozen else None, 1.0, out=torch.empty_like(x2))
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dA = (dT[:, :r].T.to(x2.dtype) @ x2).float()                  # (r x n)
        if ctx.needs_input_grad[3]:
            dB = (dy2.T @ T[:, :r].to(dy2.dtype)).float() * eta            # (m x r)
        return dy, dx, dA, dB, None, None, None


def lora_add_triton(y, x, A, B, A0, B0, eta: float) -> torch.Tensor:
    """y + eta * ((x A^T) B^T - (x A0^T) B0^T) (empty A0, B0: plain LoRA)."""
    return _LoraAdd.apply(y, x, A, B, A0, B0, eta)


def lora_add_reference(y, x, A, B, A0, B0, eta: float) -> torch.Tensor:
    """The torch reference: separate products for the trainable and the frozen adapter."""
    x = x.to(A.dtype) if not torch.is_autocast_enabled(x.device.type) else x
    delta = (x @ A.T) @ B.T
    if A0.numel():
        delta = delta - (x @ A0.T) @ B0.T
    return y + (eta * delta).to(y.dtype)


def lora_add(y, x, A, B, A0, B0, eta: float) -> torch.Tensor:
    """The fused kernel on CUDA for ranks up to 64 (when Triton is installed), the torch reference elsewhere."""
    if triton is not None and y.is_cuda and A.shape[0] <= 64:
        return lora_add_triton(y, x, A, B, A0, B0, eta)
    return lora_add_reference(y, x, A, B, A0, B0, eta)
