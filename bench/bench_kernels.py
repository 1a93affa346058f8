"""The estimate's gradient accumulation and each Triton kernel against their torch references on the GPU, on
Llama-2-7B layer shapes, in one run.

- accumulate: acc (m x n fp32) += dY^T X over 2 x 1024 bf16 tokens (LoRA-GA's gradient accumulation, as
  estimate.tap.accumulate_outer does it on CUDA: cuBLAS adding the bf16 product into the fp32 acc), vs fp32 casts +
  addmm_ and vs torch's bf16 GEMM with an fp32 add. (An autotuned Triton kernel for it ran at 0.79-0.85x of
  cuBLAS's speed and was dropped: bench/results/kernels_accumulate_triton_vs_cublas.json.)
- lora: the LoRA-GA adapter on a base output, forward and forward+backward, bf16 activations, r = 8 (2r with the
  frozen adapter), vs the torch reference (separate products, as LoraLinear computed before).
- svd: the top-2r SVDs of a group's gradients (one block's 7 layers, and five blocks' 35) as svd.top_singular does
  them (randomized, the small steps batched over the group), vs torch.svd_lowrank layer by layer with the same sketch
  and power iterations; with the energy each captures, ||U^T G V||_F^2, ours over torch's.
- cross_entropy: one chunk of the loss (256 rows of bf16 logits over the Llama-2 / Llama-3 / Qwen2.5 vocabularies):
  the rows' losses and the gradient written over the logits, the Triton kernel vs the torch reference (HeadLoss's
  ops before the kernel); each call on a fresh copy of the logits, whose copy alone is timed too.
Times are means of triton.testing.do_bench (its default return_mode, though its docstring says median); writes
bench/results/kernels.json (or --out).
Usage: python bench/bench_kernels.py
"""
import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from common import RESULTS
from frugal_loraga.estimate import accumulate_outer
from frugal_loraga.kernels.cross_entropy import cross_entropy_grad_reference_, cross_entropy_grad_triton_
from frugal_loraga.svd import top_singular
from frugal_loraga.kernels.lora import lora_add_reference, lora_add_triton

SHAPES = {"q_proj (4096 x 4096)": (4096, 4096), "up_proj (11008 x 4096)": (11008, 4096),
          "down_proj (4096 x 11008)": (4096, 11008)}


def bench_accumulate(tokens: int) -> list[dict]:
    rows = []
    for name, (m, n) in SHAPES.items():
        dy = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        acc = torch.randn(m, n, device="cuda")
        expected = acc.double() + dy.T.double() @ x.double()
        out = acc.clone()
        accumulate_outer(out, dy, x)
        fp32_casts = do_bench(lambda: acc.addmm_(dy.T.float(), x.float()))
        bf16_gemm = do_bench(lambda: acc.add_(torch.mm(dy.T, x).float()))
        ours = do_bench(lambda: accumulate_outer(acc, dy, x))
        rows.append({"kernel": "accumulate", "layer": name, "tokens": tokens, "fp32_casts_addmm_ms": fp32_casts,
                     "bf16_gemm_and_add_ms": bf16_gemm, "cublas_fp32_out_ms": ours,
                     "speedup_vs_fp32_casts": fp32_casts / ours, "speedup_vs_bf16_gemm_and_add": bf16_gemm / ours,
                     "max_abs_error_vs_float64": (out.double() - expected).abs().max().item()})
        print(rows[-1], flush=True)
    return rows


def bench_lora(tokens: int, rank: int) -> list[dict]:
    rows = []
    for name, (m, n) in SHAPES.items():
        A = (torch.randn(rank, n, device="cuda") / n ** 0.5).requires_grad_()
        B = (torch.randn(m, rank, device="cuda") / rank ** 0.5).requires_grad_()
        A0, B0 = A.detach() * 0.9, B.detach() * 0.9
        x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(y)
        row = {"kernel": "lora", "layer": name, "tokens": tokens, "rank": rank}
        for label, fn in (("reference", lora_add_reference), ("triton", lora_add_triton)):
            def forward():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return fn(y, x, A, B, A0, B0, 2.0)

            def forward_backward():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fn(y, x, A, B, A0, B0, 2.0)
                return torch.autograd.grad(out, (x, A, B), dy)
            row[f"{label}_forward_ms"] = do_bench(forward)
            row[f"{label}_forward_backward_ms"] = do_bench(forward_backward)
        row["forward_speedup"] = row["reference_forward_ms"] / row["triton_forward_ms"]
        row["forward_backward_speedup"] = row["reference_forward_backward_ms"] / row["triton_forward_backward_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_svd(rank: int) -> list[dict]:
    """Gradients with a gradient-like spectrum (s_i = i^-1/2 over 512 directions, plus noise)."""
    block = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    s = torch.arange(1, 513, device="cuda") ** -0.5
    rows = []
    for blocks in (1, 5):
        Gs = {}
        for i, (m, n) in enumerate(block * blocks):
            Gs[f"layer{i}"] = ((torch.randn(m, 512, device="cuda") * s) @ torch.randn(512, n, device="cuda") / n ** 0.5
                               + 1e-3 * torch.randn(m, n, device="cuda"))
        k = 2 * rank

        def lowrank():
            return {name: torch.svd_lowrank(G, q=2 * k, niter=4) for name, G in Gs.items()}
        ours_ms, torch_ms = do_bench(lambda: top_singular(Gs, k, "lowrank")), do_bench(lowrank)
        ours, theirs = top_singular(Gs, k, "lowrank"), lowrank()
        energy = [float((o.U.T @ G @ o.V).pow(2).sum() / (U[:, :k].T @ G @ V[:, :k]).pow(2).sum())
                  for G, o, (U, _, V) in zip(Gs.values(), ours.values(), theirs.values())]
        rows.append({"kernel": "svd", "layers": len(Gs), "k": k, "ours_ms": ours_ms, "torch_svd_lowrank_ms": torch_ms,
                     "speedup": torch_ms / ours_ms, "captured_energy_ours_over_torch_min": min(energy),
                     "captured_energy_ours_over_torch_mean": sum(energy) / len(energy)})
        print(rows[-1], flush=True)
    return rows


def bench_cross_entropy(rows: int) -> list[dict]:
    results = []
    for vocabulary in (32000, 128256, 152064):
        logits = 3 * torch.randn(rows, vocabulary, device="cuda", dtype=torch.bfloat16)
        targets = torch.randint(0, vocabulary, (rows,), device="cuda")
        ours, theirs = logits.clone(), logits.clone()
        loss_diff = (cross_entropy_grad_triton_(ours, targets, 1e-3) - cross_entropy_grad_reference_(
            theirs, targets, 1e-3)).abs().max().item()
        row = {"kernel": "cross_entropy", "rows": rows, "vocabulary": vocabulary, "loss_max_diff": loss_diff,
               "grad_max_diff": (ours.float() - theirs.float()).abs().max().item(),
               "triton_ms": do_bench(lambda: cross_entropy_grad_triton_(logits.clone(), targets, 1e-3)),
               "reference_ms": do_bench(lambda: cross_entropy_grad_reference_(logits.clone(), targets, 1e-3)),
               "copy_ms": do_bench(logits.clone)}
        row["speedup"] = row["reference_ms"] / row["triton_ms"]
        results.append(row)
        print(row, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "accumulate": bench_accumulate(args.tokens), "lora": bench_lora(args.tokens, args.rank),
               "svd": bench_svd(args.rank), "cross_entropy": bench_cross_entropy(256)}
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
