"""Triton kernels, each with its launcher and the torch reference it is tested and benchmarked against.

Under TRITON_INTERPRET=1 (CI, no GPU) the kernels run on CPU tensors through Triton's interpreter. Its dot multiplies
bfloat16 tiles as their raw 16-bit patterns and its fp32 -> bf16 casts truncate, so there the launchers ask the kernels
to compute in fp32 (INTERPRET), as the torch reference does on CPU; on a GPU 16-bit tiles go to the tensor cores, as
under torch.autocast.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for a kernel's dots on tiles of this dtype: IEEE fp32 for fp32 tiles (no TF32) and
    under the interpreter, where 16-bit tiles are upcast first; 16-bit tiles straight to the tensor cores on a GPU."""
    wide = dtype == torch.float32
    return ("ieee" if wide or INTERPRET else "tf32"), (INTERPRET and not wide)
