"""The LoRA-GA adapter and a 4-bit base's frozen correction on top of the base output, fused:
    y += eta * ((x A^T) B^T - (x A0^T) B0^T) + (x R^T) L^T

x (N x n) tokens, y (N x m) the base layer's output, A (r x n), B (m x r) trainable fp32, A0, B0 frozen (empty for
plain LoRA), R (q x n), L (m x q) the frozen correction of the base's quantization error (nf4_error.py; empty without
one). Two kernels, each computing the trainable and the frozen adapter's columns apart, so that at step 0 (A == A0,
B == B0) they are bit-equal and cancel, and the model is then the corrected base exactly as the correction alone
computes it (lora_add(y, x, R, L) with eta = 1 and no frozen adapter: a dot of the same width):
  shrink:  T = [x A^T | x A0^T | x R^T]                        (N x (2r + q), fp32): one pass over x serves all three,
                                                                A and A0 in one 16-wide dot up to r = 8
  expand:  y + eta * (T_A B^T - T_A0 B0^T) + T_R L^T          one read of the base output y and one write of the sum
Backward, from dY (N x m):  dT = [eta dY B | eta dY B0 | dY L] (a shrink),  dx = dT_A A - dT_A0 A0 + dT_R R (an
expand into a fresh tensor),  dB = eta * dY^T T_A,  dA = dT_A^T x  (small GEMMs, left to cuBLAS).
16-bit x goes through 16-bit tensor-core dots with fp32 accumulation, as torch.autocast computes the reference; the
reference (lora_add_reference) is LoraLinear's torch code. The correction rides in the same two kernels rather than
GEMMs of its own because a 4-bit training step at a few thousand tokens is bound by kernel launches (bench/RESULTS.md).
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
def _rows_t(w_ptr, first, count, k, K, stride_wc, stride_wk, BLOCK: tl.constexpr):
    """w[first:first + count, k]^T (len(k) x BLOCK), zeros past count rows or K columns."""
    cols = first + tl.arange(0, BLOCK)
    return tl.load(w_ptr + cols[None, :] * stride_wc + k[:, None] * stride_wk,
                   mask=(cols[None, :] < first + count) & (k[:, None] < K), other=0.0)


@jit
def _store_cols(out_ptr, rows, N, first, count, value, stride_on, BLOCK: tl.constexpr):
    """out[rows, first:first + count] = value (len(rows) x BLOCK)."""
    cols = first + tl.arange(0, BLOCK)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], value,
             mask=(rows[:, None] < N) & (cols[None, :] < first + count))


@jit
def _shrink_kernel(x_ptr, w_ptr, out_ptr, N, K, S1, S, Q, scale, stride_xn, stride_xk, stride_wc, stride_wk,
                   stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_1: tl.constexpr,
                   BLOCK_2: tl.constexpr, BLOCK_Q: tl.constexpr, SECOND: tl.constexpr, THIRD: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out = [scale x w[:S]^T | x w[S:S + Q]^T] (fp32) for x (N x K) and the stacked weights w ((S + Q) x K, x's
    dtype, fp32 under UPCAST), in up to three dots: rows [0, S1), [S1, S) with SECOND, [S, S + Q) with THIRD."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    total1 = tl.zeros((BLOCK_N, BLOCK_1), dtype=tl.float32)
    total2 = tl.zeros((BLOCK_N, BLOCK_2), dtype=tl.float32)
    total3 = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                    mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        total1 += tl.dot(x, _rows_t(w_ptr, 0, S1, k, K, stride_wc, stride_wk, BLOCK_1), input_precision=PRECISION)
        if SECOND:
            total2 += tl.dot(x, _rows_t(w_ptr, S1, S - S1, k, K, stride_wc, stride_wk, BLOCK_2),
                             input_precision=PRECISION)
        if THIRD:
            total3 += tl.dot(x, _rows_t(w_ptr, S, Q, k, K, stride_wc, stride_wk, BLOCK_Q), input_precision=PRECISION)
    _store_cols(out_ptr, rows, N, 0, S1, total1 * scale, stride_on, BLOCK_1)
    if SECOND:
        _store_cols(out_ptr, rows, N, S1, S - S1, total2 * scale, stride_on, BLOCK_2)
    if THIRD:
        _store_cols(out_ptr, rows, N, S, Q, total3, stride_on, BLOCK_Q)


@jit
def _expand_kernel(t_ptr, w_ptr, w2_ptr, w3_ptr, src_ptr, y_ptr, N, M, R, Q, col3, scale, stride_tn, stride_wm,
                   stride_wr, stride_w2m, stride_w2r, stride_w3m, stride_w3r, stride_sn, stride_sm, stride_yn,
                   stride_ym, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_Q: tl.constexpr, SECOND: tl.constexpr, THIRD: tl.constexpr, ACCUMULATE: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """y (N x M) = [src +] scale * (t[:, :R] w^T - t[:, R:2R] w2^T) + t[:, col3:col3 + Q] w3^T for fp32 t, w, w2
    (M x R), w3 (M x Q); w2's term only with SECOND, w3's only with THIRD."""
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
    if THIRD:  # its own dot, added to the exact zero of the cancelled adapters at step 0
        ranks3 = tl.arange(0, BLOCK_Q)
        t3 = tl.load(t_ptr + rows[:, None] * stride_tn + col3 + ranks3[None, :],
                     mask=(rows[:, None] < N) & (ranks3[None, :] < Q), other=0.0)
        w3_t = tl.load(w3_ptr + cols[None, :] * stride_w3m + ranks3[:, None] * stride_w3r,
                       mask=(cols[None, :] < M) & (ranks3[:, None] < Q), other=0.0)
        if UPCAST:
            w3_t = w3_t.to(tl.float32)
        else:
            t3, w3_t = t3.to(y_ptr.dtype.element_ty), w3_t.to(y_ptr.dtype.element_ty)
        delta += tl.dot(t3, w3_t, input_precision=PRECISION)
    if ACCUMULATE:
        src = tl.load(src_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_sm, mask=inside, other=0.0)
        delta += src.to(tl.float32)
    tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=inside)


SMALLEST_TILE = 16  # the tensor cores' smallest dot width


def _block(rank: int) -> int:
    """A dot's rank tile: at least SMALLEST_TILE, the rank's next power of two."""
    return max(SMALLEST_TILE, triton.next_power_of_2(rank))


def shrink_tile(N: int, dtype: torch.dtype) -> tuple[int, int]:
    """The shrink's (tokens, columns) tile for N tokens of x's dtype. Never chosen by the weights' widths, so that a
    correction alone and beside an adapter get the same bits. At most 56 KiB of shared memory at rank 64, within the
    99 KiB a consumer card gives a block (tests/test_kernels.py compiles each): fp32 tiles are double-buffered in
    shared memory, (32 + 3 x 64) x 32 x 4 B x 2; 16-bit ones are not (48 KiB at 32 x 256)."""
    if dtype == torch.float32:
        return 32, 32
    return (32, 256) if N <= 8192 else (64, 128)  # training's batches; the estimate's longer ones (bench/RESULTS.md)


def shrink(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, w3: torch.Tensor | None = None,
           scale: float = 1.0) -> torch.Tensor:
    """[scale x w^T | scale x w2^T | x w3^T] in fp32, for x (N x K) and thin w, w2 (R x K), w3 (Q x K), R, Q <= 64
    (w2, w3 may be None: their parts are then left out). The weights are stacked and cast to x's dtype first (a few
    rows; w alone is only cast, or used as it is, strides and all, where it has x's dtype), so that each program
    reads them from one tensor, in x's width (16 bits in training) rather than fp32.
    w and w2 share a dot where together they fit the smallest tile (2R <= 16): a column's value does not depend on
    its neighbours in a dot of 16 columns, so equal w and w2 still give bit-equal halves; wider, each has its own.
    w3 always has its own dot, of the width it gets alone (as lora.FrozenLinear computes it): the same bits."""
    N, K = x.shape
    R, Q = w.shape[0], 0 if w3 is None else w3.shape[0]
    S = R if w2 is None else 2 * R
    S1 = S if S <= SMALLEST_TILE else R
    precision, upcast = dot_precision(x.dtype)
    parts = [p for p in (w, w2, w3) if p is not None]
    stacked = (torch.cat(parts) if len(parts) > 1 else w).to(torch.float32 if upcast else x.dtype)
    out = torch.empty(N, S + Q, dtype=torch.float32, device=x.device)
    block_n, block_k = shrink_tile(N, x.dtype)
    _shrink_kernel[(triton.cdiv(N, block_n),)](
        x, stacked, out, N, K, S1, S, Q, scale, x.stride(0), x.stride(1), stacked.stride(0), stacked.stride(1),
        out.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_1=_block(S1), BLOCK_2=_block(S - S1), BLOCK_Q=_block(Q),
        SECOND=S1 < S, THIRD=Q > 0, PRECISION=precision, UPCAST=upcast, num_warps=4)
    return out


def expand(t: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, scale: float, out: torch.Tensor,
           src: torch.Tensor | None = None, w3: torch.Tensor | None = None) -> torch.Tensor:
    """out (N x M) = [src +] scale * (t[:, :R] w^T - t[:, R:2R] w2^T) + t[:, -Q:] w3^T for fp32 t (as shrink lays it
    out) and thin w, w2 (M x R), w3 (M x Q) (w2, w3 may be None); returns out."""
    N, M = out.shape
    accumulate = src is not None
    src = src if accumulate else out
    R, Q = w.shape[1], 0 if w3 is None else w3.shape[1]
    second, third = w2 is not None, w3 is not None
    w2, w3 = w2 if second else w, w3 if third else w
    precision, upcast = dot_precision(out.dtype)
    grid = (triton.cdiv(N, 64), triton.cdiv(M, 128))
    _expand_kernel[grid](
        t, w, w2, w3, src, out, N, M, R, Q, t.shape[1] - Q, scale, t.stride(0), w.stride(0), w.stride(1),
        w2.stride(0), w2.stride(1), w3.stride(0), w3.stride(1), src.stride(0), src.stride(1), out.stride(0),
        out.stride(1), BLOCK_N=64, BLOCK_M=128, BLOCK_R=_block(R), BLOCK_Q=_block(Q), SECOND=second, THIRD=third,
        ACCUMULATE=accumulate, PRECISION=precision, UPCAST=upcast, num_warps=4)
    return out


def _given(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor, or None where it is empty (no frozen adapter, no correction)."""
    return tensor if tensor.numel() else None


class _LoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, A, B, A0, B0, eta, R, L):
        x2 = x.reshape(-1, x.shape[-1])
        T = shrink(x2, A, _given(A0), _given(R))                           # [x A^T | x A0^T | x R^T]
        y2 = y.reshape(-1, y.shape[-1])
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)  # returned itself, not a view: the model may add
        expand(T, B, _given(B0), eta, out=out.view(-1, y.shape[-1]), src=y2, w3=_given(L))  # into it in place (Falcon)
        ctx.save_for_backward(x2, T, A, B, A0, B0, R, L)
        ctx.eta, ctx.x_shape = eta, x.shape
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, T, A, B, A0, B0, R, L = ctx.saved_tensors
        eta, r = ctx.eta, A.shape[0]
        frozen, corrected = A0.numel() > 0, R.numel() > 0
        dy2 = dy.reshape(-1, dy.shape[-1])
        dT = shrink(dy2, B.T, B0.T if frozen else None, L.T if corrected else None, eta)  # [eta dY B | .. B0 | dY L]
        dx = dA = dB = None
        if ctx.needs_input_grad[1]:                                       # dx = dT_A A - dT_A0 A0 + dT_R R
            dx = expand(dT, A.T, A0.T if frozen else None, 1.0, out=torch.empty_like(x2),
                        w3=R.T if corrected else None)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dA = (dT[:, :r].T.to(x2.dtype) @ x2).float()                  # (r x n)
        if ctx.needs_input_grad[3]:
            dB = (dy2.T @ T[:, :r].to(dy2.dtype)).float() * eta            # (m x r)
        return dy, dx, dA, dB, None, None, None, None, None


NONE = torch.zeros(0)  # an absent frozen adapter or correction


def lora_add_triton(y, x, A, B, A0, B0, eta: float, R=NONE, L=NONE) -> torch.Tensor:
    """y + eta * ((x A^T) B^T - (x A0^T) B0^T) + (x R^T) L^T (empty A0, B0: plain LoRA; empty R, L: no correction)."""
    return _LoraAdd.apply(y, x, A, B, A0, B0, eta, R, L)


def lora_add_reference(y, x, A, B, A0, B0, eta: float, R=NONE, L=NONE) -> torch.Tensor:
    """The torch reference: separate products for the trainable and the frozen adapter and the correction."""
    x = x.to(A.dtype) if not torch.is_autocast_enabled(x.device.type) else x
    delta = (x @ A.T) @ B.T
    if A0.numel():
        delta = delta - (x @ A0.T) @ B0.T
    delta = eta * delta
    if R.numel():
        delta = delta + (x @ R.T) @ L.T
    return y + delta.to(y.dtype)


MAX_RANK = 64  # the widest adapter or correction the fused kernel's blocks hold


def fused_available(t: torch.Tensor) -> bool:
    """Whether the fused kernel can run on t: a CUDA tensor, with Triton installed."""
    return triton is not None and t.is_cuda


def lora_add(y, x, A, B, A0, B0, eta: float, R=NONE, L=NONE) -> torch.Tensor:
    """The fused kernel on CUDA for ranks up to MAX_RANK (when Triton is installed), the torch reference elsewhere.
    An adapter too wide for the kernel beside a correction that fits: the correction still through the kernel, as
    lora.FrozenLinear computes it, so that the model at step 0 stays the corrected model to the bit."""
    if not fused_available(y) or R.shape[0] > MAX_RANK:
        return lora_add_reference(y, x, A, B, A0, B0, eta, R, L)
    if A.shape[0] <= MAX_RANK:
        return lora_add_triton(y, x, A, B, A0, B0, eta, R, L)
    if R.numel():
        y = lora_add_triton(y, x, R, L, R[:0], L[:, :0], 1.0)
    return lora_add_reference(y, x, A, B, A0, B0, eta)
