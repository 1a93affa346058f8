"""Training the adapter: AdamW (or bitsandbytes paged 8-bit), warmup + cosine/linear/constant schedule, gradient
accumulation, bf16 autocast on CUDA, periodic eval, atomic checkpoints and exact resume.

Micro-batch i of the run is a pure function of (seed, i) (data.micro_batch), so a resumed run sees the same
batches, in the same order, as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .config import Config
from .errors import RunError
from .data import Example, causal_inputs, collate, micro_batch, padded_width
from .distributed import is_writer, share, sum_grads_over_ranks_, sum_values_over_ranks
from .blocks import attention_for, block_layout, compiled, keeping_weights, no_checkpointing
from .progress import Metrics, Phase, ProgressFn
from .lora import LoraLinear
from .loss import causal_lm_loss
from .memory import free_bytes, keeping_plan
from .models import resolve_device, resolve_dtype

def lr_factor(step: int, config: Config) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule to 0."""
    warmup = math.ceil(config.warmup_ratio * config.steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(config.steps - warmup, 1)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[config.schedule]


def make_optimizer(params: list[torch.nn.Parameter], config: Config) -> torch.optim.Optimizer:
    """config.optimizer over params. torch's AdamW is fused on CUDA: one kernel launch a step for all the adapters'
    hundreds of factors, where the multi-tensor version took about 15 ms of host time a step at 8B (under the profiler)
    with the GPU idle; 1.015x the tokens/s at Llama-3-8B (bench/RESULTS.md)."""
    if config.optimizer == "paged_adamw_8bit":  # on CUDA only (Config.resolve)
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, examples: list[Example], config: Config, pad_id: int, device, dtype) -> float:
    """Token-weighted mean loss over the first eval_samples eval examples."""
    examples = examples[:config.eval_samples]
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for i in share(list(range(0, len(examples), config.batch_size))):  # each rank its share of the batches
        batch = collate(examples[i:i + config.batch_size], pad_id, device)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        with autocast(device, dtype):
            total_loss += causal_lm_loss(model, causal_inputs(batch)).item() * tokens
        total_tokens += tokens
    model.train(was_training)
    total_loss, total_tokens = sum_values_over_ranks([total_loss, total_tokens], device)
    return total_loss / max(total_tokens, 1)


def train(model, layers: dict[str, LoraLinear], train_examples: list[Example], eval_examples: list[Example],
          config: Config, inputs: dict, pad_id: int, metrics: Metrics, resume_state: Optional[dict] = None,
          progress: Optional[ProgressFn] = None, stop: Optional[threading.Event] = None) -> bool:
    """Train to config.steps on config's device and dtype, filling metrics (train_loss, eval_loss as [step, loss]).
    True if stopped early. Checkpoints record `inputs` (checkpoint.run_inputs), what a resume must match.
    The optimizer updates the adapters' A and B; with no adapters (full fine-tuning, as bench/convergence.py runs
    it), every parameter that requires grad."""
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    params = ([p for layer in layers.values() for p in (layer.A, layer.B)] or
              [p for p in model.parameters() if p.requires_grad])
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start = 0
    if resume_state is not None and resume_state.get("optimizer"):
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start = resume_state["step"]

    def checkpoint(step):
        save_checkpoint(config, inputs, step, metrics, layers, optimizer, scheduler)

    compiling = config.compile and device.type == "cuda"
    widths = {padded_width(len(e.input_ids)) for e in train_examples + eval_examples}
    blocks = block_layout(model, list(layers))[0]
    free = free_bytes(device) if device.type == "cuda" else None
    kept, kept_weights = keeping_plan(model.config, config, free) if config.gradient_checkpointing else (0, 0)
    recomputed = [block for block in blocks[kept:] if block.__dict__.get("gradient_checkpointing")]
    metrics["recomputed_layers"] = len(recomputed)
    metrics["layers_keeping_weights"] = kept_weights if compiling else 0  # eager layers never dequantize by torch ops
    starting = Phase.COMPILING if compiling else Phase.TRAINING
    if progress:
        progress(starting, start, config.steps, metrics)
    model.train()
    saved = start  # the step of the last checkpoint: the run saved step 0 before training
    clock = time.perf_counter()  # metrics["train_seconds"] counts up to each step's end, so checkpoints carry it
    bar = tqdm(total=config.steps, initial=start, desc="training", disable=not (config.progress and is_writer()),
               dynamic_ncols=True)
    try:
        with compiled(blocks, compiling, any_width=len(widths) > 1), attention_for(widths), \
                no_checkpointing(blocks[:kept]), keeping_weights(blocks[:kept_weights] + recomputed):
            if eval_examples and start == 0:
                metrics["eval_loss"].append([0, evaluate(model, eval_examples, config, pad_id, device, dtype)])
                if progress:  # again: the steps are timed from here (the app's time left), this evaluation is none
                    progress(starting, start, config.steps, metrics)
            for step in range(start, config.steps):
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_tokens = 0.0, 0
                for micro in share(list(range(config.grad_accum))):  # each rank its share of the micro-batches
                    batch = collate(micro_batch(train_examples, config.batch_size, config.seed,
                                                step * config.grad_accum + micro), pad_id, device)
                    with autocast(device, dtype):
                        loss = causal_lm_loss(model, causal_inputs(batch)) / config.grad_accum
                    loss.backward()
                    step_loss += loss.item()
                    step_tokens += int(batch["attention_mask"].sum())
                sum_grads_over_ranks_(params)
                step_loss, step_tokens = sum_values_over_ranks([step_loss, step_tokens], device)
                metrics["train_tokens"] += int(step_tokens)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)  # inf: no clip
                check_finite(step + 1, step_loss, grad_norm, config, saved)
                optimizer.step()
                scheduler.step()
                done = step + 1
                metrics["train_loss"].append([done, step_loss])
                if eval_examples and ((config.eval_every and done % config.eval_every == 0) or done == config.steps):
                    metrics["eval_loss"].append([done, evaluate(model, eval_examples, config, pad_id, device, dtype)])
                now = time.perf_counter()
                metrics["train_seconds"] += now - clock
                clock = now
                bar.set_postfix(loss=f"{step_loss:.4f}")
                bar.update()
                if progress:
                    progress(Phase.TRAINING, done, config.steps, metrics)
                stopping = stop is not None and stop.is_set()
                if (config.save_every and done % config.save_every == 0) or done == config.steps or stopping:
                    checkpoint(done)
                    saved = done
                if stopping and done < config.steps:
                    return True
        return False
    finally:
        bar.close()


def check_finite(step: int, loss: float, grad_norm: torch.Tensor, config: Config, saved: int) -> None:
    """Stop before an optimizer step that would make the adapter NaN: a loss or gradient norm that is not finite."""
    bad = f"loss {loss}" if not math.isfinite(loss) else \
        f"gradient norm {grad_norm.item()}" if not torch.isfinite(grad_norm) else None
    if bad:
        raise RunError(f"training diverged at step {step} ({bad}): lr={config.lr:g} is too high for this run; lower lr "
                       "and start again with overwrite (--overwrite) or another out folder. The checkpoint of step "
                       f"{saved} is kept; no adapter was exported")
