"""Each Triton kernel against its torch reference on the GPU, on Llama-2-7B layer shapes, in one run.

- accumulate: acc (m x n fp32) += dY^T X over 2 x 1024 bf16 tokens (LoRA-GA's gradient accumulation),
  vs the reference (fp32 casts + addmm_), vs torch's bf16 GEMM with an fp32 add, and vs cuBLAS accumulating the
  bf16 product into fp32 acc itself (addmm with out_dtype, beta = 1).
- lora: the LoRA-GA adapter on a base output, forward and forward+backward, bf16 activations, r = 8 (2r with the
  frozen adapter), vs the torch reference (separate products, as LoraLinear computed before).
Times are medians of triton.testing.do_bench; writes bench/results/kernels.json (or --out).
Usage: python bench/bench_kernels.py
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernels.accumulate import accumulate_outer_reference, accumulate_outer_triton  # noqa: E402
from kernels.lora import lora_add_reference, lora_add_triton  # noqa: E402

SHAPES = {"q_proj (4096 x 4096)": (4096, 4096), "up_proj (11008 x 4096)": (11008, 4096),
          "down_proj (4096 x 11008)": (4096, 11008)}


def accumulate_outer_cublas(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += dy^T x by one cuBLAS GEMM of the 16-bit inputs into the fp32 acc (beta = 1)."""
    return torch.addmm(acc, dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]), out_dtype=torch.float32,
                       out=acc)


def bench_accumulate(tokens: int) -> list[dict]:
    rows = []
    for name, (m, n) in SHAPES.items():
        dy = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(m, n, device="cuda")
        expected = accumulate_outer_reference(acc.clone(), dy, x)
        error = (accumulate_outer_triton(acc.clone(), dy, x) - expected).abs().max().item()
        cublas_error = (accumulate_outer_cublas(acc.clone(), dy, x) - expected).abs().max().item()
        reference = do_bench(lambda: accumulate_outer_reference(acc, dy, x))
        bf16_gemm = do_bench(lambda: acc.add_(torch.mm(dy.T, x).float()))
        cublas = do_bench(lambda: accumulate_outer_cublas(acc, dy, x))
        triton_ms = do_bench(lambda: accumulate_outer_triton(acc, dy, x))
        rows.append({"kernel": "accumulate", "layer": name, "tokens": tokens, "reference_ms": reference,
                     "torch_bf16_gemm_ms": bf16_gemm, "cublas_fp32_out_ms": cublas, "triton_ms": triton_ms,
                     "speedup_vs_reference": reference / triton_ms, "speedup_vs_bf16_gemm": bf16_gemm / triton_ms,
                     "speedup_vs_cublas_fp32_out": cublas / triton_ms, "max_abs_error": error,
                     "cublas_max_abs_error": cublas_error})
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.json"))
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "accumulate": bench_accumulate(args.tokens), "lora": bench_lora(args.tokens, args.rank)}
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
