"""Every decoder family users fine-tune, each a tiny random model saved as safetensors with the tests' tokenizer, in
fp32: the streamed estimate (one decoder layer a group) against the exact gradient, step 0 unchanged bit for bit,
training through finetune, and its export reloaded by PEFT on the base model giving our logits."""
import logging
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from frugal_loraga import Config, ConfigError, finetune
from frugal_loraga.checkpoint import checkpoint_path, factors_from_checkpoint
from frugal_loraga.data import collate, load_examples
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.fidelity import captured_energy, exact_gradients
from frugal_loraga.init import estimation_batches, initial_factors
from frugal_loraga.lora import find_targets, inject
from frugal_loraga.models import load_model
from conftest import SAMPLE, make_tokenizer, one_block_budget, write_jsonl

RANK = 2
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             ffn_dim=96, word_embed_proj_dim=64, n_inner=96)
HEAD_DIM = {t: dict(head_dim=16)  # not hidden / heads by default
            for t in ("qwen3", "gemma2", "gemma3_text", "qwen3_moe", "gpt_oss")}
# What all-linear adapts in each family: the linear layers' name suffixes in a decoder layer.
ADAPTED = {
    "llama": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "mistral": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "qwen2": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "qwen3": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "gemma2": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "gemma3_text": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "olmo2": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "granite": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
    "phi3": "qkv_proj o_proj gate_up_proj down_proj",
    "gpt_neox": "query_key_value dense dense_h_to_4h dense_4h_to_h",
    "opt": "q_proj k_proj v_proj out_proj fc1 fc2",
    "gpt2": "c_attn c_proj c_fc",
    "falcon": "query_key_value dense dense_h_to_4h dense_4h_to_h",
    # mixtures of experts: the experts' stacks (gate_up_proj, down_proj) too; Qwen2-MoE's shared expert is linear
    "qwen2_moe": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj gate_up_proj",
    "mixtral": "q_proj k_proj v_proj o_proj gate_up_proj down_proj",
    "qwen3_moe": "q_proj k_proj v_proj o_proj gate_up_proj down_proj",
    "gpt_oss": "q_proj k_proj v_proj o_proj gate_up_proj down_proj",
}


def save_tiny(folder, model_type: str, layers: int = 2, **sizes):
    """A model of the family (2 decoder layers unless said, SIZES but for `sizes`) with the tests' tokenizer, weights
    larger than the default init so that the gradients have structure beyond noise."""
    tokenizer = make_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    sizes = {**SIZES, "num_hidden_layers": layers, **HEAD_DIM.get(model_type, {}), **sizes}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **ids))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("model_type", list(ADAPTED))
def test_family(model_type, tmp_path, caplog):
    folder = save_tiny(tmp_path / model_type, model_type)
    config = Config(model=str(folder), data=str(SAMPLE), rank=RANK, load_in_4bit=False, dtype="float32", steps=3,
                    lr=5e-3, estimation_samples=8, eval_every=0, out=str(tmp_path / "run"), progress=False, seed=1)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(SAMPLE, "auto", tokenizer, 96)
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        targets = find_targets(model, config.target_list(), config.rank, config.init)
    assert {name.rsplit(".", 1)[-1] for name in targets} == set(ADAPTED[model_type].split())
    assert "left out" not in caplog.text

    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device)
    svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, one_block_budget(model, targets, batches),
                                        svd="exact")
    assert len(stats.groups) >= 2
    for name, G in exact_gradients(model, targets, batches).items():
        energy = captured_energy(G, svds[name].U, svds[name].V)
        assert energy >= 0.9999, f"{name}: captured {energy:.5f} of the exact top-{2 * RANK} gradient energy"

    batch = collate(examples[:3], tokenizer.pad_token_id, device)
    before = logits(model, batch)
    factors, _ = initial_factors(model, targets, examples, config, tokenizer.pad_token_id, device)
    inject(model, factors, config.eta)
    assert torch.equal(logits(model, batch), before), "the model changed at step 0"

    result = finetune(config)
    model, _, _ = load_model(config)
    state = torch.load(checkpoint_path(config.out), weights_only=True)
    inject(model, factors_from_checkpoint(state["adapter"], device)[0], config.eta)
    ours = logits(model, batch)
    assert (ours - before).abs().max() > 1e-4, "training did not change the model"
    base, _, _ = load_model(config)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, result.adapter_dir), batch), ours,
                               rtol=1e-4, atol=1e-4)


def test_a_4bit_load_names_the_layers_transformers_left_in_16_bits(tmp_path, caplog):
    """transformers' 4-bit loading leaves Falcon's FalconLinear layers as they are: the run says so."""
    folder = save_tiny(tmp_path / "falcon", "falcon")
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        load_model(Config(model=str(folder), data="unused", load_in_4bit=True))
    assert "transformers left 8 of the 8 linear layers of FalconForCausalLM in 16 bits " \
           "(transformer.h.0.self_attention.query_key_value, ...)" in caplog.text


def test_a_4bit_load_names_the_expert_stacks_left_in_16_bits(tmp_path, caplog):
    folder = save_tiny(tmp_path / "mixtral", "mixtral")
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        load_model(Config(model=str(folder), data="unused", load_in_4bit=True, quantize_experts=False))
    assert re.search(r"transformers left the 4 expert stacks of MixtralForCausalLM in 16 bits "
                     r"\(model.layers.0.mlp.experts.gate_up_proj, ...: \d\.\d\d GiB\); they are not quantized and take "
                     r"16-bit memory", caplog.text)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])  # OPT's table has 2 rows more (an offset)
def test_examples_longer_than_a_learned_position_table_are_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                         model_type):
    """GPT-2 and OPT embed at most max_position_embeddings positions (rotary families have no such table): a longer
    batch would fail inside the model after the load, so the run stops before it, naming the max_length that fits."""
    folder = save_tiny(tmp_path / model_type, model_type)
    words = " ".join(["the cat sat on the mat"] * 60)  # over 256 tokens
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": words}] * 4)
    monkeypatch.setattr("frugal_loraga.api.load_base", lambda *a: pytest.fail("the model loaded"))
    config = Config(model=str(folder), data=str(data), load_in_4bit=False, max_length=300, out=str(tmp_path / "run"),
                    progress=False)
    with pytest.raises(ConfigError, match=rf"{model_type} embeds at most 256 positions \(a learned position table\) "
                                          r"and the longest example takes 304 \(max_length=300, padded to a multiple "
                                          r"of 8\); lower max_length to 256 or less"):
        finetune(config)


def test_an_adapter_peft_would_misread_loads_after_the_line_the_run_gives(tmp_path, caplog, monkeypatch):
    """DeepSeek-V3 has a dense first layer and shared experts whose gate_proj / up_proj / down_proj PEFT takes for
    transformers 4's expert projections (the family is in its table of v4 layouts): it drops those targets and
    doubles the experts' rank. The run names the line that stops it; after it, PEFT gives our logits."""
    import peft.utils.transformers_weight_conversion as conversion
    from frugal_loraga.export import peft_load_fix
    folder = save_tiny(tmp_path / "deepseek_v3", "deepseek_v3", num_key_value_heads=4,  # its attention: one per head
                       first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1)  # a dense layer, experts
    config = Config(model=str(folder), data=str(SAMPLE), rank=RANK, load_in_4bit=False, dtype="float32", steps=2,
                    lr=5e-3, estimation_samples=4, eval_every=0, out=str(tmp_path / "run"), progress=False)
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        result = finetune(config)
    fix = peft_load_fix(result.adapter_dir)
    assert fix and f"PEFT misreads adapters of deepseek_v3 (it takes its dense layers for experts); before " \
                   f"PeftModel.from_pretrained, run:\n  {fix}" in caplog.text
    model, tokenizer, device = load_model(config)
    state = torch.load(checkpoint_path(config.out), weights_only=True)
    inject(model, factors_from_checkpoint(state["adapter"], device)[0], config.eta)
    batch = collate(load_examples(SAMPLE, "auto", tokenizer, 96)[0][:3], tokenizer.pad_token_id, device)
    monkeypatch.setattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", dict(conversion._MODEL_TO_CONVERSION_PATTERN))
    exec(fix, {})  # as the user runs it
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, result.adapter_dir), batch),
                               logits(model, batch), rtol=1e-3, atol=1e-3)  # a few logits 2e-4 apart: fp32 sums
    assert peft_load_fix(tmp_path / "nowhere") == ""
