"""The peak-memory estimate (the app's, and finetune's check before loading) against the peaks measured on capped
H200s (bench/results), the default budget and the advice on what to lower."""
import json
from dataclasses import replace

import pytest
import torch
import transformers
from transformers import LlamaConfig, MixtralConfig

from conftest import ROOT
from frugal_loraga.config import Config
from frugal_loraga.errors import ConfigError
from frugal_loraga.memory import (CUDA_HEADROOM_BYTES, NF4_BYTES_PER_PARAM, check_fits, decoder_shapes,
                                  default_budget_bytes, estimate_memory_gib, fit_advice, keeping_plan,
                                  layer_weight_copy_bytes, weight_bytes, weights_estimate)
from frugal_loraga.lora import find_targets
from frugal_loraga.models import model_skeleton

LLAMA_2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
MEASURED = ["llama2_7b_8gib", "llama2_7b_12gib", "llama2_7b_16gib", "llama2_7b_24gib", "llama3_8b_8gib",
            "llama3_8b_12gib", "llama3_8b_16gib", "llama3_8b_24gib", "qwen25_14b_16gib", "llama3_8b_8gib_h100_s22"]


def measured(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", MEASURED)
def test_estimate_is_within_ten_percent_of_the_measured_peaks(name):
    """bench/fit_card.py's runs (finetune's defaults, NF4, 128 x 1024 estimation samples, training 2 x 1024, a GPU
    capped to the card): the init's peak, training's and the run's, reserved, each within 10%. Training's estimate is
    what it needs with every layer recomputed, as these runs trained (the 12-24 GiB ones date from before training
    kept activations and weights in what the card has free: it now fills that room, above this floor)."""
    run = measured(name)
    sizes = dict(run["model_config"])
    model_config = getattr(transformers, sizes.pop("class"))(**sizes)
    config = Config(data="-", model="x", batch_size=2, max_length=1024, estimation_samples=128, dtype="bfloat16")
    estimate = estimate_memory_gib(model_config, config, int(run["card_gib"] * 2**30))
    training = estimate["training_activations"] + estimate["adapter_and_optimizer"]
    assert estimate["weights"] == pytest.approx(run["weights_gib"], rel=0.1)
    assert estimate["weights"] + estimate["init_estimate"] == pytest.approx(run["init_peak_reserved_gib"], rel=0.1)
    assert estimate["weights"] + training == pytest.approx(run["train_peak_reserved_gib"], rel=0.1)
    peak = max(run["init_peak_reserved_gib"], run["train_peak_reserved_gib"])
    assert estimate["total"] == pytest.approx(peak, rel=0.1)


def test_check_fits_refuses_what_the_card_cannot_hold_and_names_the_setting():
    config = Config(data="-", model="x", batch_size=2, max_length=1024, dtype="bfloat16")
    check_fits(LLAMA_2_7B, config, 8 * 2**30)  # fits: 5.8 GiB measured
    with pytest.raises(ConfigError, match=r"needs about 5\.\d GiB .* 5\.0 GiB is free: lower batch_size or max_length"):
        check_fits(LLAMA_2_7B, config, 5 * 2**30)
    with pytest.raises(ConfigError, match="3.0 GiB is free: turn load_in_4bit on if it is off, else pick a smaller"):
        check_fits(LLAMA_2_7B, config, 3 * 2**30)
    with pytest.raises(ConfigError, match="lower estimation_batch_size or grad_budget_gib"):
        check_fits(LLAMA_2_7B, Config(data="-", model="x", dtype="bfloat16", grad_budget_gib=6), 8 * 2**30)
    mixtral = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_local_experts=8)
    assert decoder_shapes(mixtral) is None
    check_fits(mixtral, config, 1)  # no estimate for experts: not refused
    with pytest.raises(ConfigError, match="no memory estimate for mixtral"):
        estimate_memory_gib(mixtral, config)


def test_an_explicit_budget_bounds_the_init_and_no_card_counts_every_gradient():
    base = dict(data="-", model="x", rank=8, batch_size=2, max_length=1024, dtype="bfloat16")
    small = estimate_memory_gib(LLAMA_2_7B, Config(**base, grad_budget_gib=1.4), 80 * 2**30)
    large = estimate_memory_gib(LLAMA_2_7B, Config(**base, grad_budget_gib=12), 80 * 2**30)
    everything = estimate_memory_gib(LLAMA_2_7B, Config(**base))
    assert small["init_estimate"] <= 1.4 + 1 < large["init_estimate"] <= 12 + 1  # + CUDA_HEADROOM_BYTES
    assert everything["init_estimate"] > 4 * 6.4e9 / 2**30  # all 6.5 B linear weights' fp32 gradients


def test_the_default_budget_counts_the_allocators_cache_as_free(monkeypatch):
    """A second run in one process finds the first one's blocks cached by torch's allocator (reserved, not allocated):
    they are free to reuse, so it gets the budget the first run got (an 8 GiB card refused the second run before)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 8 / 140)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * gib)  # the second run's model
    for reserved in (4 * gib, 7 * gib):  # first run: nothing cached; second: 3 GiB cached by the first
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device, reserved=reserved: reserved)
        assert default_budget_bytes(torch.device("cuda", 0)) == 1.5 * gib  # half of the 4 GiB the cap leaves, less
        # the 1 GiB of headroom
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * gib, 140 * gib))  # the card itself is full
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)
    assert default_budget_bytes(torch.device("cuda", 0)) == 1.5 * gib  # 1 GiB free + 3 GiB cached by the last run


def test_fit_advice_names_the_setting_behind_the_peak():
    parts = {"weights": 3.5, "init_estimate": 2.0, "training_activations": 1.0, "adapter_and_optimizer": 0.1}
    assert fit_advice({**parts, "total": 5.5}, 8) == "fits (5.5 of 8.0 GiB, 1 GiB left for the CUDA context)"
    assert fit_advice({**parts, "total": 7.5}, 8, cuda=False) == "fits (7.5 of 8.0 GiB of available RAM)"
    assert fit_advice({**parts, "total": 7.5}, 8) == ("does not fit (7.5 GiB against 7.0 usable of 8.0): lower "
                                                      "estimation_batch_size or grad_budget_gib")
    assert fit_advice({**parts, "training_activations": 3.0, "total": 7.5}, 8).endswith("lower batch_size or "
                                                                                         "max_length (and keep "
                                                                                         "gradient checkpointing on)")
    assert fit_advice({**parts, "weights": 7.5, "total": 9.5}, 8).endswith("turn load_in_4bit on if it is off, else "
                                                                           "pick a smaller model")


def test_layers_keep_their_activations_then_their_weight_copies_in_what_training_leaves_free():
    """Llama-3-8B's sizes, 2 x 1024 tokens in bf16: a layer keeps 2048 (8 * 4096 + 3 * 14336) 2 bytes = 0.29 GiB of
    activations; its seven 4-bit projections dequantized take 2 (2 * 4096^2 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    bytes = 0.41 GiB more, kept from what is left once as many layers as fit keep their activations."""
    gib, layer = 2**30, 2048 * (8 * 4096 + 3 * 14336) * 2
    copies = 2 * (2 * 4096**2 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    llama_3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256)
    config = Config(data="-", model="x", batch_size=2, max_length=1024, dtype="bfloat16")
    assert layer_weight_copy_bytes(llama_3_8b, config) == copies
    estimate = estimate_memory_gib(llama_3_8b, config)
    need = (estimate["training_activations"] + estimate["adapter_and_optimizer"]) * gib + CUDA_HEADROOM_BYTES
    assert keeping_plan(llama_3_8b, config, int(need + 5.5 * layer)) == (5, 0)
    assert keeping_plan(llama_3_8b, config, int(need - layer)) == (0, 0)  # a small card: all recomputed
    all_kept = int(need + 32 * layer)
    assert keeping_plan(llama_3_8b, config, all_kept + 3 * copies - 1) == (32, 2)  # then the copies, as they fit
    assert keeping_plan(llama_3_8b, config, 80 * gib) == (32, 32)  # never more than the model has
    assert keeping_plan(llama_3_8b, replace(config, load_in_4bit=False), 80 * gib) == (32, 0)  # nothing to dequantize
    assert keeping_plan(llama_3_8b, config, None) == (0, 0)  # no GPU: all recomputed unless asked
    one_gib = replace(config, keep_activations_gib=1.0)
    assert keeping_plan(llama_3_8b, one_gib, 80 * gib) == (gib // layer, 0)
    assert keeping_plan(llama_3_8b, one_gib, None) == (gib // layer, 0)
    assert keeping_plan(llama_3_8b, replace(config, keep_activations_gib=20.0), int(need + 5.5 * layer)) \
        == (5, 0)  # capped by what the card has
    assert keeping_plan(llama_3_8b, replace(config, keep_activations_gib=12.0), 80 * gib) == \
        (32, (12 * gib - 32 * layer) // copies)  # what is asked for, activations first
    assert keeping_plan(llama_3_8b, replace(config, keep_activations_gib=0.0), 80 * gib) == (0, 0)
    long = replace(config, max_length=4096)  # a layer's activations (1.17 GiB) outweigh its copies: both before all fit
    estimate = estimate_memory_gib(llama_3_8b, long)
    need = (estimate["training_activations"] + estimate["adapter_and_optimizer"]) * gib + CUDA_HEADROOM_BYTES
    assert keeping_plan(llama_3_8b, long, int(need + 5 * 4 * layer + 2 * copies)) == (5, 2)
    llama_3_8b._attn_implementation = "eager"  # keeps T^2 per head: not budgeted
    assert keeping_plan(llama_3_8b, config, 80 * gib) == (0, 0)
    mixtral = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_local_experts=8)
    assert keeping_plan(mixtral, config, 80 * gib) == (0, 0)  # not described by the estimate: all recomputed
    with pytest.raises(ConfigError, match="keep_activations_gib must be a finite number >= 0, got -1"):
        replace(config, keep_activations_gib=-1)


def test_the_weights_of_a_mixture_of_experts_are_checked_against_the_card():
    """bench/results/qwen3_30b_a3b_4layers_24gib.json: a Qwen3-30B-A3B-shaped model (4 layers, 128 experts) in NF4,
    its experts in 16 bits (before experts_4bit.py), held 5.16 GiB of weights on the GPU; counted on its skeleton
    within 10%. With its expert stacks in NF4 too (the default), they count as the linear layers do."""
    run = measured("qwen3_30b_a3b_4layers_24gib")
    sizes = dict(run["model_config"])
    skeleton = model_skeleton(getattr(transformers, sizes.pop("class"))(**sizes), False)
    config = Config(data="-", model="x", dtype="bfloat16", quantize_experts=False)
    weights, experts = weight_bytes(skeleton, config)
    assert weights / 2**30 == pytest.approx(run["weights_gib"], rel=0.1)
    assert experts / 2**30 == pytest.approx(4 * 3 * 128 * 2048 * 768 * 2 / 2**30)  # gate, up, down of each expert
    check_fits(skeleton.config, config, 24 * 2**30, skeleton)
    with pytest.raises(ConfigError, match=r"weights of this model \(4\.5 GiB of them mixture-of-experts expert stacks "
                                          r"in 16 bits: quantize_experts is off\) and its adapter take about 5\.\d GiB "
                                          r"before any activation, beside 1 GiB for CUDA, and 5\.0 GiB is free: turn "
                                          r"quantize_experts on"):
        check_fits(skeleton.config, config, 5 * 2**30, skeleton)
    nf4 = replace(config, quantize_experts=True)
    assert weight_bytes(skeleton, nf4) == (pytest.approx(weights - experts + experts / 2 * NF4_BYTES_PER_PARAM,
                                                         abs=1), 0)
    check_fits(skeleton.config, nf4, 5 * 2**30, skeleton)


def test_a_mixture_of_experts_whose_adapter_does_not_fit_is_refused_naming_the_rank():
    """The whole Qwen3-30B-A3B in NF4 (about 15.4 GiB) at rank 8 on all its 6,144 experts: LoRA-GA's adapter with
    its frozen copy, gradient and AdamW state takes 28 bytes a number, r E (m + n) numbers a stack: 8.4 GiB."""
    sizes = dict(measured("qwen3_30b_a3b_4layers_24gib")["model_config"], num_hidden_layers=48)
    skeleton = model_skeleton(getattr(transformers, sizes.pop("class"))(**sizes), False)
    config = Config(data="-", model="x", dtype="bfloat16")
    targets = find_targets(skeleton, config.target_list(), config.rank, config.init)
    estimate, held = weights_estimate(skeleton, config, targets)
    stack = 128 * ((2 * 768 + 2048) + (2048 + 768))  # E (m + n) of gate_up_proj (1536 x 2048) and down_proj
    attention = (4096 + 2048) * 2 + (512 + 2048) * 2
    assert estimate["adapter_and_optimizer"] == pytest.approx(
        (28 * 8 * 48 * (stack + attention) + 4 * 16 * 48 * attention) / 2**30)
    assert held == "" and estimate["weights"] == pytest.approx(15.4, abs=0.1)
    with pytest.raises(ConfigError, match=r"the weights of this model and its adapter take about 23\.8 GiB before any "
                                          r"activation, beside 1 GiB for CUDA, and 24\.0 GiB is free: lower rank, or "
                                          r"adapt fewer layers \(target_modules\)"):
        check_fits(skeleton.config, config, 24 * 2**30, skeleton, targets)
    check_fits(skeleton.config, replace(config, rank=4), 24 * 2**30, skeleton, targets)
