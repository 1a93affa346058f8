"""Mixture-of-experts expert stacks as targets (experts.py): the estimate cut inside a layer, the adapters on a 4-bit
base and named alone, both exports reloaded by PEFT, experts no estimation token reached, and the stacks in NF4
(experts_4bit.py)."""
import gc
import json
import logging
import math
import weakref

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft import PeftModel

from frugal_loraga import Config, finetune
from frugal_loraga.checkpoint import adapter_for, checkpoint_path, factors_from_checkpoint
from frugal_loraga.data import collate, load_examples
from frugal_loraga.errors import ConfigError
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.experts import (ExpertsLora, dequantized, expert_parameters, grouped_lora, grouped_lora_reference,
                                   routes)
from frugal_loraga.experts_4bit import loads_stacks_in_4bit
from frugal_loraga import generate
from frugal_loraga.generate import Generator
from frugal_loraga.fidelity import captured_energy, exact_gradients
from frugal_loraga.init import dead_pairs_as_lora, estimation_batches
from frugal_loraga.lora import features, find_targets, inject
from frugal_loraga.memory import activation_bytes, gradient_bytes
from frugal_loraga.models import load_model, release, resolve_device
from conftest import SAMPLE
from test_families import logits, save_tiny


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mixtral"), "mixtral")


def test_the_estimate_of_an_expert_stack_cut_from_its_layer_is_exact(mixtral):
    """A budget that holds one expert stack's gradient beside its layer's activations, not the whole layer's: the
    layer is estimated in parts, and each stack's top-4 still captures its exact gradient's."""
    config = Config(model=str(mixtral), data=str(SAMPLE), rank=2, load_in_4bit=False, dtype="float32",
                    estimation_samples=8)
    model, tokenizer, device = load_model(config)
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    examples, _ = load_examples(SAMPLE, "auto", tokenizer, 96)
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device)
    shapes = {n: features(t) for n, t in targets.items()}
    tokens = max(b["input_ids"].numel() for b in batches)
    activations = activation_bytes(shapes, tokens, 4, routes(targets))
    layer0 = [n for n in targets if ".layers.0." in n]
    budget = max(gradient_bytes(shapes).values()) + sum(activations[n] for n in layer0)
    svds, stats = estimate_gradient_svd(model, targets, batches, 4, budget, svd="exact")
    assert any(len(group) == 1 and group[0].endswith("experts.gate_up_proj") for group in stats.groups)
    for name, G in exact_gradients(model, targets, batches).items():
        assert captured_energy(G, svds[name].U, svds[name].V) >= 0.9999, name


@pytest.mark.parametrize("experts_4bit", [False, True])
@pytest.mark.parametrize("init", ["lora_ga", "lora"])
def test_a_4bit_moe_adapts_its_experts_and_both_exports_give_our_logits_in_peft(mixtral, tmp_path, init,
                                                                               experts_4bit, monkeypatch):
    """On a 4-bit base (attention 4-bit and corrected; the experts in NF4, or in 16 bits as transformers loads them)
    the experts are adapted; adapter on the original base gives our adapters there in PEFT, and with 16-bit experts
    adapter_nf4 on the 4-bit base gives our model (PEFT cannot load an adapter on NF4 experts: its adapters on
    parametrized stacks nest in another order, and its 4-bit model keeps them in 16 bits)."""
    config = Config(model=str(mixtral), data=str(SAMPLE), init=init, rank=2, dtype="float32", steps=3, lr=5e-3,
                    estimation_samples=8, eval_every=0, out=str(tmp_path / "run"), progress=False, nf4_error_rank=4,
                    quantize_experts=experts_4bit)
    finetune(config)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                            for p in ("down_proj", "gate_up_proj")]
    state = torch.load(checkpoint_path(config.out), weights_only=True)
    factors, corrections = factors_from_checkpoint(state["adapter"], resolve_device(config))
    assert factors["model.layers.0.mlp.experts.down_proj"][0].shape == (4, 2, 96)  # E x r x n
    assert corrections and not any("experts" in name for name in corrections)

    model, tokenizer, device = load_model(config)
    assert bool(dequantized(find_targets(model, ["all-linear"], 2, init))) == experts_4bit
    batch = collate(load_examples(SAMPLE, "auto", tokenizer, 96)[0][:3], tokenizer.pad_token_id, device)
    layers = inject(model, factors, config.eta, corrections)
    assert isinstance(layers["model.layers.1.mlp.experts.gate_up_proj"], ExpertsLora)
    assert (layers["model.layers.1.mlp.experts.gate_up_proj"].B.detach() != 0).any(), "the experts did not train"
    generator = Generator()  # the app's Try
    generator.load(config, adapter_for(config.out, True))
    assert set(generator.generate("2 + 3 =", max_new_tokens=4)) == {"base", "adapter"}
    if not experts_4bit:
        base, _, _ = load_model(config)
        torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_for(config.out, True)), batch),
                                   logits(model, batch), rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(generate, "free_bytes", lambda device: 1)  # its base is PEFT's: the experts in 16 bits
        with pytest.raises(ConfigError, match=r"Try loads the base as PEFT does, its mixture-of-experts expert stacks "
                                              r"in 16 bits: about 0\.0 GiB \(0\.0 of them experts\) where 0\.0 GiB is "
                                              r"free; use the run's adapter with PEFT on a machine with more memory"):
            Generator().load(config, adapter_for(config.out, True))
    else:  # PEFT cannot load it on NF4 stacks: Try runs the run's own layers, and the base without them
        assert torch.equal(logits(generator.model.model, batch), logits(model, batch))
        base, _, _ = load_model(config)
        with generator.model.disable_adapter():
            assert torch.equal(logits(generator.model.model, batch), logits(base, batch))
        assert torch.equal(logits(generator.model.model, batch), logits(model, batch))
        checkpoint_path(config.out).unlink()
        with pytest.raises(ConfigError, match=r"Try runs a model trained on 4-bit expert stacks from its checkpoint "
                                              r"\(PEFT cannot load its adapter there\), and .*state\.pt is gone"):
            Generator().load(config, adapter_for(config.out, True))

    original = Config(model=str(mixtral), data="unused", load_in_4bit=False, dtype="float32")
    model, _, _ = load_model(original)
    inject(model, factors, config.eta)
    base, _, _ = load_model(original)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_for(config.out, False)), batch),
                               logits(model, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_a_4bit_load_stores_each_expert_stack_in_nf4_and_step_0_is_unchanged(family, tmp_path, caplog):
    """By default a 4-bit load quantizes each expert stack whole as it loads: bitsandbytes' bytes for the stack
    (those of each expert quantized alone), read back as their dequantization; adapters on every stack and linear
    layer leave the model unchanged at step 0, to the bit."""
    if not loads_stacks_in_4bit():
        pytest.skip("this transformers has no quantizer methods for experts_4bit.py to replace: experts stay 16-bit")
    folder = save_tiny(tmp_path / family, family)
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        model, tokenizer, device = load_model(Config(model=str(folder), data="unused", dtype="float32"))
    assert "expert stacks" not in caplog.text
    original, _, _ = load_model(Config(model=str(folder), data="unused", load_in_4bit=False, dtype="float32"))
    stacks = expert_parameters(model)
    assert set(stacks) == set(expert_parameters(original)) and len(stacks) == 4
    for name, target in expert_parameters(original).items():
        packed, state = quantize_4bit(target.weight.detach(), blocksize=64, compress_statistics=True,
                                      quant_type="nf4")
        stored = stacks[name].owner.parametrizations[stacks[name].param].original
        assert stored.dtype == torch.uint8 and torch.equal(stored, packed), name
        assert torch.equal(stacks[name].weight, dequantize_4bit(packed, state)), name
        assert stacks[name].shape == target.shape
    tokens, shapes = 10, {name: stacks[name].shape for name in stacks}  # the estimate budgets the copy dX keeps
    with_copies = activation_bytes(shapes, tokens, 4, routes(stacks), dequantized(stacks))
    assert {name: with_copies[name] - size for name, size in activation_bytes(shapes, tokens, 4, routes(stacks)).items()
            } == {name: 4 * math.prod(shape) for name, shape in shapes.items()}

    batch = collate(load_examples(SAMPLE, "auto", tokenizer, 96)[0][:3], tokenizer.pad_token_id, device)
    before = logits(model, batch)
    torch.manual_seed(0)
    factors = {}
    for name, target in find_targets(model, ["all-linear"], 2, "lora_ga").items():
        *experts, m, n = features(target)
        A, B = torch.randn(*experts, 2, n), torch.randn(*experts, m, 2)
        factors[name] = (A, B, A, B)
    inject(model, factors, 2.0)
    assert torch.equal(logits(model, batch), before)


def test_releasing_a_4bit_moe_frees_its_stacks_with_gc_off(mixtral):
    """torch's parametrized class holds its module in a reference cycle: release() removes the parametrizations, so
    the packed stacks go with the model's last reference (the app's next run finds the memory free)."""
    model, _, _ = load_model(Config(model=str(mixtral), data="unused", dtype="float32"))
    packed = [weakref.ref(stack.owner.parametrizations[stack.param].original)
              for stack in expert_parameters(model).values()]
    gc.collect()
    gc.disable()
    try:
        release(model)
        del model
        assert packed and all(ref() is None for ref in packed)
    finally:
        gc.enable()


def test_an_expert_stack_named_alone_exports_as_a_target_parameter(mixtral, tmp_path):
    """Named as experts.down_proj (a bare down_proj names linear layers only), on the 4-bit base: no linear layer
    is adapted, so none is corrected."""
    model, _, _ = load_model(Config(model=str(mixtral), data="unused", load_in_4bit=False))
    with pytest.raises(ConfigError, match=r"no module matches target_modules down_proj; linear layers here: "
                                          r"experts.down_proj, experts.gate_up_proj, k_proj, lm_head"):
        find_targets(model, ["down_proj"], 2, "lora_ga")
    config = Config(model=str(mixtral), data=str(SAMPLE), target_modules="experts.down_proj", rank=2,
                    dtype="float32", steps=2, lr=5e-3, estimation_samples=8, eval_every=0,
                    out=str(tmp_path / "run"), progress=False, quantize_experts=False)
    result = finetune(config)
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["target_modules"] == []
    assert adapter["target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                           "model.layers.1.mlp.experts.down_proj"]
    factors, _ = factors_from_checkpoint(torch.load(checkpoint_path(config.out), weights_only=True)["adapter"],
                                         resolve_device(config))
    model, tokenizer, device = load_model(config)
    batch = collate(load_examples(SAMPLE, "auto", tokenizer, 96)[0][:3], tokenizer.pad_token_id, device)
    inject(model, factors, config.eta)
    base, _, _ = load_model(config)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, result.adapter_dir), batch),
                               logits(model, batch), rtol=1e-4, atol=1e-4)


def test_rank_pairs_with_no_gradient_start_as_plain_lora(caplog):
    """A zero gradient (an expert no estimation token reached) or one of lower rank gives rank pairs with A0's row
    and B0's column both zero, which never train: their A0 rows start as plain LoRA's."""
    E, m, n, r = 3, 6, 5, 2
    A0, B0 = torch.randn(E, r, n), torch.randn(E, m, r)
    A0[1], B0[1] = 0, 0  # no tokens
    A0[2, 1], B0[2, :, 1] = 0, 0  # a gradient of rank 1
    A0[0, 0] = 0  # B0's column alive: trains
    kept = A0[0].clone(), B0.clone()
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        dead_pairs_as_lora("layers.0.experts.down_proj", A0, B0, torch.Generator().manual_seed(0))
    assert "3 of the 6 rank pairs of layers.0.experts.down_proj had a zero gradient direction" in caplog.text
    assert torch.equal(A0[0], kept[0]) and torch.equal(B0, kept[1])
    for row in (A0[1, 0], A0[1, 1], A0[2, 1]):  # Kaiming-uniform: U(-1/sqrt(n), 1/sqrt(n))
        assert (row != 0).all() and row.abs().max() <= n ** -0.5


@pytest.mark.parametrize("rank", [8, 16])
def test_grouped_lora_in_bf16_matches_its_reference_forward_and_backward(rank):
    """torch's grouped matmul path (bf16 rows) against the expert-by-expert fp32 reference, over uneven groups with
    an expert that gets no rows, values and the gradients of A and B."""
    torch.manual_seed(0)
    E, S, n, m = 5, 45, 40, 24
    x = torch.randn(S, n, dtype=torch.bfloat16)
    offsets = torch.cumsum(torch.tensor([11, 0, 17, 9, 8]), 0, dtype=torch.int32)
    A, B = torch.randn(E, rank, n) / n ** 0.5, torch.randn(E, m, rank) / rank ** 0.5
    outputs, grads = [], []
    for fn in (grouped_lora, grouped_lora_reference):
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = fn(x, a, b, offsets)
        (y.float() * torch.linspace(-1, 1, m)).sum().backward()
        outputs.append(y.float())
        grads.append((a.grad, b.grad))
    for ours, reference in [outputs, *zip(grads[0], grads[1])]:  # bf16 rounding: relative to the whole tensor
        assert (ours - reference).norm() <= 1e-2 * reference.norm()
    assert torch.equal(grads[0][0][1], torch.zeros(rank, n))  # the expert without rows


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_step_0_is_the_bf16_model_bit_for_bit(family, tmp_path):
    """In bf16 the adapters of rank 8 run through torch's grouped matmul (gpt-oss: transposed stacks with biases):
    the model at step 0 is still the loaded model to the bit."""
    folder = save_tiny(tmp_path / family, family)
    model, tokenizer, device = load_model(Config(model=str(folder), data="unused", load_in_4bit=False,
                                                 dtype="bfloat16"))
    model.to(torch.bfloat16)
    targets = find_targets(model, ["all-linear"], 8, "lora_ga")
    batch = collate(load_examples(SAMPLE, "auto", tokenizer, 96)[0][:3], tokenizer.pad_token_id, device)
    before = logits(model, batch)
    torch.manual_seed(0)
    factors = {}
    for name, target in targets.items():
        *experts, m, n = features(target)
        A, B = torch.randn(*experts, 8, n, device=device), torch.randn(*experts, m, 8, device=device)
        factors[name] = (A, B, A, B)
    inject(model, factors, 2.0)
    assert torch.equal(logits(model, batch), before)
