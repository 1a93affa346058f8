"""The app's peak-memory estimate against the peaks measured on Llama-2-7B (bench/results, H100 with a capped card)."""
import json

import pytest
import torch
from transformers import LlamaConfig

from conftest import ROOT
from frugal_loraga.config import Config
from frugal_loraga.gradients import default_budget_bytes
from frugal_loraga.memory import estimate_memory_gib, fit_advice

LLAMA_2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)


def measured(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


@pytest.mark.parametrize("card_gib,name", [(24, "bench_7b_24gib_128samples_compiled"),
                                           (8, "bench_7b_8gib_128samples_compiled")])
def test_estimate_is_within_ten_percent_of_the_measured_7b_peaks(card_gib, name):
    """LoRA-GA init under the default budget (half of what the weights leave), and LoRA training at 2 x 1024."""
    run = measured(name)
    config = Config(data="-", model="x", rank=8, batch_size=2, max_length=1024, dtype="bfloat16")
    init = estimate_memory_gib(LLAMA_2_7B, config, card_gib * 2**30)
    assert init["total"] == pytest.approx(run["lora_ga"]["peak_memory_init_gib"], rel=0.1)
    training = estimate_memory_gib(LLAMA_2_7B, Config(data="-", model="x", rank=8, batch_size=2, max_length=1024,
                                                      dtype="bfloat16", init="lora"), card_gib * 2**30)
    assert training["init_estimate"] == 0
    assert training["total"] == pytest.approx(run["baseline_lora_fwd_bwd"]["peak_memory_gib"], rel=0.1)


def test_an_explicit_budget_bounds_the_init_and_no_card_counts_every_gradient():
    base = dict(data="-", model="x", rank=8, batch_size=2, max_length=1024, dtype="bfloat16")
    small = estimate_memory_gib(LLAMA_2_7B, Config(**base, grad_budget_gib=1.4), 80 * 2**30)
    large = estimate_memory_gib(LLAMA_2_7B, Config(**base, grad_budget_gib=12), 80 * 2**30)
    everything = estimate_memory_gib(LLAMA_2_7B, Config(**base))
    assert small["init_estimate"] < 1.4 + 0.6 < large["init_estimate"] <= 12 + 0.6  # + the logits
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
    assert fit_advice({**parts, "total": 7.5}, 8) == ("does not fit (7.5 GiB against 7.0 usable of 8.0): lower "
                                                      "estimation_batch_size or grad_budget_gib")
    assert fit_advice({**parts, "training_activations": 3.0, "total": 7.5}, 8).endswith("lower batch_size or "
                                                                                         "max_length (and keep "
                                                                                         "gradient checkpointing on)")
    assert fit_advice({**parts, "weights": 7.5, "total": 9.5}, 8).endswith("turn on 4-bit, or pick a smaller model")
