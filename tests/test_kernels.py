"""Each Triton kernel against its torch reference: shapes that are not block multiples, dtypes, ranks, forward and
backward. On CPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest); on a GPU, compiled."""
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from frugal_loraga.kernels import lora as kernels
from frugal_loraga.kernels.cross_entropy import cross_entropy_grad_reference_, cross_entropy_grad_triton_
from frugal_loraga.kernels.lora import MAX_RANK, NONE, lora_add, lora_add_reference, lora_add_triton, triton

pytestmark = pytest.mark.skipif(triton is None, reason="Triton is not installed (a CPU install): the kernels cannot "
                                                       "run, not even in its interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}
if DEVICE == "cuda":  # there the reference rounds every product to 16 bits under autocast; the kernel keeps fp32 longer
    TOLERANCE.update({torch.bfloat16: dict(rtol=6e-2, atol=6e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)})
DTYPES = list(TOLERANCE)


def adapter(rank, n, m, frozen, trained=True):
    A, B = torch.randn(rank, n, device=DEVICE) / n ** 0.5, torch.randn(m, rank, device=DEVICE) / rank ** 0.5
    A0, B0 = (A.clone(), B.clone()) if frozen else (torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE))
    if frozen and trained:  # as after some training: A, B moved away from A0, B0
        A, B = A + 0.1 * torch.randn_like(A), B + 0.1 * torch.randn_like(B)
    return A.requires_grad_(), B.requires_grad_(), A0, B0


def correction(rank, n, m):
    """(R (rank x n), L (m x rank)): a frozen correction of the base (nf4_error.py), none for rank 0."""
    if not rank:
        return NONE, NONE
    return torch.randn(rank, n, device=DEVICE) / n ** 0.5, 0.1 * torch.randn(m, rank, device=DEVICE) / rank ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 4, 8, 24])
@pytest.mark.parametrize("frozen", [True, False], ids=["lora_ga", "lora"])
@pytest.mark.parametrize("shape", [(3, 13, 50, 70), (1, 5, 129, 33)])
@pytest.mark.parametrize("corrected", [0, 5], ids=["", "corrected"])
def test_fused_lora_matches_reference_forward_and_backward(dtype, rank, frozen, shape, corrected):
    assert_matches_reference(dtype, rank, frozen, shape, corrected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_lora_over_more_tokens_than_a_training_batch(dtype):
    """Past 8192 tokens the shrink takes another tile (kernels.shrink_tile), as the estimate's long batches do."""
    assert_matches_reference(dtype, 8, True, (2, 4101, 40, 24), 5)


def assert_matches_reference(dtype, rank, frozen, shape, corrected):
    """The kernel's output and gradients (x, A, B, y) against the reference's for x of shape[:-1], y of shape[:-2] +
    shape[-1:], with a tolerance per dtype (the adapter's gradients sum over the tokens: wider)."""
    torch.manual_seed(rank)
    *lead, n, m = shape
    A, B, A0, B0 = adapter(rank, n, m, frozen)
    R, L = correction(corrected, n, m)
    x = torch.randn(*lead, n, device=DEVICE).to(dtype).requires_grad_()
    y = torch.randn(*lead, m, device=DEVICE).to(dtype)
    grad_out = torch.randn(*lead, m, device=DEVICE).to(dtype)
    results = []
    autocast = torch.autocast("cuda", dtype) if DEVICE == "cuda" and dtype != torch.float32 else nullcontext()
    for fn in (lora_add_reference, lora_add_triton):
        base = y.clone().requires_grad_()
        with autocast:  # on a GPU, 16-bit products as under training's autocast
            out = fn(base, x, A, B, A0, B0, 2.0, R, L)
        grads = torch.autograd.grad(out, (x, A, B, base), grad_out)
        results.append((out.detach(), *grads))
    tokens = x.numel() // n
    for name, got, expected in zip(["y", "dx", "dA", "dB", "dy"], results[1], results[0]):
        tolerance = dict(TOLERANCE[dtype])
        if name in ("dA", "dB"):  # sums over the tokens
            tolerance["atol"] *= 4 * tokens ** 0.5
        torch.testing.assert_close(got, expected, **tolerance, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [3, 8, 16], ids=["one_dot", "one_dot_full", "a_dot_each"])  # one dot up to 8
def test_fused_lora_is_bit_exact_at_step_zero(dtype, rank):
    torch.manual_seed(0)
    A, B, A0, B0 = adapter(rank, 70, 50, frozen=True, trained=False)
    x = torch.randn(4, 9, 70, device=DEVICE).to(dtype)
    y = torch.randn(4, 9, 50, device=DEVICE).to(dtype)
    assert torch.equal(lora_add_triton(y, x, A, B, A0, B0, 4.0), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, corrected", [(8, 16), (4, 24)])
def test_fused_lora_at_step_zero_is_the_corrected_base_bit_for_bit(dtype, rank, corrected):
    """With a correction, the adapters cancel and the sum is the correction alone as a frozen layer computes it
    (lora.FrozenLinear: the correction as an adapter of scale 1), to the bit: the model at step 0 is the corrected
    model the gradient was estimated at."""
    torch.manual_seed(0)
    A, B, A0, B0 = adapter(rank, 70, 50, frozen=True, trained=False)
    R, L = correction(corrected, 70, 50)
    x = torch.randn(4, 9, 70, device=DEVICE).to(dtype)
    y = torch.randn(4, 9, 50, device=DEVICE).to(dtype)
    for fn in (lora_add_reference, lora_add_triton):
        corrected_base = fn(y, x, R, L, R[:0], L[:, :0], 1.0)
        assert not torch.equal(corrected_base, y)
        assert torch.equal(fn(y, x, A, B, A0, B0, 4.0, R, L), corrected_base)


@pytest.mark.parametrize("rank, corrected", [(MAX_RANK + 8, 16), (MAX_RANK, 16), (MAX_RANK + 8, 0),
                                              (8, MAX_RANK + 8)])
def test_step_zero_is_the_corrected_base_whichever_path_each_rank_takes(monkeypatch, rank, corrected):
    """lora_add picks the kernel or the reference by rank: a trainable layer at step 0 must still give what its frozen
    twin (the correction as an adapter of scale 1, lora.FrozenLinear) gives, to the bit, also for an adapter wider
    than the kernel holds beside a correction that fits."""
    monkeypatch.setattr(kernels, "fused_available", lambda t: True)  # the GPU's dispatch, here in the interpreter
    torch.manual_seed(0)  # n = 1000: the kernel's blocked sums round differently from torch's, also in the interpreter
    A, B, A0, B0 = adapter(rank, 1000, 300, frozen=True, trained=False)
    R, L = correction(corrected, 1000, 300)
    x = torch.randn(4, 9, 1000, device=DEVICE)
    y = torch.randn(4, 9, 300, device=DEVICE)
    frozen_twin = lora_add(y, x, R, L, R[:0], L[:, :0], 1.0) if corrected else y
    assert torch.equal(lora_add(y, x, A, B, A0, B0, 4.0, R, L), frozen_twin)


@pytest.mark.parametrize("fn", [lora_add_reference, lora_add_triton], ids=["reference", "triton"])
def test_the_output_takes_an_in_place_add(fn):
    """Falcon adds into a layer's output in place (mlp_output += attention_output): the output must not be a view
    made inside an autograd.Function, and the gradients are those of the sum."""
    torch.manual_seed(0)
    A, B, A0, B0 = adapter(4, 70, 50, frozen=True)
    x = torch.randn(3, 13, 70, device=DEVICE).requires_grad_()
    y = torch.randn(3, 13, 50, device=DEVICE).requires_grad_()
    out = fn(y, x, A, B, A0, B0, 2.0)
    out += 1.0
    out.square().sum().backward()
    expected = lora_add_reference(y.detach(), x.detach(), A.detach(), B.detach(), A0, B0, 2.0) + 1.0
    torch.testing.assert_close(out.detach(), expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(y.grad, 2 * expected, **TOLERANCE[torch.float32])


ULP = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
       torch.float16: dict(rtol=2**-10, atol=1e-7)}  # one rounding of the same fp32 value (truncation, interpreted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocabulary", [(1, 50), (3, 4097), (7, 10000)])  # one tile, one past it, three
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["flat", "peaked"])
def test_cross_entropy_kernel_matches_reference(dtype, rows, vocabulary, spread):
    """The rows' losses and the gradient written over the logits (rows 8 columns apart in memory), against the torch
    reference on the same 16-bit logits, the first, the last and a last tile's word among the targets; the gradient's
    rows sum to zero, as softmax - onehot does."""
    torch.manual_seed(rows)
    storage = (spread * torch.randn(rows, vocabulary + 8, device=DEVICE)).to(dtype)
    logits = storage[:, :vocabulary]
    targets = torch.randint(0, vocabulary, (rows,), device=DEVICE)
    targets[:3] = torch.tensor([vocabulary - 1, 0, vocabulary - 2], device=DEVICE)[:rows]
    got, expected = storage.clone()[:, :vocabulary], logits.clone()
    got_losses = cross_entropy_grad_triton_(got, targets, 1.0)
    expected_losses = cross_entropy_grad_reference_(expected, targets, 1.0)
    torch.testing.assert_close(got_losses, expected_losses, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, expected, **ULP[dtype])
    assert torch.equal(got.float().argmin(1), targets)  # the -1 lands on the target
    torch.testing.assert_close(got.float().sum(1), torch.zeros(rows, device=DEVICE), rtol=0, atol=1e-2)
    torch.testing.assert_close(expected_losses, torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="none"), rtol=1e-5, atol=1e-4)


COMPILE_FOR_CONSUMER_CARDS = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from frugal_loraga.kernels import lora
from frugal_loraga.kernels.cross_entropy import VOCABULARY_BLOCK, _cross_entropy_kernel

def shared_bytes(kernel, types, constants, target, num_warps=4):
    signature = {**types, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", target, 32), options={"num_warps": num_warps})
    return compiled.metadata.shared

widest = lora._block(lora.MAX_RANK)
for target in (86,):  # an RTX 3090's (Ada's and Blackwell's consumer cards give the same 99 KiB)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        precision = "ieee" if dtype == torch.float32 else "tf32"
        for tokens in (2048, 16384):
            block_n, block_k = lora.shrink_tile(tokens, dtype)
            types = dict(zip("x_ptr w_ptr out_ptr".split(), [f"*{name}", f"*{name}", "*fp32"]))
            types.update({p: "i32" for p in "N K S1 S Q stride_xn stride_xk stride_wc stride_wk stride_on".split()})
            constants = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_1=widest, BLOCK_2=widest, BLOCK_Q=widest,
                             SECOND=True, THIRD=True, PRECISION=precision, UPCAST=False)
            print("shrink", target, name, tokens, shared_bytes(lora._shrink_kernel, {**types, "scale": "fp32"},
                                                               constants, target))
        types = {p: "*fp32" for p in "t_ptr w_ptr w2_ptr w3_ptr".split()}
        types.update({"src_ptr": f"*{name}", "y_ptr": f"*{name}", "scale": "fp32"})
        types.update({p: "i32" for p in ("N M R Q col3 stride_tn stride_wm stride_wr stride_w2m stride_w2r stride_w3m "
                                         "stride_w3r stride_sn stride_sm stride_yn stride_ym").split()})
        constants = dict(BLOCK_N=64, BLOCK_M=128, BLOCK_R=widest, BLOCK_Q=widest, SECOND=True, THIRD=True,
                         ACCUMULATE=True, PRECISION=precision, UPCAST=False)
        print("expand", target, name, shared_bytes(lora._expand_kernel, types, constants, target))
        types = {"z_ptr": f"*{name}", "y_ptr": "*i64", "loss_ptr": "*fp32", "V": "i32", "stride_z": "i32",
                 "scale": "fp32"}
        print("cross_entropy", target, name, shared_bytes(_cross_entropy_kernel, types,
                                                          {"BLOCK_V": VOCABULARY_BLOCK}, target, num_warps=8))
"""
CONSUMER_CARD_SHARED_BYTES = 99 * 1024  # what an RTX 3090, 4090 or 5090 gives one block


def test_every_kernel_fits_a_consumer_cards_shared_memory():
    """Each kernel at the widest rank and with each tile its launcher picks, compiled (not run: no GPU needed) for
    an RTX 3090, in a process without the interpreter: at most the 99 KiB of shared memory consumer cards give a
    block (a data-centre card gives more, so a GPU run of the tests cannot tell)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_CONSUMER_CARDS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 3 * 4
    too_big = [row for row in rows if int(row[-1]) > CONSUMER_CARD_SHARED_BYTES]
    assert not too_big, too_big
