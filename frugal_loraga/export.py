"""Export as a standard PEFT LoRA adapter that peft.PeftModel loads on the ORIGINAL base model.

With a frozen initial adapter the layer computes eta (B A - B0 A0) x = eta' [B | -B0] [A ; A0] x, a LoRA of rank 2r:
  lora_A = [A ; A0] (2r x n), lora_B = [B | -B0] (m x 2r), r' = 2r,
  alpha' keeps eta: alpha' = sqrt(2) alpha with rsLoRA (alpha'/sqrt(2r) = alpha/sqrt(r)), else 2 alpha.
Plain LoRA exports as is (rank r, alpha).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .checkpoint import ADAPTER_FILES, atomic_write
from .config import Config
from .lora import LoraLinear


def export_adapter(layers: dict[str, LoraLinear], config: Config, base_model: str, out_dir: str | Path) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into out_dir, each replaced atomically; any other file
    in out_dir is left alone."""
    out_dir = Path(out_dir)
    frozen = any(layer.has_frozen for layer in layers.values())
    tensors = {}
    for name, layer in layers.items():
        A, B = layer.A.detach(), layer.B.detach()
        if frozen:
            A, B = torch.cat([A, layer.A0]), torch.cat([B, -layer.B0], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().cpu().contiguous()
    rank = 2 * config.rank if frozen else config.rank
    alpha = config.alpha * ((math.sqrt(2) if config.use_rslora else 2) if frozen else 1)
    peft_config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=config.use_rslora, lora_dropout=0.0, bias="none",
                             target_modules=sorted(layers), task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                             fan_in_fan_out=any(isinstance(layer.base, Conv1D) for layer in layers.values()))
    config_json = json.dumps(peft_config.to_dict(), indent=2, sort_keys=True, default=sorted)  # sets as lists
    config_file, weights_file = ADAPTER_FILES
    atomic_write(out_dir / config_file, lambda tmp: tmp.write_text(config_json))
    atomic_write(out_dir / weights_file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return out_dir
