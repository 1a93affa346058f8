"""The LoRA layer with a frozen initial adapter beside the trainable one, and putting it into a model.

  y = base(x) + (x R^T) L^T + eta * ((x A^T) B^T - (x A0^T) B0^T)
base: the frozen linear layer (nn.Linear, bitsandbytes Linear4bit or GPT-2's Conv1D), W (m x n), never requantized;
L (m x q), R (q x n): a frozen correction of a 4-bit base's quantization error (nf4_error.py), empty without one;
A (r x n), B (m x r): trainable fp32; A0, B0: frozen copies of their initial values (LoRA-GA), empty for plain LoRA.
At step 0 A == A0 and B == B0 bit for bit, so the two products cancel exactly: the model is the base (with its
correction) unchanged.
The sum (correction included) is computed by kernels.lora.lora_add: one fused Triton shrink/expand on CUDA, the torch
reference elsewhere (or where Triton is not installed). At step 0 it gives the bits of the corrected base alone.
Inside torch.compile a 4-bit base is dequantized by torch ops (nf4.py) that fuse into the compiled layer (FrozenLinear,
which the LoRA-GA gradient estimate wraps around its targets too), and again in backward for dx = dy W rather than
kept, but in checkpointed blocks and in blocks the card has room for (blocks.keeping_weights).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from .kernels.lora import lora_add

from .config import ALL_LINEAR, ConfigError
from .experts import ExpertParameter, expert_parameters, inject_experts
from .nf4 import FourBitWeight

log = logging.getLogger("frugal_loraga")
LINEAR = (nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layer, its weight stored as (in x out)


def features(target) -> tuple[int, ...]:
    """The shape of a target's weight as y = x W^T sees it: (out, in) = m x n of a linear layer, (E, m, n) of an
    expert stack (experts.py)."""
    if isinstance(target, ExpertParameter):
        return target.shape
    if isinstance(target, Conv1D):
        return target.nf, target.nx
    return target.out_features, target.in_features


Correction = tuple[torch.Tensor, torch.Tensor]  # (L (m x q), R (q x n)): y += (x R^T) L^T


class FrozenLinear(nn.Module):
    """A frozen linear layer (nn.Linear or bitsandbytes Linear4bit) W (m x n): y = base(x) [+ (x R^T) L^T, a frozen
    correction, by kernels.lora.lora_add]. Inside torch.compile a 4-bit base is dequantized by torch ops (nf4.py) with
    bitsandbytes' casts, so that it fuses into the layer."""

    def __init__(self, base: nn.Module, correction: Correction | None = None):
        super().__init__()
        self.base = base
        self.four_bit = FourBitWeight.of(base)
        # compiled, a 4-bit W is dequantized again in backward rather than kept from forward to backward (as much as
        # the layer's activations); blocks.keeping_weights turns that off in checkpointed blocks, which hold it
        # only while their own backward runs, and in blocks whose copies the card has room for
        self.recompute_weight = True
        empty = torch.zeros(0, device=next(base.parameters()).device)
        L, R = correction if correction is not None else (empty, empty)
        self.register_buffer("L", L.float())  # frozen: the estimate's taps and the LoRA layers share one copy
        self.register_buffer("R", R.float())

    @property
    def correction(self) -> Correction | None:
        return (self.L, self.R) if self.R.numel() else None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x), without the correction."""
        if self.four_bit is not None and torch.compiler.is_compiling():
            dtype = self.four_bit.dtype
            bias = None if self.base.bias is None else self.base.bias.to(dtype)
            recompute = torch.is_grad_enabled() and self.recompute_weight  # read only with grad: one no-grad graph
            weight = checkpoint(self.four_bit, use_reentrant=False) if recompute else self.four_bit()
            return F.linear(x.to(dtype), weight, bias).to(x.dtype)
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.R.numel():  # the correction as a frozen adapter of scale 1: the dots LoraLinear's fused call makes
            y = lora_add(y, x, self.R, self.L, self.R[:0], self.L[:, :0], 1.0)
        return y


class LoraLinear(FrozenLinear):
    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor | None,
                 B0: torch.Tensor | None, eta: float, correction: Correction | None = None):
        super().__init__(base, correction)
        self.eta = eta
        self.A = nn.Parameter(A.float().clone())
        self.B = nn.Parameter(B.float().clone())
        empty = A.new_zeros(0)
        self.register_buffer("A0", empty if A0 is None else A0.float().clone())
        self.register_buffer("B0", empty if B0 is None else B0.float().clone())

    @property
    def has_frozen(self) -> bool:
        return self.A0.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_add(self.base_forward(x), x, self.A, self.B, self.A0, self.B0, self.eta, self.R, self.L)


def find_targets(model: nn.Module, targets: list[str], rank: int, init: str) -> dict:
    """What to adapt: for 'all-linear' every linear layer but the output head and a mixture of experts' routers (the
    linear layers beside its experts: gates such as Qwen2-MoE's shared_expert_gate too), and every expert stack
    (experts.py); else the linear layers named or whose names end in '.<suffix>', and the expert stacks named in full
    or as '<module>.<parameter>' (experts.down_proj: a bare down_proj is a linear layer's name). A layer narrower
    than the rank needs is refused when named, and left out of all-linear with a warning naming it (refused if that
    leaves none)."""
    head = model.get_output_embeddings()
    routers = {id(child) for module in model.modules() if hasattr(module, "experts") for child in module.children()}
    linear = {name: module for name, module in model.named_modules() if isinstance(module, LINEAR)}
    candidates = {**linear, **expert_parameters(model)}
    if targets == [ALL_LINEAR]:
        found = {name: target for name, target in candidates.items()
                 if target is not head and id(target) not in routers}
    else:
        found = {name: target for name, target in candidates.items() if any(
            name == t or name.endswith("." + t) and (name in linear or "." in t) for t in targets)}
        for name, module in model.named_modules():
            if name not in candidates and any(name == t or name.endswith("." + t) for t in targets):
                raise ConfigError(f"target {name} is a {type(module).__name__}; only linear layers and mixture-of-"
                                  "experts expert stacks can be adapted")
    suffixes = sorted({n.rsplit(".", 1)[-1] if n in linear else ".".join(n.rsplit(".", 2)[-2:]) for n in candidates})
    unmatched = [t for t in targets if t != ALL_LINEAR and not any(n == t or n.endswith("." + t) for n in found)]
    if not found or unmatched:
        raise ConfigError(f"no module matches target_modules {', '.join(unmatched or targets)}; "
                          f"linear layers here: {', '.join(suffixes)} (or all-linear)")
    need = 2 * rank if init == "lora_ga" else rank
    narrow = {name: features(t)[-2:] for name, t in found.items() if need > min(features(t)[-2:])}
    if narrow and (targets != [ALL_LINEAR] or len(narrow) == len(found)):
        name, (m, n) = next(iter(narrow.items()))
        raise ConfigError(f"rank {rank} is too large for {name} ({m} x {n}): {init} needs {need} <= {min(m, n)}; "
                          "lower rank")
    if narrow:
        log.warning("left out %d layer(s) narrower than rank %d needs (%d): %s", len(narrow), rank, need,
                    ", ".join(f"{name} ({m} x {n})" for name, (m, n) in narrow.items()))
    return {name: target for name, target in found.items() if name not in narrow}


def named_targets(model: nn.Module, names: list[str]) -> dict:
    """The targets of these names (as find_targets names them): linear layers and expert stacks."""
    stacks = expert_parameters(model)
    return {name: stacks[name] if name in stacks else model.get_submodule(name) for name in names}


def check_correction_rank(targets: dict[str, nn.Module], rank: int) -> None:
    """Refuses a 4-bit error correction (nf4_error.py) of a rank no target layer has: a layer m x n has rank at most
    min(m, n), and a correction past it would hold only zeros."""
    linear = [min(features(module)) for module in targets.values() if not isinstance(module, ExpertParameter)]
    widest = max(linear, default=0)
    if linear and rank > widest:  # expert stacks are not 4-bit: they get no correction
        raise ConfigError(f"nf4_error_rank {rank} is above the rank of every adapted layer (at most {widest} here: a "
                          f"layer m x n has rank min(m, n)); lower nf4_error_rank to {widest} or less (16 is the "
                          "default)")


def replace(model: nn.Module, modules: dict) -> None:
    """Put each module in the model under its name, in place of what is there; for an expert stack's target, tap or
    adapter (experts.py), its owner in place of its experts module."""
    for name, module in modules.items():
        owner = getattr(module, "owner", None)
        if owner is not None:
            name, module = name.rpartition(".")[0], owner
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, factors: dict[str, tuple], eta: float,
           corrections: dict[str, Correction] | None = None) -> dict[str, nn.Module]:
    """Replace each named linear layer by a LoraLinear around it, and each named expert stack's experts module by an
    AdaptedExperts with an ExpertsLora for it (experts.py). factors: name -> (A, B, A0 | None, B0 | None), stacked per
    expert for an expert stack; corrections: name -> (L, R) for the layers that have one (nf4_error.py)."""
    corrections = corrections or {}
    stacks = expert_parameters(model)
    layers = inject_experts(stacks, {name: f for name, f in factors.items() if name in stacks}, eta)
    layers.update({name: LoraLinear(model.get_submodule(name), A, B, A0, B0, eta, corrections.get(name))
                   for name, (A, B, A0, B0) in factors.items() if name not in stacks})
    replace(model, layers)
    return {name: layers[name] for name in factors}
