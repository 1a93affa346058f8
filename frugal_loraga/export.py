"""Export as a standard PEFT LoRA adapter that peft.PeftModel loads on the base model.

With a frozen initial adapter the layer computes eta (B A - B0 A0) x = eta [B | -B0] [A ; A0] x, a LoRA of rank 2r:
  lora_A = [A ; A0] (2r x n), lora_B = [B | -B0] (m x 2r), r' = 2r.
For the 4-bit base (with_correction), the frozen correction L R (nf4_error.py) joins it: rank r' = 2r + q,
  lora_A = [A ; A0 ; R],  lora_B = [B | -B0 | L / eta];
without it, the adapter is for the original base, whose weights the correction stands in for.
alpha' keeps PEFT's scaling at eta: alpha' = eta sqrt(r') with rsLoRA, else eta r' (sqrt(2) alpha, 2 alpha for 2r).
Plain LoRA exports as is (rank r, alpha). An expert stack's experts each export so, in PEFT's layout of fused
experts (target_parameters: experts.to_peft).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .checkpoint import ADAPTER_FILES, atomic_write
from .config import Config
from .experts import ExpertsLora, peft_prefixes, to_peft


def export_adapter(layers: dict[str, nn.Module], config: Config, base_model: str, out_dir: str | Path,
                   with_correction: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into out_dir, each replaced atomically; any other file
    in out_dir is left alone. with_correction: for the 4-bit base, the layers' corrections (all of one rank q)
    included. Expert stacks (experts.py) export as PEFT's target_parameters, each expert's factors as above."""
    out_dir = Path(out_dir)
    q = max(layer.R.shape[0] if layer.R.numel() else 0 for layer in layers.values())
    frozen = any(layer.has_frozen for layer in layers.values())
    stacks = {name: layer for name, layer in layers.items() if isinstance(layer, ExpertsLora)}
    prefixes = {name: f"base_model.model.{name}" for name in layers} | peft_prefixes(stacks)
    tensors, eta = {}, config.eta
    for name, layer in layers.items():
        A, B = layer.A.detach(), layer.B.detach()
        if frozen:
            A, B = torch.cat([A, layer.A0], dim=-2), torch.cat([B, -layer.B0], dim=-1)
        if with_correction:  # a layer left uncorrected (nf4_error.py says which) and an expert stack get zeros
            L, R = layer.correction or (B.new_zeros(*B.shape[:-1], q), A.new_zeros(*A.shape[:-2], q, A.shape[-1]))
            A, B = torch.cat([A, R], dim=-2), torch.cat([B, L / eta], dim=-1)
        if name in stacks:
            A, B = to_peft(A, B)
        tensors[f"{prefixes[name]}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"{prefixes[name]}.lora_B.weight"] = B.float().cpu().contiguous()
    rank = (2 if frozen else 1) * config.rank + (q if with_correction else 0)
    alpha = config.alpha if rank == config.rank else eta * (math.sqrt(rank) if config.use_rslora else rank)
    peft_config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=config.use_rslora, lora_dropout=0.0, bias="none",
                             target_modules=sorted(set(layers) - set(stacks)), target_parameters=sorted(stacks),
                             task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                             fan_in_fan_out=any(isinstance(getattr(layer, "base", None), Conv1D)
                                                for layer in layers.values()))
    config_json = json.dumps(peft_config.to_dict(), indent=2, sort_keys=True, default=sorted)  # sets as lists
    config_file, weights_file = ADAPTER_FILES
    atomic_write(out_dir / config_file, lambda tmp: tmp.write_text(config_json))
    atomic_write(out_dir / weights_file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return out_dir


def peft_load_fix(adapter_dir: str | Path, model_type: str | None = None) -> str:
    """The line to run before PeftModel.from_pretrained loads this adapter (of a model of model_type: by default read
    from its base's config.json on this machine, no remote code run), or "" where none is needed. PEFT (0.21)
    rewrites the config of an adapter for a mixture-of-experts family that transformers converts from its v4 layout
    (DeepSeek-V2/V3, GLM-4-MoE, ...) as if it had been trained under transformers 4: it takes linear layers named as
    v4 named the experts' projections (a dense layer's or a shared expert's gate_proj, up_proj, down_proj) for
    experts, drops them from the targets and doubles the experts' rank, so the adapter does not load (or loads
    without them). Taking the family out of PEFT's table of v4 layouts (a private one) leaves the config as saved."""
    try:
        from peft.utils.transformers_weight_conversion import (_MODEL_TO_CONVERSION_PATTERN,
                                                               _MOE_TARGET_MODULE_MAPPING)
        from transformers import AutoConfig
        saved = json.loads((Path(adapter_dir) / ADAPTER_FILES[0]).read_text())
        model_type = model_type or AutoConfig.from_pretrained(saved["base_model_name_or_path"], local_files_only=True,
                                                              trust_remote_code=False).model_type
    except Exception:  # another PEFT, or a base that cannot be read here: nothing known to fix
        return ""
    v4_names = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {})
    if not any(t == name or t.endswith(f".{name}") for t in saved.get("target_modules") or [] for name in v4_names):
        return ""
    return ("import peft.utils.transformers_weight_conversion as conversion; "
            f"conversion._MODEL_TO_CONVERSION_PATTERN.pop({model_type!r}, None)  # PEFT would misread this adapter")
