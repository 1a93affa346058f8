"""Trying an adapter: prompts fed as the run's format was trained, one model held, a retrained adapter reloaded."""
import dataclasses
import gc
import weakref

import pytest
import torch

from conftest import SAMPLE, make_tokenizer, write_jsonl
from frugal_loraga import Config, finetune
from frugal_loraga import generate as gen_module
from frugal_loraga.data import IGNORE, render, tokenize
from frugal_loraga.generate import Completion, Generator, prompt_text, run_format

PROMPT = "Ada has 2 apples and buys 3 more. How many apples?"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bos_tokenizer(chat_template=None):
    """The tests' tokenizer, made to add a BOS as add_special_tokens asks (as Llama's does), with or without a
    chat template of its own."""
    from tokenizers.processors import TemplateProcessing
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = chat_template
    return tokenizer


def prompt_ids(tokenizer, record: dict, fmt: str) -> list[int]:
    """The token ids data.tokenize trains a record with, up to the first one that carries loss (and its EOS)."""
    (example,), _ = tokenize([record], fmt, tokenizer, 512, ["record 1"])
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    return example.input_ids[:first]


@pytest.mark.parametrize("template", [None, CHATML], ids=["plain-template", "own-template"])
def test_chat_formats_prompt_as_a_user_turn_opening_the_answer(template):
    tokenizer = bos_tokenizer(template)
    chat = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "5 apples."}]}
    records = {"alpaca": {"instruction": PROMPT, "output": "5 apples."}, "chat": chat}
    for fmt, record in records.items():
        text, special = prompt_text(tokenizer, PROMPT, fmt)
        rendered, spans = render(record, fmt, tokenizer)
        assert text == rendered[:spans[0][0]] and special is False, fmt
        assert tokenizer(text, add_special_tokens=special)["input_ids"] == prompt_ids(tokenizer, record, fmt), fmt
        assert text.startswith("<|im_start|>user\n" if template else "### User:\n")
        plain, _ = prompt_text(tokenizer, PROMPT, fmt, "plain")  # the choice a run made (Config.chat_template)
        assert plain == render(record, fmt, tokenizer, "plain")[0][:len(plain)] and plain.startswith("### User:\n")


def test_text_formats_prompt_raw_with_special_tokens():
    tokenizer = bos_tokenizer(CHATML)  # a chat template of its own, which these formats were not trained with
    for fmt, record in {"prompt_completion": {"prompt": PROMPT, "completion": " 5 apples."},
                        "text": {"text": PROMPT}}.items():
        text, special = prompt_text(tokenizer, PROMPT, fmt)
        assert (text, special) == (PROMPT, True), fmt
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        (example,), _ = tokenize([record], fmt, tokenizer, 512, ["record 1"])
        trained = prompt_ids(tokenizer, record, fmt) if fmt == "prompt_completion" else example.input_ids[:-1]
        assert ids == trained, fmt  # prompt_completion: the tokens before the completion; text: all but the EOS


def test_run_format_detects_auto_from_the_data_file(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "A sentence."}, {"text": "Another."}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 3.", "output": "5"}])
    assert run_format(Config(data=str(text))) == "text"
    assert run_format(Config(data=str(alpaca), data_format="auto")) == "alpaca"
    assert run_format(Config(data=str(text), data_format="chat")) == "chat"  # as configured: the file is not read


def tiny_config(model_dir, out, **changes) -> Config:
    return Config(model=str(model_dir), data=str(SAMPLE), steps=2, rank=2, estimation_samples=4, max_length=96,
                  load_in_4bit=False, out=str(out), progress=False, **changes)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    config = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run"))
    return config, finetune(config).adapter_dir


def test_generate_reports_output_cut_at_max_new_tokens_or_ended(trained_run):
    config, adapter_dir = trained_run
    generator = Generator()
    generator.load(config, adapter_dir)
    assert generator.data_format == "alpaca"  # the sample, detected
    out = generator.generate(PROMPT, max_new_tokens=3)
    assert set(out) == {"base", "adapter"}
    for completion in out.values():
        assert isinstance(completion, Completion) and isinstance(completion.text, str)
        assert len(completion.tokens) == 3 and completion.cut
    # the base output is the base model's greedy continuation of the prompt in the chat template (alpaca)
    from frugal_loraga.models import load_model
    model, tokenizer, _ = load_model(config)
    text, special = prompt_text(tokenizer, PROMPT, "alpaca")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=special)
    expected = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out["base"].tokens == expected[0, ids["input_ids"].shape[1]:].tolist()
    # a generation that ends with an end-of-sequence token is not cut, though it stops before max_new_tokens
    first = out["base"].tokens[0]
    generator.model.generation_config.eos_token_id = first
    ended = generator.generate(PROMPT, max_new_tokens=3)["base"]
    assert ended.tokens == [first] and not ended.cut
    generator.release()


def test_a_retrained_adapter_in_the_same_folder_is_loaded_again(tiny_model_dir, tmp_path, monkeypatch):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    config = tiny_config(tiny_model_dir, tmp_path / "run")
    adapter_dir = finetune(config).adapter_dir
    generator = Generator()
    generator.load(config, adapter_dir)
    generator.load(config, adapter_dir)
    assert generator.loads == 1  # the same adapter: the loaded model serves it
    old, old_key = weakref.ref(generator.model), generator.key
    retrained = dataclasses.replace(config, overwrite=True, lr=1e-2, seed=1)
    assert finetune(retrained).adapter_dir == adapter_dir
    held_at_load = []  # whether the old model was still alive when the new one started loading
    load_model = gen_module.load_model
    monkeypatch.setattr(gen_module, "load_model", lambda c: held_at_load.append(old() is not None) or load_model(c))
    generator.load(retrained, adapter_dir)
    assert generator.loads == 2 and generator.key != old_key and held_at_load == [False]
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(generator.model)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[name].float().cpu(), tensor) for name, tensor in saved.items())
    assert generator.generate(PROMPT, max_new_tokens=2)["adapter"].tokens
    generator.release()


def test_release_leaves_no_model_held(trained_run):
    config, adapter_dir = trained_run
    generator = Generator()
    generator.load(config, adapter_dir)
    model = weakref.ref(generator.model)
    generator.release()
    assert generator.model is None and generator.tokenizer is None and generator.key is None
    gc.collect()
    assert model() is None
    with pytest.raises(RuntimeError, match="load"):
        generator.generate(PROMPT, max_new_tokens=2)
    generator.load(config, adapter_dir)  # released, the same adapter loads again
    assert generator.loads == 2 and generator.model is not None
    generator.release()
    generator.release()  # nothing held: a no-op
