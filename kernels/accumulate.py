"""acc += dY^T X in fp32 from 16-bit inputs: LoRA-GA's gradient accumulation, once per layer per batch.

Over the N tokens of a batch, a layer with inputs X (N x n) and output gradients dY (N x m) has dL/dW = dY^T X (m x n).
Reference: cast dY and X to fp32 and addmm_ into acc: fp32 copies of both, and an fp32 GEMM (no tensor cores).
Kernel: each program owns a BLOCK_M x BLOCK_N tile of acc, reduces over the tokens with 16-bit tensor-core dots into
fp32, then adds into acc in place: acc is read and written once, dY and X are read in their own dtype.
fp32 inputs use IEEE fp32 dots (no TF32), so the result matches the reference to rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, dot_precision


def _configs() -> list[triton.Config]:
    """Tile shapes the autotuner picks from, once per layer shape and dtype (configs that do not fit in shared memory
    are skipped by it). Under the interpreter one config: there it would time each on the CPU."""
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
              (64, 64, 32, 4, 3), (128, 64, 32, 4, 3)]
    if INTERPRET:
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_T": t, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, t, w, s in shapes]


@triton.autotune(configs=_configs(), key=["M", "N", "PRECISION"], restore_value=["acc_ptr"])
@triton.jit
def _accumulate_kernel(acc_ptr, dy_ptr, x_ptr, M, N, T,
                       stride_am, stride_an, stride_dt, stride_dm, stride_xt, stride_xn,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr):
    # programs walk the tiles GROUP_M rows of tiles at a time, so that the dY and X columns they read stay in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        dy_t = tl.load(dy_ptr + t[None, :] * stride_dt + offs_m[:, None] * stride_dm,
                       mask=(t[None, :] < T) & (offs_m[:, None] < M), other=0.0)      # (BLOCK_M, BLOCK_T) of dY^T
        x = tl.load(x_ptr + t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                    mask=(t[:, None] < T) & (offs_n[None, :] < N), other=0.0)         # (BLOCK_T, BLOCK_N)
        if UPCAST:
            dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
        total += tl.dot(dy_t, x, input_precision=PRECISION)
    ptrs = acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ptrs, tl.load(ptrs, mask=inside, other=0.0) + total, mask=inside)


def accumulate_outer_triton(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc (m, n) fp32 += dy^T x for dy (..., m), x (..., n); in place, returns acc."""
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if acc.dtype != torch.float32 or acc.shape != (dy.shape[1], x.shape[1]) or dy.shape[0] != x.shape[0]:
        raise ValueError(f"accumulate_outer: acc {tuple(acc.shape)} {acc.dtype} does not fit dy "
                         f"{tuple(dy.shape)} and x {tuple(x.shape)}; acc must be fp32 (m, n)")
    if dy.dtype != x.dtype:
        dtype = torch.promote_types(dy.dtype, x.dtype)
        dy, x = dy.to(dtype), x.to(dtype)
    (M, N), T = acc.shape, dy.shape[0]
    precision, upcast = dot_precision(dy.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _accumulate_kernel[grid](acc, dy, x, M, N, T, acc.stride(0), acc.stride(1), dy.stride(0), dy.stride(1),
                             x.stride(0), x.stride(1), PRECISION=precision, UPCAST=upcast)
    return acc


def accumulate_outer_reference(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The torch reference: fp32 casts and addmm_."""
    return acc.addmm_(dy.reshape(-1, dy.shape[-1]).T.float(), x.reshape(-1, x.shape[-1]).float())


@torch.library.custom_op("frugal_loraga::accumulate_outer", mutates_args=("acc",))
def accumulate_outer(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc += dy^T x: the Triton kernel on CUDA, the torch reference elsewhere. A custom op that mutates acc, so that
    torch.compile keeps the in-place update inside a compiled backward."""
    if acc.is_cuda:
        accumulate_outer_triton(acc, dy, x)
    else:
        accumulate_outer_reference(acc, dy, x)


@accumulate_outer.register_fake
def _(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    return None
