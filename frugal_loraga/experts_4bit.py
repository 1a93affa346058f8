"""Mixture-of-experts expert stacks in NF4 on a 4-bit base: transformers' 4-bit loading quantizes linear layers only,
and an MoE's experts are most of its weights (Qwen3-30B-A3B's: 54 GiB of 57 in 16 bits, about 15 in NF4).

While a model loads (quantizing_expert_stacks), each expert stack (E x d1 x d2: experts.PROJECTIONS of an experts
module) is quantized whole as it arrives, by bitsandbytes' quantize_4bit: NF4 codes in blocks of 64 over the flattened
stack and double-quantized scales, the bytes of quantizing each expert alone and concatenating. Only one 16-bit stack
is in memory at a time. Once loaded (dequantize_on_read), each stack is a parametrization of its module: reading
experts.gate_up_proj returns the whole stack dequantized (E x d1 x d2, the dtype it loaded in), so transformers' own
forward, generation, and experts.AdaptedExperts read it as before; a backward keeps that copy for its layer's dX.

This replaces two methods of transformers' bitsandbytes quantizer class for the duration of the load
(param_needs_quantization, get_quantize_ops): private API that transformers 5.17 to 5.24 have. Where they are missing,
the stacks load in 16 bits and models.warn_unquantized says so.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .experts import PROJECTIONS, is_experts, stacks


def is_expert_stack(model: nn.Module, name: str) -> bool:
    """Whether the parameter `name` (model.layers.0.mlp.experts.gate_up_proj) is an expert stack."""
    owner, _, param = name.rpartition(".")
    if param not in PROJECTIONS:
        return False
    try:
        return is_experts(model.get_submodule(owner))
    except AttributeError:
        return False


def quantize_stack(stack: torch.Tensor) -> nn.Parameter:
    """stack (E x d1 x d2) -> its packed NF4 codes (E d1 d2 / 2 x 1, uint8) as a frozen parameter, the bitsandbytes
    QuantState (shape, scales, their double quantization) as its quant_state."""
    from bitsandbytes.functional import quantize_4bit
    packed, state = quantize_4bit(stack, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed = nn.Parameter(packed, requires_grad=False)
    packed.quant_state = state
    return packed


class QuantizeStacks:
    """transformers' quantize operation for a loading parameter, expert stacks added: they go to quantize_stack, the
    rest to the quantizer's own operation."""

    def __init__(self, linear_operation):
        self.linear_operation = linear_operation

    def convert(self, input_dict: dict, model: nn.Module = None, **kwargs) -> dict:
        names = [name for name in input_dict if is_expert_stack(model, name)]
        rest = {name: value for name, value in input_dict.items() if name not in names}
        converted = self.linear_operation.convert(rest, model=model, **kwargs) if rest else {}
        for name in names:
            value = input_dict[name]
            converted[name] = quantize_stack(value[0] if isinstance(value, list) else value)
        return converted


def loads_stacks_in_4bit() -> bool:
    """Whether this transformers has the quantizer methods quantizing_expert_stacks replaces."""
    try:
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    except ImportError:
        return False
    return all(hasattr(Bnb4BitHfQuantizer, m) for m in ("param_needs_quantization", "get_quantize_ops"))


LOADING = threading.Lock()  # one load at a time sees the quantizer as it wants it


@contextlib.contextmanager
def quantizing_expert_stacks(enabled: bool = True) -> Iterator[None]:
    """While inside (and enabled, with a transformers that loads_stacks_in_4bit), a 4-bit load quantizes expert stacks
    too (quantize_stack). The quantizer's class gets its methods back on exit. Loads under this context, enabled or
    not, run one at a time (LOADING), so that another thread's load never sees the wrong quantizer."""
    with LOADING:
        if not (enabled and loads_stacks_in_4bit()):
            yield
            return
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer as Quantizer
        needs_quantization, quantize_operation = Quantizer.param_needs_quantization, Quantizer.get_quantize_ops
        Quantizer.param_needs_quantization = lambda self, model, name, **kwargs: (
            needs_quantization(self, model, name, **kwargs) or is_expert_stack(model, name))
        Quantizer.get_quantize_ops = lambda self: QuantizeStacks(quantize_operation(self))
        try:
            yield
        finally:
            Quantizer.param_needs_quantization, Quantizer.get_quantize_ops = needs_quantization, quantize_operation


class DequantizedStack(nn.Module):
    """The parametrization of a 4-bit expert stack: its packed codes -> the stack (E x d1 x d2)."""

    def __init__(self, quant_state):
        super().__init__()
        self.quant_state = quant_state

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.quant_state.shape)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return dequantize(packed, self.quant_state)


@torch.compiler.disable
def dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' dequantization of a whole stack, kept out of compiled graphs (its state is a Python object,
    different for each stack)."""
    from bitsandbytes.functional import dequantize_4bit
    return dequantize_4bit(packed, quant_state)


def drop_stacks(model: nn.Module) -> None:
    """Remove the DequantizedStack parametrizations, their packed stacks with them: torch's parametrized class holds
    its module in a reference cycle, which would keep the stacks in memory until Python's cyclic collector runs."""
    for module in model.modules():
        for param in list(getattr(module, "parametrizations", {})):
            if isinstance(module.parametrizations[param][0], DequantizedStack):
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)


def dequantize_on_read(model: nn.Module) -> None:
    """Make each 4-bit expert stack of the loaded model (quantize_stack's) a DequantizedStack parametrization of its
    module, in the order the module registered them."""
    for module in model.modules():
        for param in stacks(module) if is_experts(module) else []:
            packed = module._parameters.get(param)
            if packed is not None and getattr(packed, "quant_state", None) is not None:
                parametrize.register_parametrization(module, param, DequantizedStack(packed.quant_state), unsafe=True)
