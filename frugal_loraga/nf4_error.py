"""The 4-bit base's quantization error that the data sees, absorbed by a frozen low-rank correction (as CLoQ does).

For a target layer with original weight W (m x n, read from the model's safetensors files) and 4-bit weight Q (the
loaded NF4 weight, dequantized), E = W - Q. Over the calibration tokens X (N x n) that reach the layer, with
H = X^T X + lambda I = C C^T (Cholesky, lambda = RIDGE x mean of diag(X^T X)), the rank-q correction L R closest to E
on those inputs,
    min over rank-q L R of  ||(E - L R) X^T||_F  ~  ||(E - L R) C||_F,
is the top-q SVD of E C = U S V^T:  L = U S (m x q),  R = V^T C^-1 (q x n).
The layer then computes Q x + L (R x) (lora.FrozenLinear). The base stays the untouched NF4 weight; the LoRA-GA
gradient is then estimated at the corrected model, whose output is closer to the original model's than the 4-bit
model's is.
The decoder layers (blocks) are calibrated from the bottom up, a group at a time within the memory budget (each
target's H is n x n fp32): a group's grams come from a no-grad forward of the base model that ends after the group,
with the corrections of the groups below already in place, so each correction sees what the corrected model below
gives it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from .blocks import attention_for, block_layout
from .distributed import from_rank0_
from .estimate.inputs import forward_until
from .estimate.tap import accumulate_outer
from .lora import Correction, FrozenLinear, features, replace
from .nf4 import FourBitWeight
from .svd import top_singular

log = logging.getLogger("frugal_loraga")
RIDGE = 1e-2


class OriginalWeights:
    """The weights of a model's safetensors files, read one tensor at a time (never the whole model in memory)."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {key: folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))

    @classmethod
    def of(cls, model_path: str) -> Optional["OriginalWeights"]:
        """For a model folder or a hub id in the local cache; None where no safetensors files are found."""
        folder = Path(model_path)
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download
                folder = Path(snapshot_download(model_path, local_files_only=True))
            except Exception:  # not cached as files we can read: no correction
                return None
        weights = cls(folder)
        return weights if weights.files else None

    def weight(self, name: str, shape: tuple[int, int]) -> Optional[torch.Tensor]:
        """The weight (m x n) of the module `name` as saved ('model.layers.0.mlp.up_proj.weight', or without the
        first part of the name, as GPT-2's files are), transposed where saved as (n x m) (Conv1D); None if absent."""
        for key in (f"{name}.weight", f"{name.partition('.')[2]}.weight"):
            if key in self.files:
                with safe_open(str(self.files[key]), "pt") as f:
                    tensor = f.get_tensor(key)
                if tuple(tensor.shape) == shape:
                    return tensor
                if tuple(tensor.shape) == shape[::-1]:
                    return tensor.T
        return None


def best_correction(error: torch.Tensor, gram: torch.Tensor, rank: int, svd: str = "lowrank") -> Correction:
    """(L (m x rank), R (rank x n)) minimizing ||(error - L R) C||_F, C C^T = gram + ridge (module docstring); fp32.
    svd: exact, or lowrank (randomized: near the optimum, much faster on large layers; svd.py). gram is overwritten."""
    gram.diagonal().add_(RIDGE * gram.diagonal().mean().clamp_min(1e-12))
    C = torch.linalg.cholesky(gram)
    top = top_singular({"E C": error @ C}, rank, svd)["E C"]
    R = torch.linalg.solve_triangular(C, top.V.T.contiguous(), upper=False, left=False)  # R C = V^T
    L, missing = top.U * top.S, rank - top.S.numel()  # a layer narrower than the rank: zeros make up the rest
    return (torch.nn.functional.pad(L, (0, missing)).contiguous(),
            torch.nn.functional.pad(R, (0, 0, 0, missing)).contiguous())


def nf4_corrections(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], rank: int,
                    budget_bytes: int, weights: OriginalWeights, progress=None,
                    svd: str = "lowrank") -> dict[str, Correction]:
    """name -> (L, R) for every 4-bit target whose original weight is in `weights` (the others are left out, named
    in a warning), from the calibration `batches`, a group of blocks at a time holding at most `budget_bytes` of
    grams (at least one block). progress(done, total) at the start and after each group. The model is left as it was found."""
    originals, missing = {}, []
    for name, module in targets.items():
        m, n = features(module)
        if FourBitWeight.of(module) is not None and (weight := weights.weight(name, (m, n))) is not None:
            originals[name] = weight
        else:
            missing.append(name)
    blocks, index = block_layout(model, list(originals))
    missing += [name for name in originals if index[name] is None]
    if missing:
        log.warning("the 4-bit error of %d layer(s) is not corrected (not 4-bit, outside the decoder layers or no "
                    "saved weight found): %s", len(missing), ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    groups = _groups([[n for n in originals if index[n] == i] for i in range(len(blocks))], targets, budget_bytes)
    corrections: dict[str, Correction] = {}
    was_training, used_cache = model.training, model.config.use_cache
    try:
        model.eval()
        model.config.use_cache = False
        if progress:
            progress(0, len(groups))
        for done, (top, names) in enumerate(groups):
            grams = _grams(model, blocks[top], {n: targets[n] for n in names}, batches)
            for name in names:
                dequantized = FourBitWeight.of(targets[name])().float()
                error = originals.pop(name).to(dequantized.device, torch.float32).sub_(dequantized)
                corrections[name] = best_correction(error, grams.pop(name), rank, svd)
                from_rank0_(list(corrections[name]))  # under torchrun: the same bits on every rank
                del dequantized, error
            replace(model, {n: FrozenLinear(targets[n], corrections[n]) for n in names})  # in place for the groups above
            if progress:
                progress(done + 1, len(groups))
    finally:
        replace(model, targets)
        model.train(was_training)
        model.config.use_cache = used_cache
    return corrections


def _groups(names_by_block: list[list[str]], targets: dict[str, nn.Module],
            budget_bytes: int) -> list[tuple[int, list[str]]]:
    """Consecutive blocks whose grams (4 n^2 bytes a target) fit the budget together (a block alone may not):
    (the group's top block, its targets), bottom up; blocks without targets are left out."""
    groups, names, held, top = [], [], 0, None
    for block, block_names in enumerate(names_by_block):
        if not block_names:
            continue
        cost = sum(4 * features(targets[n])[1] ** 2 for n in block_names)
        if names and held + cost > budget_bytes:
            groups.append((top, names))
            names, held = [], 0
        names, held, top = names + block_names, held + cost, block
    if names:
        groups.append((top, names))
    return groups


def _grams(model: nn.Module, top: nn.Module, layers: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """name -> X^T X (n x n, fp32) of each layer's inputs at the batches' tokens (attention_mask; pads left out),
    from forwards of the base model (no head) that end after block `top`, with the attention kernels the estimate
    uses for these widths (blocks.attention_for)."""
    device = batches[0]["input_ids"].device
    grams = {name: torch.zeros(features(layer)[1], features(layer)[1], device=device) for name, layer in layers.items()}
    tokens = {}  # the current batch's token positions (B x T, bool)

    def accumulate(name: str, x: torch.Tensor) -> None:
        rows = x[tokens["mask"]]
        accumulate_outer(grams[name], rows, rows)

    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: accumulate(name, args[0]))
               for name, layer in layers.items()]
    try:
        with attention_for({batch["input_ids"].shape[1] for batch in batches}):
            for batch in batches:
                tokens["mask"] = batch["attention_mask"].bool()
                forward_until(model.base_model, top, {"input_ids": batch["input_ids"]})
    finally:
        for handle in handles:
            handle.remove()
    return grams
