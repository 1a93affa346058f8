"""The adapter's shrink (kernels.lora.shrink) of this tree against another commit's, and against cuBLAS, in one run.

For x (2048 x K bf16 tokens) and the parts a layer stacks (A and A0 r x K fp32, r = 8; the correction R, q = 16; B^T
of the backward, a strided view): each shrink's mean time (triton.testing.do_bench's default), the largest difference
of the two outputs (0: the same bits), whether this tree's halves are bit-equal where A == A0 and its correction's
columns those of the correction alone; cuBLAS's x W^T into fp32 (torch.mm, out_dtype) for the stacked weights, for
scale; then lora_add's forward + backward on Llama-3-8B layer shapes, both trees, with and without the correction.
Usage: git worktree add -f --detach .old <commit>; python3 bench/shrink_ab.py --other .old
Writes bench/results/shrink_ab.json (or --out). Eager calls: in training the stacking is compiled with the layer.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from common import RESULTS
from frugal_loraga.kernels import lora as ours


def other_kernels(root: str):
    """kernels.lora of the checkout at `root`, imported beside ours."""
    for name in [n for n in sys.modules if n.startswith("frugal_loraga")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(root).resolve()))
    module = importlib.import_module("frugal_loraga.kernels.lora")
    assert Path(module.__file__).is_relative_to(Path(root).resolve()), module.__file__
    return module


def bench_shrink(other, tokens: int, rank: int, correction: int) -> list[dict]:
    rows = []
    for K in (4096, 14336):
        x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(rank, K, device="cuda") / K ** 0.5
        R = torch.randn(correction, K, device="cuda") / K ** 0.5
        Bt = (torch.randn(K, rank, device="cuda") / rank ** 0.5).T  # B^T as the backward passes it
        for label, parts in (("lora", (A, None, None)), ("lora_ga", (A, A.clone(), None)),
                             ("lora_corrected", (A, None, R)), ("lora_ga_corrected", (A, A.clone(), R)),
                             ("backward_lora_ga", (Bt, Bt, None)), ("backward_lora_ga_corrected", (Bt, Bt, R))):
            theirs, mine = other.shrink(x, *parts), ours.shrink(x, *parts)
            row = {"K": K, "parts": label, "other_ms": do_bench(lambda: other.shrink(x, *parts)),
                   "ours_ms": do_bench(lambda: ours.shrink(x, *parts)),
                   "max_difference": (theirs - mine).abs().max().item()}
            if parts[1] is not None:
                row["halves_bit_equal"] = torch.equal(mine[:, :rank], mine[:, rank:2 * rank])
            if parts[2] is not None:
                row["correction_as_alone"] = torch.equal(mine[:, -correction:], ours.shrink(x, R, None, None))
            stacked = torch.cat([p for p in parts if p is not None]).to(torch.bfloat16)
            row["cublas_ms"] = do_bench(lambda: torch.mm(x, stacked.T, out_dtype=torch.float32))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_lora_add(other, tokens: int, rank: int, correction: int) -> list[dict]:
    rows = []
    for m, n in ((4096, 4096), (14336, 4096), (4096, 14336)):
        for q in (0, correction):
            A = (torch.randn(rank, n, device="cuda") / n ** 0.5).requires_grad_()
            B = (torch.randn(m, rank, device="cuda") / rank ** 0.5).requires_grad_()
            A0, B0 = A.detach() * 0.9, B.detach() * 0.9
            R = torch.randn(q, n, device="cuda") / n ** 0.5
            L = torch.randn(m, q, device="cuda") / 10
            x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            y = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn_like(y)
            row = {"m": m, "n": n, "correction_rank": q}
            for label, module in (("other", other), ("ours", ours)):
                def forward_backward():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = module.lora_add_triton(y, x, A, B, A0, B0, 2.0, R, L)
                    return torch.autograd.grad(out, (x, A, B), dy)
                row[f"{label}_forward_backward_ms"] = do_bench(forward_backward)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="another checkout's root (a git worktree) to compare with")
    parser.add_argument("--out", default=str(RESULTS / "shrink_ab.json"))
    args = parser.parse_args()
    other = other_kernels(args.other)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "tokens": 2048, "rank": 8, "correction_rank": 16,
              "shrink": bench_shrink(other, 2048, 8, 16), "lora_add": bench_lora_add(other, 2048, 8, 16)}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
