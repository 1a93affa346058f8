"""A bitsandbytes 4-bit weight dequantized by plain torch ops, so that torch.compile fuses it into the layer.

bitsandbytes packs W (m x n, row-major, i = flat index) two 4-bit codes per byte, high nibble first, with one scale
per block of 64:          W[i] = code[c_i] * absmax[i // 64]          (code: the 16 NF4 values, fp32)
With double quant the scales are themselves 8-bit, one scale per block of 256 of them:
                          absmax[j] = code2[q_j] * absmax2[j // 256] + offset
Products are fp32, then cast to the compute dtype, as bitsandbytes computes them. Inside a compiled decoder layer
these gathers and products become one generated kernel feeding the GEMM; bitsandbytes' own 4-bit matmul is an opaque
custom op whose Python wrapper runs on every call, which left a compiled 4-bit training step waiting on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FourBitWeight(nn.Module):
    """Views of a Linear4bit's packed weight and scales as non-persistent buffers (no copy, no state-dict entries);
    calling it returns W (m x n) in the layer's compute dtype."""

    def __init__(self, base: nn.Module):
        super().__init__()
        weight, state = base.weight, base.weight.quant_state
        self.shape, self.blocksize, self.dtype = tuple(state.shape), state.blocksize, base.compute_dtype
        self.register_buffer("packed", weight.data.view(-1), persistent=False)
        self.register_buffer("code", state.code, persistent=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.nested = state.nested
        if self.nested:
            self.blocksize2 = state.state2.blocksize
            self.register_buffer("code2", state.state2.code, persistent=False)
            self.register_buffer("absmax2", state.state2.absmax, persistent=False)
            self.register_buffer("offset", state.offset, persistent=False)

    @classmethod
    def of(cls, base: nn.Module) -> Optional["FourBitWeight"]:
        """For a quantized bitsandbytes Linear4bit, else None."""
        quant_state = getattr(getattr(base, "weight", None), "quant_state", None)
        return cls(base) if quant_state is not None else None

    def scales(self) -> torch.Tensor:
        """The per-block scales absmax in fp32."""
        if not self.nested:
            return self.absmax.float()
        scales = per_block(self.code2[self.absmax.long()], self.blocksize2, self.absmax2) + self.offset
        return scales[:self.absmax.numel()]

    def forward(self) -> torch.Tensor:
        codes = torch.stack((self.packed >> 4, self.packed & 15), dim=1).view(-1)
        values = per_block(self.code[codes.long()], self.blocksize, self.scales())
        return values[:self.shape[0] * self.shape[1]].view(self.shape).to(self.dtype)


def per_block(values: torch.Tensor, blocksize: int, scales: torch.Tensor) -> torch.Tensor:
    """values[i] * scales[i // blocksize] for the len(scales) * blocksize values (those past the end of `values`
    zero), by broadcasting over a (blocks x blocksize) view rather than gathering by an index per value, which a
    compiled backward writes out whole: 8 bytes a weight."""
    values = F.pad(values, (0, scales.numel() * blocksize - values.numel()))
    return (values.view(-1, blocksize) * scales[:, None]).view(-1)
