"""The chunked causal LM loss: the loss and every gradient of model(**inputs).loss for tiny random models of many
families, never more than a chunk of tokens' logits, LoRA wrappers on the head, and the families that fall back."""
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from frugal_loraga import loss as loss_module
from frugal_loraga.kernels import cross_entropy as kernel
from frugal_loraga.loss import FAMILIES, causal_lm_loss, chunked
from frugal_loraga.lora import inject

V = 97
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, ffn_dim=48, word_embed_proj_dim=32)
# head_dim where the default is not hidden_size / heads; post-processing strong enough to change the loss.
EXTRA = {**{t: dict(head_dim=8) for t in ("ministral", "qwen3", "gemma", "glm4")},
         "gemma2": dict(head_dim=8, final_logit_softcapping=0.5),
         "gemma3_text": dict(head_dim=8, final_logit_softcapping=0.5), "cohere": dict(logit_scale=3.0),
         "cohere2": dict(logit_scale=3.0), "granite": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0)}
CHUNKED = ("llama mistral ministral qwen2 qwen3 gemma gemma2 gemma3_text phi3 phi olmo olmo2 starcoder2 stablelm "
           "smollm3 glm4 granite granitemoe cohere cohere2 mixtral qwen2_moe qwen3_moe gpt2 gpt_neox opt "
           "falcon").split()
FALLBACK = ["bloom", "gpt_bigcode"]
CHUNK = 4


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SIZES, **EXTRA.get(model_type, {}), **overrides})
    return AutoModelForCausalLM.from_config(config).float().eval()


def batch(seed: int = 0) -> dict:
    """Three rows of 11 tokens: a prompt without labels, one row padded on the right, 17 targets (not a multiple of
    CHUNK) after the shift."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    input_ids[1, 8:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    labels[2, 8] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, inputs, **kwargs):
    expected, expected_grads = loss_and_grads(model, lambda: model(**inputs).loss)
    got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, inputs, **kwargs))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return expected_grads


@pytest.mark.parametrize("model_type", CHUNKED)
def test_same_loss_and_gradients_as_transformers(model_type):
    model = tiny(model_type)
    inputs = batch()
    assert chunked(model, inputs)
    assert int((inputs["labels"][:, 1:] != -100).sum()) % CHUNK != 0
    grads = assert_same(model, inputs, chunk_tokens=CHUNK)
    head = model.get_output_embeddings().weight
    assert head.requires_grad and head.grad.abs().sum() > 0  # the head's own gradient was compared too
    assert any("embed" in n or "wte" in n for n in grads)  # and everything upstream of the hidden states
    with torch.no_grad():  # the evaluation path: no checkpoint
        torch.testing.assert_close(causal_lm_loss(model, inputs, chunk_tokens=CHUNK), model(**inputs).loss)


@pytest.mark.parametrize("model_type", FALLBACK)
def test_other_families_fall_back_to_the_model(model_type):
    model = tiny(model_type)
    assert type(model).__name__ not in FAMILIES and not chunked(model, batch())
    assert_same(model, batch(), chunk_tokens=CHUNK)


def test_router_loss_and_unknown_inputs_fall_back():
    """Mixtral with output_router_logits adds the router's auxiliary loss; an input the decoder is not given as is
    (here logits_to_keep) is the model's business."""
    model = tiny("mixtral", output_router_logits=True)
    assert not chunked(model, batch())
    assert_same(model, batch(), chunk_tokens=CHUNK)
    assert not chunked(tiny("llama"), {**batch(), "logits_to_keep": 1})


def test_logits_never_held_whole(monkeypatch):
    """A hook on the head sees at most a chunk of tokens, in forward and in backward's recompute (the default chunk
    size, from CHUNK_BYTES)."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * V * 5)
    model = tiny("llama")
    inputs = batch()
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    loss = causal_lm_loss(model, inputs)
    targets = int((inputs["labels"][:, 1:] != -100).sum())
    assert sum(rows) == targets and max(rows) == 5 and len(rows) == math.ceil(targets / 5)
    loss.backward()
    assert sum(rows) == 2 * targets and max(rows) == 5


def test_lora_wrapped_head_and_layers(tiny_model_dir):
    """LoraLinear around q_proj and around the head itself (a module whose forward must run per call): the same
    gradients of A and B, with the base frozen."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    torch.manual_seed(1)
    names = ["model.layers.0.self_attn.q_proj", "lm_head"]
    factors = {}
    for name in names:
        m, n = model.get_submodule(name).weight.shape
        factors[name] = (torch.randn(2, n) * 0.1, torch.randn(m, 2) * 0.1, None, None)
    layers = inject(model, factors, eta=1.0)
    inputs = batch()
    inputs["input_ids"] = inputs["input_ids"] % model.config.vocab_size
    grads = assert_same(model, inputs, chunk_tokens=CHUNK)
    assert set(grads) == {f"{name}.{p}" for name in names for p in "AB"}
    assert all(g.abs().sum() > 0 for g in grads.values()) and layers["lm_head"] is model.lm_head


def frozen_llama_adapting(model_dir, name: str) -> tuple:
    """The tiny Llama in fp32, frozen, with a rank-2 LoRA on the layer `name`; and a batch of its words."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    torch.manual_seed(1)
    m, n = model.get_submodule(name).weight.shape
    inject(model, {name: (torch.randn(2, n) * 0.1, torch.randn(m, 2) * 0.1, None, None)}, eta=1.0)
    inputs = batch()
    inputs["input_ids"] = inputs["input_ids"] % model.config.vocab_size
    return model, inputs


@pytest.mark.parametrize("accumulated", [1, 3])
def test_frozen_head_gradient_computed_in_forward(tiny_model_dir, monkeypatch, accumulated):
    """LoRA training's case: the head a frozen nn.Linear, so HeadLoss computes the chunks' gradients in h in forward;
    the loss and the adapter's gradients are transformers', also when the loss is scaled (gradient accumulation);
    and under bf16 autocast those of the checkpointed chunks (bit for bit unscaled; scaled, the scale meets the bf16
    gradient after its GEMM rather than before: within bf16's rounding)."""
    model, inputs = frozen_llama_adapting(tiny_model_dir, "model.layers.0.self_attn.q_proj")
    calls = []
    forward = loss_module.HeadLoss.forward
    monkeypatch.setattr(loss_module.HeadLoss, "forward", lambda *a: calls.append(a[-1]) or forward(*a))
    expected, expected_grads = loss_and_grads(model, lambda: model(**inputs).loss / accumulated)
    got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, inputs, chunk_tokens=CHUNK) / accumulated)
    assert calls == [CHUNK]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys() == {f"model.layers.0.self_attn.q_proj.{p}" for p in "AB"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, inputs, chunk_tokens=CHUNK) / accumulated)
        with monkeypatch.context() as patch:
            patch.setattr(loss_module, "frozen_plain_head", lambda model, h: False)
            expected, expected_grads = loss_and_grads(
                model, lambda: causal_lm_loss(model, inputs, chunk_tokens=CHUNK) / accumulated)
    assert calls == [CHUNK, CHUNK]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():  # the same ops but for where the scale meets bf16 roundings
        error = (grad - expected_grads[name]).norm() / expected_grads[name].norm()
        assert error == 0 if accumulated == 1 else error < 2e-2, (name, error)
    model.lm_head.weight.requires_grad_(True)  # a trained head: its gradient through the checkpointed chunks
    assert_same(model, inputs, chunk_tokens=CHUNK)
    assert calls == [CHUNK, CHUNK]


def test_frozen_head_gradient_through_the_kernel(tiny_model_dir, monkeypatch):
    """HeadLoss with the Triton cross-entropy kernel (kernels/cross_entropy.py, here in Triton's interpreter) as a GPU
    runs it: transformers' loss and adapter gradients (fp32; the kernel's sums in another order)."""
    if kernel.triton is None:
        pytest.skip("Triton is not installed (a CPU install): the kernel cannot run, not even in its interpreter")
    model, inputs = frozen_llama_adapting(tiny_model_dir, "model.layers.0.mlp.down_proj")
    expected, expected_grads = loss_and_grads(model, lambda: model(**inputs).loss)
    calls = []
    monkeypatch.setattr(loss_module, "cross_entropy_grad_",
                        lambda *a: calls.append(len(a[1])) or kernel.cross_entropy_grad_triton_(*a))
    got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, inputs, chunk_tokens=CHUNK))
    assert calls and all(c <= CHUNK for c in calls)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_chunks_are_whole_gemm_tiles(monkeypatch):
    """The default chunk, CHUNK_BYTES // (4 V) rows, rounded down to a multiple of 64 rows where it holds one; twice
    the rows for HeadLoss's 16-bit logits (a bf16 model)."""
    model = tiny("llama")
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # something upstream to differentiate
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * V * 300)
    sizes = []
    forward = loss_module.HeadLoss.forward
    monkeypatch.setattr(loss_module.HeadLoss, "forward", lambda *a: sizes.append(a[-1]) or forward(*a))
    inputs = {k: v.repeat(20, 1) for k, v in batch().items()}  # 340 targets: chunks of 256 and 84
    causal_lm_loss(model, inputs).backward()
    assert sizes == [256]
    causal_lm_loss(model.to(torch.bfloat16), inputs).backward()  # 600 rows of bf16 logits
    assert sizes == [256, 576]


def test_no_targets_gives_nan_like_transformers():
    model = tiny("llama")
    inputs = batch()
    inputs["labels"][:] = -100
    assert torch.isnan(model(**inputs).loss)
    loss = causal_lm_loss(model, inputs, chunk_tokens=CHUNK)
    assert torch.isnan(loss)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
