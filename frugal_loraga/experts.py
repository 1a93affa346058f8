"""Mixture-of-experts experts as targets: LoRA on every expert of transformers' fused expert stacks.

transformers keeps an MoE layer's E experts in one module (the @use_experts_implementation classes: Mixtral, Qwen2-MoE,
Qwen3-MoE, gpt-oss, ...), each projection as a 3-D parameter: gate_up_proj (or up_proj) and down_proj, expert e's
weight W_e (m x n, y = x W_e^T) stored as (E, m, n), or as (E, n, m) where the module is_transposed. A token x routed
to its top-k experts e with weights w_e gives  sum_e w_e down_e(gate(gate_up_e(x))).
Each such parameter is a target of its own, named <experts module>.<parameter> (model.layers.3.mlp.experts.down_proj),
adapted expert by expert as lora.py adapts a linear layer:
  y_e = x W_e^T + eta ((x A_e^T) B_e^T - (x A0_e^T) B0_e^T)      A (E x r x n), B (E x m x r), A0, B0 frozen
and LoRA-GA's gradient of an expert is dL/dW_e = dY_e^T X_e over the tokens routed to it (the routing weight is in dY).
While adapted or tapped, the experts module is replaced by AdaptedExperts: the grouped forward of transformers'
grouped_mm implementation (the tokens sorted by expert, each projection by transformers' grouped matmul), so that the
base's bits are the model's own, with a part after each adapted projection: an ExpertsTap (the estimate) or an
ExpertsLora (training). Routers are not expert stacks (find_targets leaves the linear layers beside the experts
out). On a 4-bit base the stacks are NF4 (experts_4bit.py), read dequantized.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' grouped matmul of its experts: ours then gives the model's own bits
    from transformers.integrations.moe import _grouped_linear as grouped_linear
except ImportError:  # a transformers without it (a private function): experts are not adapted
    grouped_linear = None


PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")  # the experts' 3-D parameters that can be adapted


def is_experts(module: nn.Module) -> bool:
    """Whether the module is a transformers experts module (fused 3-D expert stacks)."""
    return hasattr(module, "is_transposed") and hasattr(module, "num_experts") and bool(stacks(module))


def stacks(module: nn.Module) -> list[str]:
    """The expert stacks (3-D PROJECTIONS) a module holds, in the order it registered them: a 4-bit stack is a
    parametrization (experts_4bit.py), and all of a module's are made so in that order."""
    names = [*getattr(module, "parametrizations", {}), *module._parameters]
    return [p for p in names if p in PROJECTIONS and len(stack_shape(module, p) or ()) == 3]


def stack_shape(module: nn.Module, param: str) -> Optional[torch.Size]:
    """The shape of the module's parameter `param` (E x d1 x d2 for an expert stack), read without dequantizing a 4-bit
    stack: its quant_state knows it (experts_4bit.py), and so does its DequantizedStack once it is one."""
    parametrizations = getattr(module, "parametrizations", {})
    if param in parametrizations:
        return getattr(parametrizations[param][0], "shape", None)
    tensor = module._parameters.get(param)
    if tensor is None:
        return None
    state = getattr(tensor, "quant_state", None)
    return tensor.shape if state is None else torch.Size(state.shape)


class ExpertParameter:
    """A target: the expert stack `param` of an experts module, its experts' weights in math orientation
    (E x m x n). Stands in the targets as a linear layer does; its experts module is what goes back into the model
    (lora.replace puts a part's `owner` in place of the module)."""

    def __init__(self, experts: nn.Module, param: str, top_k: int):
        self.owner, self.param, self.top_k = experts, param, top_k

    @property
    def weight(self) -> torch.Tensor:
        """The stack as the model reads it (dequantized, where it is 4-bit)."""
        return getattr(self.owner, self.param)

    @property
    def shape(self) -> tuple[int, int, int]:
        E, d1, d2 = stack_shape(self.owner, self.param)
        return (E, d2, d1) if self.owner.is_transposed else (E, d1, d2)


def expert_parameters(model: nn.Module) -> dict[str, ExpertParameter]:
    """Every expert stack of the model by name (<experts module>.<parameter>), in the order of its parameters."""
    if grouped_linear is None:
        return {}
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    return {f"{name}.{p}": ExpertParameter(module, p, top_k) for name, module in model.named_modules()
            if is_experts(module) for p in stacks(module)}


def dequantized(targets: dict) -> frozenset:
    """The expert stacks read through a parametrization (4-bit ones, experts_4bit.py): each read is a new dequantized
    copy (E x m x n), which a backward keeps."""
    return frozenset(name for name, t in targets.items()
                     if isinstance(t, ExpertParameter) and t.param in getattr(t.owner, "parametrizations", {}))


def routes(targets: dict) -> dict[str, int]:
    """Expert stack name -> the experts each token is routed to (top-k), for memory.activation_bytes."""
    return {name: t.top_k for name, t in targets.items() if isinstance(t, ExpertParameter)}


class AdaptedExperts(nn.Module):
    """An experts module run by our grouped forward, with a part (ExpertsTap or ExpertsLora) after each adapted
    projection. Without parts it gives the bits of transformers' grouped_mm experts forward."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts
        self.parts = nn.ModuleDict()

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden (T x H), top_k_index and top_k_weights (T x k) -> (T x H)."""
        experts, k = self.experts, top_k_index.shape[-1]
        expert_ids, order = torch.sort(top_k_index.reshape(-1))  # the T k (token, expert) pairs grouped by expert
        x = hidden[order // k]
        counts = torch.histc(expert_ids.int() if hidden.device.type == "cuda" else expert_ids.float(),  # CUDA's
                             bins=experts.num_experts, min=0, max=experts.num_experts - 1)  # takes ints, others floats
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # group e ends at row offsets[e]
        up = "gate_up_proj" if experts.has_gate else "up_proj"
        h = self.project(up, x, offsets, expert_ids)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        y = self.project("down_proj", h, offsets, expert_ids)
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        unsorted = torch.empty_like(order)
        unsorted[order] = torch.arange(order.numel(), device=order.device)
        return y[unsorted].view(hidden.shape[0], k, -1).sum(dim=1).to(hidden.dtype)

    def project(self, param: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """One projection of the grouped rows x (S x n): the base's, then its part's."""
        experts = self.experts
        bias = getattr(experts, f"{param}_bias")[expert_ids] if experts.has_bias else None
        y = grouped_linear(x, getattr(experts, param), offsets, bias=bias, is_transposed=experts.is_transposed)
        return self.parts[param](y, x, offsets) if param in self.parts else y


def adapted(parts: dict[str, nn.Module]) -> None:
    """Put each part (name: <experts module>.<parameter>) into the AdaptedExperts of its experts module (one per
    module), and make that its owner."""
    wrappers: dict[int, AdaptedExperts] = {}
    for name, part in parts.items():
        target: ExpertParameter = part.target
        if id(target.owner) not in wrappers:
            wrappers[id(target.owner)] = AdaptedExperts(target.owner)
        wrapper = wrappers[id(target.owner)]
        wrapper.parts[target.param] = part
        part.__dict__["owner"] = wrapper  # not a submodule: the wrapper holds the part


def grouped_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(x_e A_e^T) B_e^T for the rows x_e (of x, S x n, grouped by expert, group e ending at row offsets[e]) of each
    expert: S x m. On bf16 rows, two calls of torch's grouped matmul with the adapter cast to bf16 (as autocast computes
    a linear layer's adapter), where the rank keeps its rows 16-byte aligned; else grouped_lora_reference."""
    if x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm") and A.shape[1] % 8 == 0:
        h = F.grouped_mm(x, A.to(x.dtype).mT, offs=offsets)  # S x r
        return F.grouped_mm(h, B.to(x.dtype).mT, offs=offsets)
    return grouped_lora_reference(x, A, B, offsets)


def grouped_lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_lora expert by expert, in fp32 (bf16 under CUDA autocast), one sync with the device for the offsets."""
    rows, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            rows.append((x[start:end].float() @ A[e].T) @ B[e].T)
        start = end
    return torch.cat(rows)


class ExpertsLora(nn.Module):
    """The adapter of an expert stack: A (E x r x n), B (E x m x r) trainable fp32, A0, B0 their frozen initial
    copies (empty for plain LoRA). No correction (L, R empty): the experts are not 4-bit."""

    def __init__(self, target: ExpertParameter, A: torch.Tensor, B: torch.Tensor, A0: Optional[torch.Tensor],
                 B0: Optional[torch.Tensor], eta: float):
        super().__init__()
        self.target, self.eta = target, eta
        self.A = nn.Parameter(A.float().clone())
        self.B = nn.Parameter(B.float().clone())
        empty = A.new_zeros(0)
        self.register_buffer("A0", empty if A0 is None else A0.float().clone())
        self.register_buffer("B0", empty if B0 is None else B0.float().clone())
        self.register_buffer("L", empty.clone())
        self.register_buffer("R", empty.clone())

    @property
    def has_frozen(self) -> bool:
        return self.A0.numel() > 0

    @property
    def correction(self) -> None:
        return None

    def forward(self, y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """y + eta ((x A_e^T) B_e^T - (x A0_e^T) B0_e^T): at step 0 the two products are the same bits, so y is
        returned unchanged."""
        delta = grouped_lora(x, self.A, self.B, offsets)
        if self.has_frozen:
            delta = delta - grouped_lora(x, self.A0, self.B0, offsets)
        return (y.float() + self.eta * delta.float()).to(y.dtype)


def inject_experts(targets: dict[str, ExpertParameter], factors: dict[str, tuple], eta: float
                   ) -> dict[str, ExpertsLora]:
    """An ExpertsLora for each expert stack named in factors (name -> (A, B, A0 | None, B0 | None), stacked per
    expert), in AdaptedExperts owners for lora.replace to put in the model."""
    layers = {name: ExpertsLora(targets[name], *factors[name], eta) for name in factors}
    adapted(layers)
    return layers


def to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E x r x n), B (E x m x r) -> PEFT's lora_A (E r x n, grouped by expert) and lora_B (m x r E, grouped by
    rank: column j E + e is column j of B_e), the layout of its target_parameters adapters (ParamWrapper)."""
    E, r, n = A.shape
    return A.reshape(E * r, n).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous()


def peft_prefixes(layers: dict[str, ExpertsLora]) -> dict[str, str]:
    """Expert stack name -> its adapter's key prefix in PEFT: the stacks adapted in one experts module nest, the first
    registered innermost (<module>.base_layer.lora_A for it when two are adapted)."""
    by_module: dict[str, list[str]] = {}
    for name in layers:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    prefixes = {}
    for module, names in by_module.items():
        registered = stacks(layers[names[0]].target.owner)
        names.sort(key=lambda name: registered.index(layers[name].target.param))
        for i, name in enumerate(names):
            prefixes[name] = f"base_model.model.{module}" + ".base_layer" * (len(names) - 1 - i)
    return prefixes
