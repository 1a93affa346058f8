"""Training the adapter: AdamW (or bitsandbytes paged 8-bit), warmup + cosine/linear/constant schedule, gradient
accumulation, bf16 autocast on CUDA, periodic eval, atomic checkpoints and exact resume.

Micro-batch i of the run is a pure function of (seed, i) (data.micro_batch), so a resumed run sees the same
batches, in the same order, as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .config import Config, ConfigError
from .data import Example, causal_inputs, collate, micro_batch, padded_width
from .blocks import attention_for, block_layout, compile_blocks
from .gradients import ProgressFn
from .lora import LoraLinear

# Fields that may change between a run and its resume without changing the result.
RESUMABLE_CHANGES = {"resume", "progress", "metrics_json", "save_every", "device", "compile"}


def lr_factor(step: int, config: Config) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule to 0."""
    warmup = math.ceil(config.warmup_ratio * config.steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(config.steps - warmup, 1)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[config.schedule]


def make_optimizer(params: list[torch.nn.Parameter], config: Config, device: torch.device) -> torch.optim.Optimizer:
    if config.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("optimizer=paged_adamw_8bit needs CUDA; use optimizer=adamw on CPU")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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
    for i in range(0, len(examples), config.batch_size):
        batch = collate(examples[i:i + config.batch_size], pad_id, device)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        with autocast(device, dtype):
            total_loss += model(**causal_inputs(batch)).loss.item() * tokens
        total_tokens += tokens
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def checkpoint_path(out: str) -> Path:
    return Path(out) / "checkpoint" / "state.pt"


def save_checkpoint(out: str, state: dict) -> None:
    """Write to a temporary file, flush to disk, then rename over the old checkpoint: never a half-written one."""
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(config: Config) -> Optional[dict]:
    """The run's checkpoint if resuming and one exists; refuses one written with different settings."""
    path = checkpoint_path(config.out)
    if not config.resume or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    now = config.to_dict()
    changed = sorted(k for k, v in state["config"].items() if k not in RESUMABLE_CHANGES and now.get(k) != v)
    if changed:
        raise ConfigError(f"cannot resume {path}: it was written with other settings for {', '.join(changed)}; "
                          "use the same settings or a new out folder")
    return state


def adapter_state(layers: dict[str, LoraLinear]) -> dict:
    return {name: {k: t.detach().cpu() for k, t in (("A", l.A), ("B", l.B), ("A0", l.A0), ("B0", l.B0))}
            for name, l in layers.items()}


def train(model, layers: dict[str, LoraLinear], train_examples: list[Example], eval_examples: list[Example],
          config: Config, pad_id: int, device: torch.device, dtype: torch.dtype, metrics: dict,
          resume_state: Optional[dict] = None, progress: Optional[ProgressFn] = None,
          stop: Optional[threading.Event] = None, params: Optional[list[torch.nn.Parameter]] = None) -> bool:
    """Train to config.steps, filling metrics (train_loss, eval_loss as [step, loss]). True if stopped early.

    params: what the optimizer updates; default the adapters' A and B (the benchmarks pass all weights for full
    fine-tuning, with no layers)."""
    params = params if params is not None else [p for layer in layers.values() for p in (layer.A, layer.B)]
    optimizer = make_optimizer(params, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start = 0
    if resume_state is not None and resume_state.get("optimizer"):
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start = resume_state["step"]

    def checkpoint(step):
        save_checkpoint(config.out, {"config": config.to_dict(), "step": step, "adapter": adapter_state(layers),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "metrics": metrics})

    compiling = config.compile and device.type == "cuda"
    widths = {padded_width(len(e.input_ids)) for e in train_examples + eval_examples}
    if compiling:
        compile_blocks(block_layout(model, list(layers))[0], any_width=len(widths) > 1)
    if progress:
        progress("compiling the decoder layers" if compiling else "training", start, config.steps, metrics)
    model.train()
    with attention_for(widths):
        if eval_examples and start == 0:
            metrics["eval_loss"].append([0, evaluate(model, eval_examples, config, pad_id, device, dtype)])
        bar = tqdm(total=config.steps, initial=start, desc="training", disable=not config.progress, dynamic_ncols=True)
        for step in range(start, config.steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                batch = collate(micro_batch(train_examples, config.batch_size, config.seed,
                                            step * config.grad_accum + micro), pad_id, device)
                with autocast(device, dtype):
                    loss = model(**causal_inputs(batch)).loss / config.grad_accum
                loss.backward()
                step_loss += loss.item()
                metrics["train_tokens"] += int(batch["attention_mask"].sum())
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            done = step + 1
            metrics["train_loss"].append([done, step_loss])
            if eval_examples and ((config.eval_every and done % config.eval_every == 0) or done == config.steps):
                metrics["eval_loss"].append([done, evaluate(model, eval_examples, config, pad_id, device, dtype)])
            bar.set_postfix(loss=f"{step_loss:.4f}")
            bar.update()
            if progress:
                progress("training", done, config.steps, metrics)
            stopping = stop is not None and stop.is_set()
            if (config.save_every and done % config.save_every == 0) or done == config.steps or stopping:
                checkpoint(done)
            if stopping and done < config.steps:
                bar.close()
                return True
        bar.close()
        return False
