"""Shared fixtures: a tiny random Llama with a small BPE tokenizer saved as a safetensors folder, and data files."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"
os.environ.setdefault("FRUGAL_LORAGA_CACHE", str(Path.home() / ".cache" / "frugal_loraga"))
if not torch.cuda.is_available():  # kernels run through Triton's interpreter; must be set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def make_tiny_model_dir(path: Path, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so that gradients have structure beyond noise
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def one_block_budget(model, targets, batches):
    """The bytes the estimate holds for one decoder layer: with this budget each group holds one block."""
    from frugal_loraga.blocks import block_layout
    from frugal_loraga.experts import routes
    from frugal_loraga.lora import features
    from frugal_loraga.memory import layer_costs

    shapes = {n: features(m) for n, m in targets.items()}
    costs = layer_costs(shapes, max(b["input_ids"].numel() for b in batches),
                        model.get_input_embeddings().weight.element_size(), routes(targets))
    _, index = block_layout(model, list(targets))
    return max(sum(c for n, c in costs.items() if index[n] == i) for i in set(index.values()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def deep_model_dir(tmp_path_factory) -> Path:
    """Four decoder layers: room for several groups of whole layers in the gradient estimate."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-4"), layers=4)


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
