"""How faithful an estimated top-k gradient SVD is, against the exact gradient from autograd.

G (m x n) is the exact mean gradient dL/dW; (U~, V~) the estimated top-k bases (m x k, n x k, orthonormal columns).
- captured energy  = ||U~^T G V~||_F^2 / sum_{i<=k} s_i(G)^2: 1.0 for the exact top-k, whatever the order of nearly
  equal singular values; the measure the tests and the benchmarks bound.
- subspace agreement = ||P^T Q||_F^2 / r for two r-column orthonormal bases P, Q: 1.0 for the same subspace, r/n for
  unrelated random ones.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .experts import ExpertParameter
from .lora import features


def exact_gradients(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Oracle: autograd dL/dW (out x in, E x out x in for an expert stack) of every target (weights made trainable
    for the call), in fp32, mean over the batches, the model in eval mode (as the estimate runs it: no dropout)."""
    for m in targets.values():
        m.weight.requires_grad_(True)
    grads = {n: torch.zeros(features(m), dtype=torch.float32, device=m.weight.device) for n, m in targets.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch).loss.backward()
            for name, m in targets.items():
                grad = m.weight.grad.mT if stored_transposed(m) else m.weight.grad
                grads[name] += grad.float() / len(batches)
                m.weight.grad = None
    finally:
        for m in targets.values():
            m.weight.requires_grad_(False)
        model.train(was_training)
    return grads


def stored_transposed(target) -> bool:
    """Whether the target stores its weight as (in x out): GPT-2's Conv1D, a transposed expert stack (gpt-oss)."""
    return isinstance(target, Conv1D) or (isinstance(target, ExpertParameter) and target.owner.is_transposed)


def captured_energy(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T G V||_F^2 over the top-k exact squared singular values of G, k = U.shape[-1]; for a stack of gradients
    (E x m x n, an expert stack's) both summed over the stack."""
    G = G.double()
    top = torch.linalg.svdvals(G)[..., :U.shape[-1]].pow(2).sum()
    return float((U.double().mT @ G @ V.double()).pow(2).sum() / top)


def subspace_agreement(P: torch.Tensor, Q: torch.Tensor) -> float:
    """||P^T Q||_F^2 / r for orthonormal P, Q (d x r)."""
    return float((P.double().T @ Q.double()).pow(2).sum() / P.shape[1])
