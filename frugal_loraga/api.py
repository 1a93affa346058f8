"""finetune(config): the one function behind the Python API, the CLI and the app.

check the out folder, model folder and data -> check the estimated peak against the free GPU memory -> load model ->
initial factors (LoRA-GA: streamed gradient + top-2r SVD; or plain LoRA), the estimate's memory handed back -> inject
-> checkpoint -> train -> export PEFT adapter + metrics JSON.
"""
from __future__ import annotations

import json
import logging
import random
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from .blocks import start_compile_workers
from .config import Config
from .checkpoint import (atomic_write, check_outputs, clear_previous_run, load_checkpoint, run_inputs, save_checkpoint,
                         write_record)
from .data import Example, causal_inputs, collate, load_examples, split_eval
from .errors import OutOfMemory, RunError
from .export import export_adapter
from .gradients import estimate_gradient_svd
from .init import lora_factors, lora_ga_factors
from .lora import find_targets, inject
from .memory import check_fits, default_budget_bytes, free_bytes
from .progress import Phase, ProgressFn
from .models import load_base, load_tokenizer, release, resolve_device, resolve_dtype, resolve_model_path
from .train import adapter_state, train

log = logging.getLogger("frugal_loraga")


@dataclass
class FinetuneResult:
    adapter_dir: Optional[Path]  # None when stopped during the LoRA-GA estimate: nothing was saved
    metrics: dict
    stopped: bool


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def estimation_batches(train_examples, config: Config, pad_id: int, device) -> list[dict]:
    """The LoRA-GA estimation batches: estimation_samples examples drawn by the seed, estimation_batch_size each, each
    batch right-padded to its longest example's padded_width (a multiple of 8), with no attention mask (causal_inputs).
    When the widths differ, the estimate compiles its blocks for any width and leaves cuDNN's attention out, as
    training does (blocks.attention_for). On examples of varying lengths this runs fewer tokens than padding every
    batch to the longest example, and the graphs for any width serve every data set, where one width's serve only
    data whose longest example pads to that width (measured in bench/RESULTS.md)."""
    order = list(range(len(train_examples)))
    random.Random(config.seed).shuffle(order)
    picked = [train_examples[i] for i in order[:config.estimation_samples]]
    size = config.estimation_batch_size
    return [causal_inputs(collate(picked[i:i + size], pad_id, device)) for i in range(0, len(picked), size)]


class StoppedInEstimate(Exception):
    """The stop switch was set during the LoRA-GA estimate (checked after each batch)."""


def initial_factors(model, targets, train_examples, config: Config, pad_id: int, device, progress,
                    stop: Optional[threading.Event] = None) -> tuple[dict, dict]:
    """name -> (A, B, A0, B0) and the init metrics; raises StoppedInEstimate once `stop` is set."""
    if config.init == "lora":
        generator = torch.Generator().manual_seed(config.seed)
        return {n: (*lora_factors(m.out_features, m.in_features, config.rank, generator, device), None, None)
                for n, m in targets.items()}, {}
    batches = estimation_batches(train_examples, config, pad_id, device)
    budget = int(config.grad_budget_gib * 2**30) if config.grad_budget_gib else default_budget_bytes(device)
    with tqdm(desc="LoRA-GA gradient estimate", unit="batch", disable=not config.progress, dynamic_ncols=True) as bar:
        def report(phase: str, done: int, total: int, metrics: dict) -> None:
            bar.total = total  # groups x batches, known once the groups are planned
            bar.update(done - bar.n)
            if progress:
                progress(phase, done, total, metrics)
            if stop is not None and stop.is_set():
                raise StoppedInEstimate
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * config.rank, budget, config.svd, report,
                                            compile=config.compile and device.type == "cuda")
    log.info("gradient estimated over %d batches in %d group(s), peak gradient state %.3f GiB of %.3f GiB budget",
             stats.batches, len(stats.groups), stats.peak_state_bytes / 2**30, budget / 2**30)
    factors = {}
    for name, svd in svds.items():
        A0, B0 = lora_ga_factors(svd, config.rank, config.direction, config.scale, config.gamma, config.eta)
        factors[name] = (A0, B0, A0, B0)
    return factors, {"estimation_groups": len(stats.groups), "estimation_batches": stats.batches,
                     "estimation_peak_state_gib": stats.peak_state_bytes / 2**30,
                     "estimation_budget_gib": budget / 2**30}


def factors_from_checkpoint(adapter: dict, device: torch.device) -> dict:
    """name -> (A, B, A0 | None, B0 | None) on device, from a checkpoint's adapter tensors (empty A0: plain LoRA)."""
    return {name: tuple(t.to(device) if t.numel() else None for t in (s["A"], s["B"], s["A0"], s["B0"]))
            for name, s in adapter.items()}


def finetune(config: Config, progress: Optional[ProgressFn] = None,
             stop: Optional[threading.Event] = None) -> FinetuneResult:
    """Run LoRA-GA (or LoRA) fine-tuning as configured; returns the adapter folder and the metrics.

    Bad settings, data and model folders, and settings whose estimated peak is above the free GPU memory
    (memory.check_fits), are refused (ConfigError, DataError) before the model loads. progress(phase,
    done, total, metrics) is called as work advances; setting `stop` ends training after the current step with a
    checkpoint written (resume with config.resume = True), or the LoRA-GA estimate after the current batch, with
    nothing written (adapter_dir None). When it returns or raises, nothing of its model is left
    in memory, with Python's cyclic garbage collector on or off."""
    def enter(name: Phase) -> Phase:
        if progress:
            progress(name, 0, 0, {})
        return name

    phase = enter(Phase.LOADING_DATA)
    model = inputs = None
    try:
        check_outputs(config)
        model_path = resolve_model_path(config.model, config.trust_remote_code)
        tokenizer = load_tokenizer(model_path, config.trust_remote_code)
        train_examples, eval_examples = load_data(config, tokenizer)
        state = load_checkpoint(config, inputs := run_inputs(config, model_path))
        config = config.resolve(resolve_device(config).type, state["config"] if state else None)
        if config.overwrite:
            clear_previous_run(config.out)
        if resolve_device(config).type == "cuda":
            check_fits(AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code), config,
                       free_bytes(resolve_device(config)))
        write_record(config, inputs, "running")
        phase = enter(Phase.LOADING_MODEL)
        torch.manual_seed(config.seed)
        if config.compile and resolve_device(config).type == "cuda":
            start_compile_workers()  # up by the time the estimate compiles
        model, device = load_base(config, model_path)
        dtype = resolve_dtype(config, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        targets = find_targets(model, config.target_list(), config.rank, config.init)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pad_id = tokenizer.pad_token_id
        if state is not None:
            metrics = state["metrics"]
            factors = factors_from_checkpoint(state["adapter"], device)
            log.info("resuming %s at step %d", config.out, state["step"])
        else:
            phase = Phase.ESTIMATING
            start = time.perf_counter()
            factors, init_metrics = initial_factors(model, targets, train_examples, config, pad_id, device, progress,
                                                    stop)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the estimate's blocks back to the card: training lays out its own
            metrics = {"train_loss": [], "eval_loss": [], "train_tokens": 0, "train_seconds": 0.0,
                       "init_seconds": time.perf_counter() - start, "peak_memory_init_gib": peak_memory_gib(device),
                       **init_metrics}
        layers = inject(model, factors, config.eta)
        if state is None:
            save_checkpoint(config.out, {"config": config.to_dict(), "inputs": inputs, "step": 0, "metrics": metrics,
                                         "adapter": adapter_state(layers)})
        phase = Phase.TRAINING
        start = time.perf_counter()
        stopped = train(model, layers, train_examples, eval_examples, config, inputs, pad_id, device, dtype, metrics,
                        resume_state=state, progress=progress, stop=stop)
        metrics["train_seconds"] += time.perf_counter() - start
        metrics["tokens_per_second"] = metrics["train_tokens"] / max(metrics["train_seconds"], 1e-9)
        metrics["peak_memory_gib"] = peak_memory_gib(device)
        phase = enter(Phase.SAVING)
        adapter_dir = export_adapter(layers, config, model.name_or_path, Path(config.out) / "adapter")
        write_metrics(metrics, config)
        write_record(config, inputs, "stopped" if stopped else "finished")
        return FinetuneResult(adapter_dir, metrics, stopped)
    except StoppedInEstimate:
        write_record(config, inputs, "stopped", "stopped during the LoRA-GA estimate: nothing to resume")
        return FinetuneResult(None, {}, stopped=True)
    except torch.cuda.OutOfMemoryError as e:
        error = OutOfMemory(f"CUDA ran out of memory while {phase}. Lower batch_size or max_length, keep "
                            "gradient_checkpointing and load_in_4bit on, or for the init lower estimation_batch_size "
                            "and grad_budget_gib.")
        fail(config, inputs, error)
        raise error from e
    except Exception as e:
        fail(config, inputs, e)
        raise
    finally:
        if model is not None:
            release(model)


def fail(config: Config, inputs: Optional[dict], error: Exception) -> None:
    """Mark the run failed in its record, once it has one (bad input found before that leaves none)."""
    if inputs is not None:
        try:
            write_record(config, inputs, "failed", str(error) or type(error).__name__)
        except RunError:  # the disk that failed the run may refuse the record too: the error raised says it all
            pass


def load_data(config: Config, tokenizer) -> tuple[list[Example], list[Example]]:
    """The training and eval examples: eval_data's, or eval_fraction split off the training data."""
    examples, report = load_examples(config.data, config.data_format, tokenizer, config.max_length,
                                     config.column_map(), config.chat_template)
    log.info("training data: %s", report.summary())
    if not config.eval_data:
        return split_eval(examples, config.eval_fraction, config.seed)
    return examples, load_examples(config.eval_data, config.data_format, tokenizer, config.max_length,
                                   config.column_map(), config.chat_template)[0]


def write_metrics(metrics: dict, config: Config) -> None:
    """out/metrics.json, then the metrics_json copy (checked writable before the run)."""
    text = json.dumps(metrics, indent=1)
    paths = [Path(config.out) / "metrics.json"] + ([Path(config.metrics_json)] if config.metrics_json else [])
    for path in dict.fromkeys(paths):
        atomic_write(path, lambda tmp: tmp.write_text(text))
