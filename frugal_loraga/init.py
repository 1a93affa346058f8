"""Initial adapter factors: LoRA-GA from the gradient's singular vectors, or plain LoRA.

LoRA-GA (reference code's choices), with G ~ U diag(S) V^T the top-2r SVD of the layer's gradient (m x n):
  ArB2r: A0 = V[:, :r]^T (r x n),     B0 = U[:, r:2r] (m x r)
  A2rBr: A0 = V[:, r:2r]^T,           B0 = U[:, :r]
  scale stable: A0, B0 *= m^(1/4) / sqrt(gamma);  gd: A0, B0 /= eta;  unit: unchanged.  S is not used.
The model stays unchanged at step 0 because the frozen copy (A0, B0) is subtracted (see lora.py).
Plain LoRA: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B = 0.
"""
from __future__ import annotations

import math

import torch

from .svd import LayerSVD


def lora_ga_factors(svd: LayerSVD, rank: int, direction: str, scale: str, gamma: float,
                    eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r x n), B0 (m x r)) in fp32."""
    U, V, r = svd.U.float(), svd.V.float(), rank
    if direction == "ArB2r":
        A0, B0 = V[:, :r].T, U[:, r:2 * r]
    else:
        A0, B0 = V[:, r:2 * r].T, U[:, :r]
    m = U.shape[0]
    factor = {"stable": m ** 0.25 / gamma ** 0.5, "gd": 1 / eta, "unit": 1.0}[scale]
    return (A0 * factor).contiguous(), (B0 * factor).contiguous()


def lora_factors(out_features: int, in_features: int, rank: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r x n) Kaiming-uniform, B (m x r) zeros) in fp32."""
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_ with a = sqrt(5) gives U(-1/sqrt(n), 1/sqrt(n))
    A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return A.to(device), torch.zeros(out_features, rank, device=device)
