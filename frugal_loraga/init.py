"""Initial adapter factors: LoRA-GA from the gradient's singular vectors, or plain LoRA (initial_factors); and on a
4-bit base the frozen correction of its quantization error (initial_corrections, nf4_error.py), made first.

LoRA-GA (reference code's choices), with G ~ U diag(S) V^T the top-2r SVD of the layer's gradient (m x n):
  ArB2r: A0 = V[:, :r]^T (r x n),     B0 = U[:, r:2r] (m x r)
  A2rBr: A0 = V[:, r:2r]^T,           B0 = U[:, :r]
  scale stable: A0, B0 *= m^(1/4) / sqrt(gamma);  gd: A0, B0 /= eta;  unit: unchanged.  S is not used.
The model stays unchanged at step 0 because the frozen copy (A0, B0) is subtracted (see lora.py).
Plain LoRA: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B = 0.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from .config import Config
from .data import causal_inputs, collate
from .distributed import is_writer
from .estimate import estimate_gradient_svd
from .lora import Correction, features
from .memory import default_budget_bytes
from .nf4_error import OriginalWeights, nf4_corrections
from .progress import Metrics, Phase, ProgressFn
from .svd import LayerSVD

log = logging.getLogger("frugal_loraga")


def lora_ga_factors(svd: LayerSVD, rank: int, direction: str, scale: str, gamma: float,
                    eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r x n), B0 (m x r)) in fp32; stacked (E x r x n, E x m x r) for an expert stack's stacked SVD."""
    U, V, r = svd.U.float(), svd.V.float(), rank
    if direction == "ArB2r":
        A0, B0 = V[..., :r].mT, U[..., r:2 * r]
    else:
        A0, B0 = V[..., r:2 * r].mT, U[..., :r]
    m = U.shape[-2]
    factor = {"stable": m ** 0.25 / gamma ** 0.5, "gd": 1 / eta, "unit": 1.0}[scale]
    return (A0 * factor).contiguous(), (B0 * factor).contiguous()


def lora_factors(shape: tuple[int, ...], rank: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r x n) Kaiming-uniform, B (m x r) zeros) in fp32 for a weight of shape (m, n); stacked for (E, m, n)."""
    *experts, m, n = shape
    bound = 1 / math.sqrt(n)  # kaiming_uniform_ with a = sqrt(5) gives U(-1/sqrt(n), 1/sqrt(n))
    A = (torch.rand(*experts, rank, n, generator=generator) * 2 - 1) * bound
    return A.to(device), torch.zeros(*experts, m, rank, device=device)


def dead_pairs_as_lora(name: str, A0: torch.Tensor, B0: torch.Tensor, generator: torch.Generator) -> None:
    """Rank pairs (row j of A0, column j of B0) that are both zero could never train (each one's gradient holds the
    other): a gradient of rank below 2r gives them, as an expert no estimation token reached (a zero gradient) does.
    Their A0 rows start as plain LoRA's (Kaiming-uniform; B0's column stays zero), in place, with a warning."""
    dead = (A0 == 0).all(dim=-1) & (B0 == 0).all(dim=-2)  # (..., r)
    if dead.any():
        n = A0.shape[-1]
        A0[dead] = ((torch.rand(int(dead.sum()), n, generator=generator) * 2 - 1) / math.sqrt(n)).to(A0.device)
        log.warning("%d of the %d rank pairs of %s had a zero gradient direction (%s): they start as plain LoRA",
                    int(dead.sum()), dead.numel(), name, "experts no estimation token reached, or a gradient of "
                    "lower rank" if A0.dim() == 3 else "a gradient of lower rank than 2 x rank")


def estimation_batches(train_examples, config: Config, pad_id: int, device, masked: bool = False) -> list[dict]:
    """The LoRA-GA estimation batches: estimation_samples examples drawn by the seed, estimation_batch_size each, each
    batch right-padded to its longest example's padded_width (a multiple of 8), with no attention mask (causal_inputs;
    masked: with it, as collate gives it).
    When the widths differ, the estimate compiles its blocks for any width and leaves cuDNN's attention out, as
    training does (blocks.attention_for). On examples of varying lengths this runs fewer tokens than padding every
    batch to the longest example, and the graphs for any width serve every data set, where one width's serve only
    data whose longest example pads to that width (measured in bench/RESULTS.md)."""
    order = list(range(len(train_examples)))
    random.Random(config.seed).shuffle(order)
    picked = [train_examples[i] for i in order[:config.estimation_samples]]
    size = config.estimation_batch_size
    batches = [collate(picked[i:i + size], pad_id, device) for i in range(0, len(picked), size)]
    return batches if masked else [causal_inputs(batch) for batch in batches]


class StoppedInEstimate(Exception):
    """The stop switch was set during the LoRA-GA estimate (checked after each batch)."""


def initial_corrections(model, targets, train_examples, config: Config, model_path: str, pad_id: int, device,
                        progress: Optional[ProgressFn] = None,
                        stop: Optional[threading.Event] = None) -> tuple[dict[str, Correction], Metrics]:
    """name -> (L, R), the 4-bit error's corrections (nf4_error.py) from the estimation samples, with load_in_4bit
    and nf4_error_rank > 0 (else none), and their metrics; raises StoppedInEstimate once `stop` is set."""
    if not (config.load_in_4bit and config.nf4_error_rank):
        return {}, Metrics()
    weights = OriginalWeights.of(model_path)
    if weights is None:
        log.warning("no safetensors files found for %s: the 4-bit error is not corrected", model_path)
        return {}, Metrics()
    start = time.perf_counter()
    batches = estimation_batches(train_examples, config, pad_id, device, masked=True)
    with tqdm(desc="4-bit error correction", unit="part", disable=not (config.progress and is_writer()),
              dynamic_ncols=True) as bar:
        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if progress:
                progress(Phase.CORRECTING, done, total, {})
            if stop is not None and stop.is_set():
                raise StoppedInEstimate
        corrections = nf4_corrections(model, targets, batches, config.nf4_error_rank, budget_bytes(config, device),
                                      weights, report, config.svd)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the calibration's blocks (of many sizes) back: the estimate lays out its own
    return corrections, Metrics(correction_seconds=time.perf_counter() - start, corrected_layers=len(corrections))


def budget_bytes(config: Config, device) -> int:
    """What the estimate and the correction may hold at once: grad_budget_gib, else the default."""
    return int(config.grad_budget_gib * 2**30) if config.grad_budget_gib else default_budget_bytes(device)


def initial_factors(model, targets, train_examples, config: Config, pad_id: int, device,
                    progress: Optional[ProgressFn] = None, stop: Optional[threading.Event] = None,
                    corrections: Optional[dict[str, Correction]] = None) -> tuple[dict, Metrics]:
    """name -> (A, B, A0, B0) and the init metrics; raises StoppedInEstimate once `stop` is set. corrections: the
    4-bit error's (initial_corrections), in place while the gradient is estimated."""
    if config.init == "lora":
        generator = torch.Generator().manual_seed(config.seed)
        return {n: (*lora_factors(features(m), config.rank, generator, device), None, None)
                for n, m in targets.items()}, Metrics()
    batches = estimation_batches(train_examples, config, pad_id, device)
    budget = budget_bytes(config, device)
    with tqdm(desc="LoRA-GA gradient estimate", unit="batch", disable=not (config.progress and is_writer()),
              dynamic_ncols=True) as bar:
        def report(phase: Phase, done: int, total: int, metrics: Metrics) -> None:
            bar.total = total  # groups x batches, known once the groups are planned
            bar.update(done - bar.n)
            if progress:
                progress(phase, done, total, metrics)
            if stop is not None and stop.is_set():
                raise StoppedInEstimate
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * config.rank, budget, config.svd, report,
                                            compile=config.compile and device.type == "cuda",
                                            corrections=corrections)
    log.info("gradient estimated over %d batches in %d group(s), peak gradient state %.3f GiB of %.3f GiB budget",
             stats.batches, len(stats.groups), stats.peak_state_bytes / 2**30, budget / 2**30)
    factors = {}
    generator = torch.Generator().manual_seed(config.seed)
    for name, svd in svds.items():
        A0, B0 = lora_ga_factors(svd, config.rank, config.direction, config.scale, config.gamma, config.eta)
        dead_pairs_as_lora(name, A0, B0, generator)
        factors[name] = (A0, B0, A0, B0)
    return factors, Metrics(estimation_groups=len(stats.groups), estimation_batches=stats.batches,
                            estimation_peak_state_gib=stats.peak_state_bytes / 2**30,
                            estimation_budget_gib=budget / 2**30)
