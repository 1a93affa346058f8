"""Bad model folders are refused with a ConfigError that says what is wrong and what to do, before any weights load."""
import json
import shutil
import socket
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertForMaskedLM, T5Config

from conftest import make_tokenizer
from frugal_loraga import Config, ConfigError
from frugal_loraga import models
from frugal_loraga.models import HostEmbedding, cached_model_ids, load_model, load_tokenizer, resolve_model_path


def weights_only(src, dst):
    """A copy of a model folder with its config and weights but no tokenizer files."""
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def config_folder(path, config, weights=True):
    """A folder with config.json and, if asked, a small valid safetensors file (the checks never look at tensors)."""
    config.save_pretrained(path)
    if weights:
        save_file({"w": torch.zeros(4)}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                                        "gpt_neox", "opt", "falcon", "olmo2", "granite", "mixtral", "qwen2_moe"])
def test_decoder_only_families_are_accepted(tmp_path, model_type):
    folder = config_folder(tmp_path / model_type, AutoConfig.for_model(model_type))
    assert resolve_model_path(str(folder)) == str(folder)


def test_the_tiny_llama_passes_every_check(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert load_tokenizer(str(tiny_model_dir), False).pad_token is not None


def test_bert_is_refused_as_an_encoder(tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert", safe_serialization=True)
    with pytest.raises(ConfigError, match=r"bert holds a 'bert' model \(BertForMaskedLM\), an encoder; frugal-loraga "
                                          r"fine-tunes decoder-only causal language models \(Llama, Qwen, Mistral"):
        resolve_model_path(str(tmp_path / "bert"))


def test_bert_saved_as_a_decoder_is_accepted(tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, is_decoder=True)
    assert resolve_model_path(str(config_folder(tmp_path / "bert", config)))


def test_encoder_decoder_is_refused(tmp_path):
    folder = config_folder(tmp_path / "t5", T5Config(d_model=32, num_layers=1), weights=False)
    with pytest.raises(ConfigError, match=r"holds a 't5' model, an encoder-decoder; frugal-loraga fine-tunes "
                                          r"decoder-only"):
        resolve_model_path(str(folder))


def test_malformed_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON \(Expecting property name enclosed in "
                                          r"double quotes: line 1 column 24 \(char 23\)\); replace it with the "
                                          r"original model's file"):
        resolve_model_path(str(tmp_path))


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json holds a JSON list, not an object"):
        resolve_model_path(str(tmp_path))


def test_unknown_model_type_says_upgrade(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mything"}')
    with pytest.raises(ConfigError, match=r"names model_type 'mything', which transformers \S+ does not know; "
                                          r"upgrade transformers \(pip install -U transformers\)"):
        resolve_model_path(str(tmp_path))


def test_remote_code_folder_asks_for_trust(tmp_path):
    auto_map = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mything", "auto_map": auto_map}))
    with pytest.raises(ConfigError, match=r"needs its own Python code \(auto_map in config\.json\); if you trust it, "
                                          r"set trust_remote_code \(--trust-remote-code\)"):
        resolve_model_path(str(tmp_path))


def test_missing_tokenizer_files(tiny_model_dir, tmp_path):
    folder = weights_only(tiny_model_dir, tmp_path / "no-tokenizer")
    assert resolve_model_path(str(folder)) == str(folder)
    with pytest.raises(ConfigError, match=r"no-tokenizer has no tokenizer files \(tokenizer\.json, tokenizer\.model, "
                                          r"vocab\.json, \.\.\.\); copy them from the original model folder"):
        load_tokenizer(str(folder), False)


def test_broken_tokenizer_file(tiny_model_dir, tmp_path):
    folder = weights_only(tiny_model_dir, tmp_path / "broken")
    (folder / "tokenizer.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"the tokenizer in \S+broken does not load \(.+\); copy its files again"):
        load_tokenizer(str(folder), False)


def test_pad_token_defaults_to_eos(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), False)
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"has neither a pad nor an eos token; add one"):
        load_tokenizer(str(tmp_path), False)


def test_truncated_safetensors_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ConfigError, match=rf"truncated/model\.safetensors is truncated or corrupt: its header lists "
                                          rf"{size} bytes but the file has {size // 2}; download or save it again"):
        resolve_model_path(str(folder))


@pytest.mark.parametrize("content, problem", [
    (b"abc", r"its header size field reads \d+ bytes but the file has 3"),
    ((5).to_bytes(8, "little") + b"{oops", r"its header does not parse \(JSONDecodeError: "),
    ((2).to_bytes(8, "little") + b"[]", r"its header does not parse \(AttributeError: "),
])
def test_corrupt_safetensors_header(tmp_path, content, problem):
    config_folder(tmp_path, AutoConfig.for_model("llama"), weights=False)
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ConfigError, match=r"model\.safetensors is truncated or corrupt: " + problem):
        resolve_model_path(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
    config_folder(tmp_path, AutoConfig.for_model("llama"))
    weight_map = {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"lacks model-00002-of-00002\.safetensors, listed in "
                                          r"model\.safetensors\.index\.json; download or copy it again"):
        resolve_model_path(str(tmp_path))


def test_weights_check_reads_only_the_headers(tmp_path):
    """A 16 GiB (sparse) safetensors file is checked in well under a second: the tensors are never read."""
    config_folder(tmp_path, AutoConfig.for_model("llama"), weights=False)
    data_bytes = 16 << 30
    header = json.dumps({"w": {"dtype": "F32", "shape": [data_bytes // 4], "data_offsets": [0, data_bytes]}}).encode()
    weights = tmp_path / "model.safetensors"
    with open(weights, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + data_bytes)
    start = time.perf_counter()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert time.perf_counter() - start < 0.5
    with open(weights, "r+b") as f:
        f.truncate(8 + len(header) + data_bytes - 1)
    with pytest.raises(ConfigError, match="is truncated or corrupt"):
        resolve_model_path(str(tmp_path))


def test_load_model_refuses_before_loading_weights(tiny_model_dir, tmp_path, sample_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the folder was refused")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_load)
    folder = weights_only(tiny_model_dir, tmp_path / "no-tokenizer")
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_model(Config(model=str(folder), data=str(sample_path), device="cpu", load_in_4bit=False))


def test_offline_hub_id_fails_at_once(monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'frugal-loraga-test/no-such-model' is not a local folder, and the Hugging "
                                          r"Face hub \(\S+\) cannot be reached to download it \(.*\); "
                                          r"connect to the network, or give a local model folder or 'demo'"):
        resolve_model_path("frugal-loraga-test/no-such-model")
    assert time.perf_counter() - start < 1


def test_invalid_hub_id(monkeypatch):
    with pytest.raises(ConfigError, match=r"'org--x/name' is neither a local folder nor a valid hub id"):
        resolve_model_path("org--x/name")


def test_models_in_the_hugging_face_cache_are_listed(tmp_path):
    """The app's model list: cached hub models with a config.json (they load offline); a dataset or a model whose
    config.json was never downloaded is left out, and no cache gives an empty list."""
    for repo, files in (("models--org--chat", ["config.json", "model.safetensors"]), ("models--org--partial",
                        ["tokenizer.json"]), ("datasets--org--data", ["config.json"])):
        snapshot = tmp_path / repo / "snapshots" / "abc123"
        snapshot.mkdir(parents=True)
        for name in files:
            (snapshot / name).write_text("{}")
        (tmp_path / repo / "refs").mkdir()
        (tmp_path / repo / "refs" / "main").write_text("abc123")
    assert cached_model_ids(str(tmp_path)) == ["org/chat"]
    assert cached_model_ids(str(tmp_path / "missing")) == []


def test_the_input_embedding_is_looked_up_in_cpu_memory_with_the_same_result(tiny_model_dir, tmp_path):
    """embeddings_on_cpu: the table leaves model.parameters() (so model.device is the device the rest runs on) and
    the logits are those of the model as loaded; a table the head shares stays where the head is."""
    on_host, _, _ = load_model(Config(data="x", model=str(tiny_model_dir), load_in_4bit=False, device="cpu"))
    plain, _, _ = load_model(Config(data="x", model=str(tiny_model_dir), load_in_4bit=False, device="cpu",
                                    embeddings_on_cpu=False))
    assert isinstance(on_host.get_input_embeddings(), HostEmbedding)
    assert on_host.get_input_embeddings().weight is not None
    assert not any(p is on_host.get_input_embeddings().weight for p in on_host.parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(on_host(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    tied = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    make_tokenizer().save_pretrained(tmp_path / "tied")
    model, _, _ = load_model(Config(data="x", model=str(tmp_path / "tied"), load_in_4bit=False, device="cpu"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not isinstance(model.get_input_embeddings(), HostEmbedding)


def edited_weights(tiny_model_dir, folder, edit):
    """A copy of the tiny model whose safetensors went through edit(name -> tensor)."""
    from safetensors.torch import load_file
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16-bit", "4-bit"])
def test_missing_or_renamed_weights_are_named_not_trained_from_random(tiny_model_dir, tmp_path, load_in_4bit):
    """transformers starts a weight the files lack at random (and the 4-bit path fails later in bitsandbytes)."""
    missing = edited_weights(tiny_model_dir, tmp_path / "missing", lambda t: t.pop(Q))
    renamed = edited_weights(tiny_model_dir, tmp_path / "renamed", lambda t: t.update({"attn.q": t.pop(Q)}))
    config = dict(data="x", device="cpu", load_in_4bit=load_in_4bit)
    with pytest.raises(ConfigError, match=rf"the weights of .*missing do not match its config.json: missing: {Q}\. "
                                          r"Download or save the model again"):
        models.load_base(Config(model=str(missing), **config), str(missing))
    with pytest.raises(ConfigError, match=rf"missing: {Q}; in the files but not used \(renamed\?\): attn.q\."):
        models.load_base(Config(model=str(renamed), **config), str(renamed))


def test_a_weight_of_another_shape_is_refused_before_the_weights_load(tiny_model_dir, tmp_path):
    folder = edited_weights(tiny_model_dir, tmp_path / "shape", lambda t: t.update({Q: t[Q][:32].contiguous()}))
    skeleton = models.model_skeleton(AutoConfig.from_pretrained(folder), False)
    with pytest.raises(ConfigError, match=rf"model.safetensors holds {Q} of shape \[32, 64\], but the model its "
                                          r"config.json describes needs \[64, 64\]; use the config.json saved with"):
        models.check_weight_shapes(str(folder), skeleton)
    models.check_weight_shapes(str(tiny_model_dir), skeleton)  # the sound folder passes
