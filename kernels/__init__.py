"""Triton kernels, each with its launcher and the torch reference it is tested and benchmarked against.

Under TRITON_INTERPRET=1 (CI, no GPU) the kernels run on CPU tensors through Triton's interpreter. Its dot multiplies
bfloat16 tiles as their raw 16-bit patterns and its fp32 -> bf16 casts truncate, so there the launchers ask the kernels
to compute in fp32 (INTERPRET), as the torch reference does on CPU; on a GPU 16-bit tiles go to the tensor cores, as
under torch.autocast.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
