"""The operations of the 4-bit error correction's per-layer maths (what nf4_error.whitening and best_correction
compute) timed apart on the GPU, on Llama-3-8B layer shapes (m x n): cholesky_ex of H = X^T X + ridge (n x n fp32),
E @ C (m x n by n x n, fp32) whole and as nf4_error.times_lower takes it (C's nonzero blocks only), the randomized
top-16 SVD of E C (svd.top_singular, one layer at a time as the correction calls it), the triangular solve R C = V^T,
and one X^T X update over 8192 bf16 tokens (cuBLAS into fp32) whole and as nf4_error.add_gram makes it (the blocks on
and above the diagonal).
Then the randomized SVD's small step apart: the eigendecomposition of one 32 x 32 fp64 Gram on the GPU, through a CPU
round trip, and of 8 at once. Milliseconds: the mean over triton.testing.do_bench's calls, as bench_kernels.py times.
Usage: python bench/bench_correction_maths.py --name correction_maths_h100
"""
import argparse
import json

import torch
from triton.testing import do_bench

from common import add_output_args, save_result
from frugal_loraga.nf4_error import add_gram, times_lower
from frugal_loraga.svd import top_singular

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q and o; k and v; gate and up; down


def milliseconds(fn) -> float:
    return round(do_bench(fn), 3)


def layer_maths(m: int, n: int, tokens: int = 8192) -> dict:
    X = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    H = torch.zeros(n, n, device="cuda")
    torch.addmm(H, X.T, X, out_dtype=torch.float32, out=H)
    H.diagonal().add_(1e-2 * H.diagonal().mean())
    C = torch.linalg.cholesky(H)
    E = torch.randn(m, n, device="cuda")
    EC = E @ C
    Vt = top_singular({"E C": EC}, 16, "lowrank")["E C"].V.T.contiguous()
    return {"cholesky_ex": milliseconds(lambda: torch.linalg.cholesky_ex(H)),
            "E@C": milliseconds(lambda: E @ C),
            "E@C_lower_blocks": milliseconds(lambda: times_lower(E, C)),
            "randomized_svd_16": milliseconds(lambda: top_singular({"E C": EC}, 16, "lowrank")),
            "solve_triangular": milliseconds(lambda: torch.linalg.solve_triangular(C, Vt, upper=False, left=False)),
            f"gram_bf16_{tokens}_tokens": milliseconds(lambda: torch.addmm(H, X.T, X, out_dtype=torch.float32,
                                                                           out=H)),
            f"gram_bf16_{tokens}_tokens_upper_blocks": milliseconds(lambda: add_gram(H, X))}


def main():
    parser = argparse.ArgumentParser()
    add_output_args(parser, "correction_maths")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name()}
    for m, n in SHAPES:
        result[f"{m}x{n}"] = layer_maths(m, n)
    one = torch.randn(1, 32, 32, device="cuda", dtype=torch.float64)
    one = one @ one.mT
    eight = torch.randn(8, 32, 32, device="cuda", dtype=torch.float64)
    eight = eight @ eight.mT
    result["eigh_32_fp64_gpu"] = milliseconds(lambda: torch.linalg.eigh(one))
    result["eigh_32_fp64_cpu_round_trip"] = milliseconds(lambda: [t.cuda() for t in torch.linalg.eigh(one.cpu())])
    result["eigh_8x32_fp64_gpu"] = milliseconds(lambda: torch.linalg.eigh(eight))
    print(json.dumps(result, indent=1), flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
