"""Trying a trained adapter: greedy generation from one prompt with the base model and with the adapter.

The prompt is fed the way the run's data was trained (data.render / data.tokenize): a chat turn for alpaca and chat
data, the raw text for text and prompt_completion data. A Generator holds at most one loaded model, keyed by the
base model and the adapter's file contents, so that an adapter retrained into the same folder is loaded again.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig

from .blocks import without_cudnn_attention
from .checkpoint import ADAPTER_FILES, checkpoint_path, factors_from_checkpoint, file_sha256
from .config import Config
from .data import chat_template, read_data
from .errors import ConfigError
from .experts import ExpertsLora
from .experts_4bit import loads_stacks_in_4bit
from .lora import inject, replace as replace_modules
from .memory import CUDA_HEADROOM_BYTES, GIB, decoder_shapes, free_bytes, weight_bytes
from .models import load_model, model_skeleton, release, resolve_device, resolve_model_path


def prompt_text(tokenizer, prompt: str, data_format: str, template: str = "model") -> tuple[str, bool]:
    """The text to feed for `prompt` and whether the tokenizer adds its special tokens, as data.tokenize trained
    `data_format`: alpaca and chat as a user turn in the chat template chosen (data.chat_template) with the
    assistant's turn opened, no special tokens added; text and prompt_completion as the raw prompt, with the
    tokenizer's special tokens (a BOS, for most)."""
    if data_format not in ("alpaca", "chat", "sharegpt"):
        return prompt, True
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer, template),
                                         tokenize=False, add_generation_prompt=True)
    return text, False


def run_format(config: Config) -> str:
    """The data format a run trained with: config.data_format, or the one detected from its data file (its columns
    mapped) when auto."""
    if config.data_format != "auto":
        return config.data_format
    return read_data(config.data, "auto", config.column_map())[1]


def adapter_digest(adapter_dir: str | Path) -> str:
    """A SHA-256 of the adapter's config and weights: it changes whenever a run writes a new adapter there."""
    return hashlib.sha256("".join(file_sha256(Path(adapter_dir) / name) for name in ADAPTER_FILES).encode()).hexdigest()


def check_base_fits(config: Config) -> None:
    """ConfigError, before it loads, when Try's base for PEFT cannot fit the memory free: a mixture of experts' stacks
    load in 16 bits there (Generator.load), which can be several times its 4-bit weights."""
    path = resolve_model_path(config.model, config.trust_remote_code)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if decoder_shapes(model_config) is not None:
        return
    weights, experts = weight_bytes(model_skeleton(model_config, config.trust_remote_code), config)
    device = resolve_device(config)
    free = free_bytes(device)
    if experts and weights + (CUDA_HEADROOM_BYTES if device.type == "cuda" else 0) > free:
        raise ConfigError(f"Try loads the base as PEFT does, its mixture-of-experts expert stacks in 16 bits: about "
                          f"{weights / GIB:.1f} GiB ({experts / GIB:.1f} of them experts) where {free / GIB:.1f} GiB "
                          "is free; use the run's adapter with PEFT on a machine with more memory")


@dataclass
class Completion:
    """One generation: the new text, its token ids, and whether max_new_tokens cut it (no end-of-sequence token)."""
    text: str
    tokens: list[int]
    cut: bool


class AdaptedModel(nn.Module):
    """A model with the run's own adapter layers in it (lora.inject of its checkpoint), standing in for a PeftModel
    where PEFT cannot load the adapter: on 4-bit expert stacks (experts_4bit.py). disable_adapter() puts the model's
    own layers back meanwhile (the base, as PEFT's disable_adapter gives it)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        super().__init__()
        self.model, self.layers = model, layers
        self.generation_config = model.generation_config

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)

    @contextlib.contextmanager
    def disable_adapter(self):
        originals = {}
        for name, layer in self.layers.items():
            if isinstance(layer, ExpertsLora):  # its experts module, where the AdaptedExperts holding it stands
                originals[name.rpartition(".")[0]] = layer.target.owner
            else:
                originals[name] = layer.base
        replace_modules(self.model, originals)
        try:
            yield
        finally:
            replace_modules(self.model, self.layers)


def trained_on_4bit_stacks(config: Config, adapter_dir: Path) -> bool:
    """Whether the run's adapter adapts expert stacks that it trained in NF4 (Config.quantize_experts)."""
    adapter = json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())
    return bool(adapter.get("target_parameters")) and config.load_in_4bit and config.quantize_experts and \
        loads_stacks_in_4bit()


class Generator:
    """Holds at most one base model with an adapter loaded, for generating with and without the adapter.

    load(config, adapter_dir) loads the run's base (models.load_model) and its adapter (peft; for a run trained on
    4-bit expert stacks, its checkpoint's layers: AdaptedModel), unless the same base and the same adapter contents
    are loaded already; a different one replaces it, released first, so that two
    models are never held at once. release() frees it (before training, so that the run finds the memory free).
    Calls are serialised by a lock: two Try clicks at once do not load two models."""

    def __init__(self):
        self.key: Optional[tuple] = None  # (model, load settings, adapter folder, adapter digest) of what is loaded
        self.model = None  # peft.PeftModel, or an AdaptedModel
        self.tokenizer = None
        self.device: Optional[torch.device] = None
        self.data_format: Optional[str] = None
        self.template = "model"  # the run's chat template choice
        self.loads = 0  # how many times a model was loaded
        self._format_of: Optional[tuple] = None  # (data, data_format, columns) that data_format was found for
        self._lock = threading.RLock()

    def load(self, config: Config, adapter_dir: str | Path) -> None:
        """Make the run's base model with the adapter in adapter_dir the one loaded. PEFT nests its adapters on 4-bit
        expert stacks (parametrized, experts_4bit.py) in another order than the export's: a run trained on them runs
        as it trained, from its checkpoint (AdaptedModel, the same factors as its export); with PEFT, stacks load in
        16 bits, as transformers' 4-bit model has them."""
        from peft import PeftModel
        adapter_dir = Path(adapter_dir).resolve()
        ours = trained_on_4bit_stacks(config, adapter_dir)
        config = replace(config, quantize_experts=ours)
        key = (config.model, config.load_in_4bit, config.quantize_experts, config.dtype, config.device,
               config.trust_remote_code, str(adapter_dir), adapter_digest(adapter_dir))
        with self._lock:
            if (config.data, config.data_format, config.columns) != self._format_of:
                self.data_format = run_format(config)
                self._format_of = (config.data, config.data_format, config.columns)
            self.template = config.chat_template
            if key == self.key:
                return
            self.release()
            if ours:
                path = checkpoint_path(adapter_dir.parent)
                if not path.exists():
                    raise ConfigError(f"Try runs a model trained on 4-bit expert stacks from its checkpoint (PEFT "
                                      f"cannot load its adapter there), and {path} is gone; use the adapter with PEFT")
                model, tokenizer, device = load_model(config)
                state = torch.load(path, map_location="cpu", weights_only=True)
                factors, corrections = factors_from_checkpoint(state["adapter"], device)
                self.model = AdaptedModel(model, inject(model, factors, config.eta, corrections)).eval()
            else:
                check_base_fits(config)
                model, tokenizer, device = load_model(config)
                self.model = PeftModel.from_pretrained(model, adapter_dir).eval()
            self.tokenizer, self.device, self.key = tokenizer, device, key
            self.loads += 1

    def release(self) -> None:
        """Free the loaded model, its GPU memory included; nothing is held afterwards."""
        with self._lock:
            model, self.model, self.tokenizer, self.key = self.model, None, None, None
            if model is None:
                return
            release(model)  # bitsandbytes' weight <-> module cycle
            del model
            gc.collect()  # any other cycle through the model, so that its memory is free now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def generate(self, prompt: str, max_new_tokens: int = 64) -> dict[str, Completion]:
        """Greedy completions of `prompt` by the base model ("base") and with the adapter ("adapter"); load first."""
        with self._lock:
            if self.model is None:
                raise RuntimeError("no model is loaded: call load(config, adapter_dir) first")
            with self.model.disable_adapter():
                base = self._complete(prompt, int(max_new_tokens))
            return {"base": base, "adapter": self._complete(prompt, int(max_new_tokens))}

    def _complete(self, prompt: str, max_new_tokens: int) -> Completion:
        tokenizer = self.tokenizer
        text, special = prompt_text(tokenizer, prompt, self.data_format, self.template)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(self.device)
        eos = self._eos_ids()
        with torch.no_grad(), without_cudnn_attention():  # cuDNN's would plan kernels for every new length
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                      eos_token_id=sorted(eos) or None, pad_token_id=tokenizer.pad_token_id)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        cut = not tokens or tokens[-1] not in eos  # nothing stops greedy decoding early but an end-of-sequence token
        return Completion(tokenizer.decode(tokens, skip_special_tokens=True), tokens, cut)

    def _eos_ids(self) -> set[int]:
        """The tokens that end a generation: the model's generation config's and the tokenizer's end-of-sequence."""
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}
