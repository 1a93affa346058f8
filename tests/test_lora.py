"""The LoRA layer, LoRA-GA factors, step-0 invariance on an NF4 base, and the PEFT export round trip."""
import functools
import logging
import math

import pytest
import torch
from peft import PeftModel
from torch._dynamo.utils import counters

from frugal_loraga import Config, ConfigError, finetune
from frugal_loraga.checkpoint import factors_from_checkpoint
from frugal_loraga.init import initial_factors
from frugal_loraga.data import causal_inputs, collate, load_examples
from frugal_loraga.svd import LayerSVD
from frugal_loraga.init import lora_ga_factors
from frugal_loraga.lora import find_targets, inject
from frugal_loraga.models import load_model
from frugal_loraga.blocks import compile_blocks, enable_checkpointing, keeping_weights, uncompile_blocks
from frugal_loraga.checkpoint import checkpoint_path


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_ga_factors_follow_the_reference_formulas():
    m, n, r, gamma = 48, 40, 3, 16.0
    U, _ = torch.linalg.qr(torch.randn(m, 2 * r))
    V, _ = torch.linalg.qr(torch.randn(n, 2 * r))
    svd = LayerSVD(U, torch.arange(2 * r, 0, -1.0), V)
    A0, B0 = lora_ga_factors(svd, r, "ArB2r", "stable", gamma, eta=2.0)
    c = m ** 0.25 / math.sqrt(gamma)
    torch.testing.assert_close(A0, V[:, :r].T * c)
    torch.testing.assert_close(B0, U[:, r:] * c)
    A0, B0 = lora_ga_factors(svd, r, "A2rBr", "gd", gamma, eta=2.0)
    torch.testing.assert_close(A0, V[:, r:].T / 2)
    torch.testing.assert_close(B0, U[:, :r] / 2)
    A0, B0 = lora_ga_factors(svd, r, "ArB2r", "unit", gamma, eta=2.0)
    torch.testing.assert_close(A0 @ A0.T, torch.eye(r))


def test_model_unchanged_at_step0_on_nf4_base(tiny_model_dir, sample_path):
    """Tolerance: none. The frozen copy cancels the trainable adapter bit for bit, so logits are identical."""
    config = Config(model=str(tiny_model_dir), data=str(sample_path), rank=4, estimation_samples=8, progress=False)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    batch = collate(examples[:3], tokenizer.pad_token_id, device)
    before = logits(model, batch)
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    factors, _ = initial_factors(model, targets, examples, config, tokenizer.pad_token_id, device, None)
    assert all(f[0].abs().sum() > 0 for f in factors.values())
    layers = inject(model, factors, config.eta)
    assert type(layers[next(iter(layers))].base).__name__ == "Linear4bit"
    assert torch.equal(logits(model, batch), before)


@pytest.mark.parametrize("init,four_bit", [("lora_ga", True), ("lora_ga", False), ("lora", True)])
def test_exported_adapter_reproduces_our_logits_in_peft(tiny_model_dir, sample_path, tmp_path, init, four_bit):
    """fp32 compute on every device, so the 1e-4 tolerance checks the export, not bf16 rounding on a GPU."""
    config = Config(model=str(tiny_model_dir), data=str(sample_path), init=init, rank=4, load_in_4bit=four_bit,
                    dtype="float32", steps=4, lr=5e-3, estimation_samples=8, eval_every=0, out=str(tmp_path / "run"),
                    progress=False)
    result = finetune(config)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    batch = collate(examples[:3], tokenizer.pad_token_id, device)
    base_logits = logits(model, batch)
    state = torch.load(checkpoint_path(config.out), weights_only=True)
    ours = inject(model, factors_from_checkpoint(state["adapter"], device)[0], config.eta)
    assert all(not torch.equal(layer.B, layer.B0 if layer.has_frozen else torch.zeros_like(layer.B))
               for layer in ours.values()), "training did not move the adapter"
    our_logits = logits(model, batch)
    assert (our_logits - base_logits).abs().max() > 1e-3

    base, _, _ = load_model(config)
    peft_model = PeftModel.from_pretrained(base, result.adapter_dir)
    peft_logits = logits(peft_model, batch)
    torch.testing.assert_close(peft_logits, our_logits, rtol=1e-4, atol=1e-4)
    expected_rank = 8 if init == "lora_ga" else 4
    assert peft_model.peft_config["default"].r == expected_rank


def lora_model(tiny_model_dir, sample_path, **settings):
    """The tiny model with plain LoRA adapters (B random, so that they act), and a batch."""
    config = Config(model=str(tiny_model_dir), data=str(sample_path), init="lora", rank=4, progress=False, **settings)
    model, tokenizer, device = load_model(config)
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    generator = torch.Generator().manual_seed(0)
    layers = inject(model, {n: (0.1 * torch.randn(4, m.in_features, generator=generator).to(device),
                                0.1 * torch.randn(m.out_features, 4, generator=generator).to(device), None, None)
                            for n, m in targets.items()}, config.eta)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    return model, layers, collate(examples[:3], tokenizer.pad_token_id, device)


def loss_and_adapter_grads(model, layers, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for layer in layers.values() for p in (layer.A, layer.B)]


def test_training_batches_without_the_mask_give_the_same_loss_and_gradients(tiny_model_dir, sample_path):
    """Training calls the model without the attention mask (causal_inputs): on a right-padded batch the loss and the
    adapters' gradients equal those with the mask (to 1e-3: on a GPU the two take different attention kernels; a
    real token seeing a pad would be off by far more)."""
    model, layers, batch = lora_model(tiny_model_dir, sample_path, load_in_4bit=False, dtype="float32")
    assert bool((batch["attention_mask"] == 0).any())
    masked_loss, masked_grads = loss_and_adapter_grads(model, layers, batch)
    causal_loss, causal_grads = loss_and_adapter_grads(model, layers, causal_inputs(batch))
    torch.testing.assert_close(causal_loss, masked_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(causal_grads, masked_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_compile_blocks_compiles_each_decoder_layer_in_place(tiny_model_dir, sample_path):
    model, _, _ = lora_model(tiny_model_dir, sample_path, load_in_4bit=False)
    keys = list(model.state_dict())
    compile_blocks(list(model.model.layers))
    assert all("forward" in block.__dict__ for block in model.model.layers)
    assert "forward" not in model.model.embed_tokens.__dict__
    assert list(model.state_dict()) == keys  # checkpoints and the export see the same names
    uncompile_blocks(list(model.model.layers))
    assert all("forward" not in block.__dict__ for block in model.model.layers)


def test_compiled_layers_give_eager_loss_and_gradients(tiny_model_dir, sample_path, monkeypatch):
    """fp32 NF4 model, the first layer keeping its activations (and dequantizing its weights again in backward), the
    second recomputing them (checkpointed, keeping its dequantized weights for backward); on CPU through aot_eager
    (dynamo and AOTAutograd as on CUDA, without inductor's code generation). Tolerance 1e-4: inductor reorders the
    fp32 reductions of norms and softmax."""
    model, layers, batch = lora_model(tiny_model_dir, sample_path, dtype="float32")
    eager_loss, eager_grads = loss_and_adapter_grads(model, layers, batch)
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    enable_checkpointing(model)
    model.train()  # transformers checkpoints in training mode only (the model has no dropout)
    model.model.layers[0].gradient_checkpointing = False
    compile_blocks(list(model.model.layers))
    torch._dynamo.reset()
    counters.clear()
    with keeping_weights([model.model.layers[1]]):  # as training runs them
        compiled_loss, compiled_grads = loss_and_adapter_grads(model, layers, batch)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one for each kind of block
    assert not any(layer.recompute_weight is False for layer in layers.values())  # the default back on exit
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_target_errors(tiny_model_dir):
    config = Config(model=str(tiny_model_dir), data="unused", load_in_4bit=False)
    model, _, _ = load_model(config)
    with pytest.raises(ConfigError, match="embed_tokens is a HostEmbedding; only linear layers"):
        find_targets(model, ["embed_tokens"], 4, "lora_ga")
    with pytest.raises(ConfigError, match="no module matches target_modules attn_q; linear layers here: .*q_proj"):
        find_targets(model, ["attn_q"], 4, "lora_ga")
    with pytest.raises(ConfigError, match="no module matches target_modules nonexistent; linear layers here"):
        find_targets(model, ["q_proj", "nonexistent"], 4, "lora_ga")  # a typo in one of several is not ignored
    with pytest.raises(ConfigError, match="rank 40 is too large.*needs 80 <= 64; lower rank"):
        find_targets(model, ["q_proj"], 40, "lora_ga")
    assert set(find_targets(model, ["q_proj", "v_proj"], 16, "lora_ga")) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_layers_too_narrow_for_the_rank_are_left_out_of_all_linear_with_a_warning(tiny_model_dir, caplog):
    """k_proj and v_proj are 32 x 64 (2 KV heads of 16): LoRA-GA at rank 20 needs 40 <= min(m, n). Named, they are
    refused."""
    model, _, _ = load_model(Config(model=str(tiny_model_dir), data="unused", load_in_4bit=False))
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        targets = find_targets(model, ["all-linear"], 20, "lora_ga")
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "left out 4 layer(s) narrower than rank 20 needs (40): model.layers.0.self_attn.k_proj (32 x 64)" in \
        caplog.text
    with pytest.raises(ConfigError, match=r"rank 20 is too large for model.layers.0.self_attn.k_proj \(32 x 64\): "
                                          r"lora_ga needs 40 <= 32; lower rank"):
        find_targets(model, ["q_proj", "k_proj"], 20, "lora_ga")
