"""The torch-op dequantization of 4-bit weights that compiled layers use, against bitsandbytes' own."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from frugal_loraga.lora import FrozenLinear  # noqa: E402
from frugal_loraga.nf4 import FourBitWeight  # noqa: E402


def four_bit_linear(m: int, n: int, nested: bool, dtype: torch.dtype, quant_type: str = "nf4", bias: bool = False):
    torch.manual_seed(m + n)
    dense = torch.nn.Linear(n, m, bias=bias)
    layer = bnb.nn.Linear4bit(n, m, bias=bias, compute_dtype=dtype, compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type)._quantize("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer


@pytest.mark.parametrize("m,n,nested,dtype,quant_type", [
    (97, 200, True, torch.bfloat16, "nf4"),     # 19400 values: the last block of 64 is partial
    (96, 200, False, torch.float32, "nf4"),     # plain fp32 scales
    (300, 1030, True, torch.float32, "nf4"),    # 4828 scales: the last block of 256 scales is partial
    (64, 129, True, torch.bfloat16, "fp4"),     # 8256 values: the last block of 64 is partial, in fp4
    (63, 129, True, torch.bfloat16, "nf4"),     # 8127 values, odd: the last byte holds one value
])
def test_dequantized_weight_equals_bitsandbytes(m, n, nested, dtype, quant_type):
    """Tolerance: none. Same fp32 products in the same order, then one cast."""
    layer = four_bit_linear(m, n, nested, dtype, quant_type)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    four_bit = FourBitWeight.of(layer)
    assert torch.equal(four_bit(), expected)
    assert four_bit.state_dict() == {}  # views only: nothing new in checkpoints


def test_not_four_bit():
    assert FourBitWeight.of(torch.nn.Linear(3, 4)) is None


def test_compiled_frozen_linear_matches_the_bitsandbytes_layer(monkeypatch):
    """The path LoraLinear and the estimate's taps take under torch.compile, run eagerly: fp32 compute, so only GEMM
    order differs."""
    base = four_bit_linear(80, 72, True, torch.float32, bias=True)
    layer = FrozenLinear(base)
    x = torch.randn(3, 5, 72)
    expected = base(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_compiled_four_bit_layer_keeps_no_dequantized_weight_for_backward():
    """Compiled, the layer keeps for backward only what it already holds (the packed codes and scales) and its input,
    never the m x n dequantized W, which it makes again in backward; its input's gradient is eager's. In a
    checkpointed block (recompute_weight off) it keeps W."""
    base = four_bit_linear(96, 160, True, torch.float32)
    layer = FrozenLinear(base)
    x = torch.randn(2, 3, 160, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = torch.compile(layer, fullgraph=True)(x)
    assert kept and not any(t.numel() >= 96 * 160 and t.is_floating_point() for t in kept)
    grad = torch.autograd.grad(y.square().sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(base(x).square().sum(), x)[0], rtol=1e-5, atol=1e-5)
    layer.recompute_weight = False  # as in a checkpointed block: W kept, dequantized once
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        torch.compile(layer, fullgraph=True)(x)
    assert any(t.shape == (96, 160) and t.is_floating_point() for t in kept)
