"""finetune(config): the one function behind the Python API, the CLI and the app.

check the out folder, model folder and data -> check the estimated peak against the free GPU memory -> load model ->
on a 4-bit base, the correction of its quantization error -> initial factors (LoRA-GA: streamed gradient + top-2r
SVD; or plain LoRA), the estimate's memory handed back -> inject -> checkpoint -> train -> export PEFT adapters (for
the original base; and for the 4-bit base with its correction) + metrics JSON.
"""
from __future__ import annotations

import json
import logging
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig

from .blocks import enable_checkpointing, start_compile_workers
from .config import Config
from .checkpoint import (atomic_write, check_outputs, factors_from_checkpoint, load_checkpoint, read_record, run_inputs,
                         save_checkpoint, write_record)
from .data import WIDTH_MULTIPLE, Example, checked_records, load_examples, padded_width, split_eval
from .distributed import barrier, check_shares, join
from .errors import ConfigError, OutOfMemory, RunError
from .export import export_adapter, peft_load_fix
from .init import StoppedInEstimate, initial_corrections, initial_factors
from .lora import check_correction_rank, find_targets, inject, named_targets
from .memory import check_fits, free_bytes
from .progress import Metrics, Phase, ProgressFn
from .replaced import drop, put_back, set_aside, settle
from .models import (check_weight_shapes, load_base, load_tokenizer, model_skeleton, position_limit, release,
                     resolve_device, resolve_model_path)
from .train import train

log = logging.getLogger("frugal_loraga")


@dataclass
class FinetuneResult:
    adapter_dir: Optional[Path]  # None when stopped before training began: nothing was saved
    metrics: Metrics
    stopped: bool


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def finetune(config: Config, progress: Optional[ProgressFn] = None,
             stop: Optional[threading.Event] = None) -> FinetuneResult:
    """Run LoRA-GA (or LoRA) fine-tuning as configured; returns the adapter folder and the metrics.

    Bad settings, data and model folders, and settings whose estimated peak is above the free GPU memory
    (memory.check_fits), are refused (ConfigError, DataError) before the model loads. progress(phase,
    done, total, metrics) is called as work advances; setting `stop` ends training after the current step with a
    checkpoint written (resume with config.resume = True), or the init (the 4-bit error's correction, the LoRA-GA
    estimate) after the current group or batch, with nothing saved but the run's record (adapter_dir None). A run
    that fails after its record is written is marked failed there. When it returns or raises, nothing of its model is left
    in memory, with Python's cyclic garbage collector on or off. Under torchrun each process (one per GPU) runs it:
    the estimate and each step's micro-batches are shared, and rank 0 writes (distributed.py)."""
    def enter(name: Phase) -> Phase:
        if progress:
            progress(name, 0, 0, {})
        return name

    phase = enter(Phase.LOADING_DATA)
    model = inputs = None
    recorded = False  # whether this call has written the run's record
    replacing = False  # whether this call has set aside an overwritten run's files (replaced.py)
    try:
        join(resolve_device(config).type)  # under torchrun: one process per GPU, data parallel (distributed.py)
        check_shares(config.grad_accum)
        settle(config.out)  # what an overwrite killed midway left (replaced.py)
        barrier()
        check_outputs(config)
        check_data(config)  # before the model is looked for: a first use of the demo converts it (half a minute)
        model_path = resolve_model_path(config.model, config.trust_remote_code)
        tokenizer = load_tokenizer(model_path, config.trust_remote_code)
        train_examples, eval_examples = load_data(config, tokenizer)
        state = load_checkpoint(config, inputs := run_inputs(config, model_path))
        config = config.resolve(resolve_device(config).type, state["config"] if state else None)
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        skeleton = skeleton_of(model_config, config)
        check_positions(skeleton, model_config, train_examples + eval_examples, config)
        planned = planned_targets(skeleton, model_path, config, resuming=state is not None)
        if resolve_device(config).type == "cuda":
            check_fits(model_config, config, free_bytes(resolve_device(config)), skeleton, planned)
        barrier()  # every rank has checked the out folder and the settings before rank 0 writes in it
        if config.overwrite:  # only now; put back if this run ends before its first checkpoint
            replacing = set_aside(config.out)
        write_record(config, inputs, "running")
        recorded = True
        phase = enter(Phase.LOADING_MODEL)
        torch.manual_seed(config.seed)
        if config.compile and resolve_device(config).type == "cuda":
            start_compile_workers()  # up by the time the estimate compiles
        model, device = load_base(config, model_path)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        targets = (named_targets(model, planned) if planned is not None
                   else checked_targets(model, config, resuming=state is not None))
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        pad_id = tokenizer.pad_token_id
        if state is not None:
            metrics = state["metrics"]
            factors, corrections = factors_from_checkpoint(state["adapter"], device)
            log.info("resuming %s at step %d", config.out, state["step"])
        else:
            phase = Phase.ESTIMATING
            start = time.perf_counter()
            corrections, correction_metrics = initial_corrections(model, targets, train_examples, config, model_path,
                                                                  pad_id, device, progress, stop)
            factors, init_metrics = initial_factors(model, targets, train_examples, config, pad_id, device, progress,
                                                    stop, corrections)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the estimate's blocks back to the card: training lays out its own
                if hasattr(torch.accelerator, "empty_host_cache"):  # torch 2.13 has it, 2.11 not
                    torch.accelerator.empty_host_cache()  # the init's page-locked copies (hidden states, weights)
            metrics = Metrics(train_loss=[], eval_loss=[], train_tokens=0, train_seconds=0.0,
                              init_seconds=time.perf_counter() - start, peak_memory_init_gib=peak_memory_gib(device),
                              **correction_metrics, **init_metrics)
        layers = inject(model, factors, config.eta, corrections)
        if state is None:
            save_checkpoint(config, inputs, 0, metrics, layers)
            if replacing:  # the overwritten run's files: this run has replaced it
                drop(config.out)
                replacing = False
        phase = Phase.TRAINING
        stopped = train(model, layers, train_examples, eval_examples, config, inputs, pad_id, metrics,
                        resume_state=state, progress=progress, stop=stop)
        metrics["tokens_per_second"] = metrics["train_tokens"] / max(metrics["train_seconds"], 1e-9)
        metrics["peak_memory_gib"] = peak_memory_gib(device)
        phase = enter(Phase.SAVING)
        adapter_dir = export_adapter(layers, config, model.name_or_path, Path(config.out) / "adapter")
        if fix := peft_load_fix(adapter_dir, model.config.model_type):
            log.warning("PEFT misreads adapters of %s (it takes its dense layers for experts); before "
                        "PeftModel.from_pretrained, run:\n  %s", model.config.model_type, fix)
        if corrections:  # the same adapter for the 4-bit base: with the correction that stands in for the original
            export_adapter(layers, config, model.name_or_path, Path(config.out) / "adapter_nf4", with_correction=True)
        write_metrics(metrics, config)
        write_record(config, inputs, "stopped" if stopped else "finished")
        barrier()  # the adapter is written when finetune returns, on every rank
        return FinetuneResult(adapter_dir, metrics, stopped)
    except StoppedInEstimate:
        write_record(config, inputs, "stopped", "stopped before training began: nothing was saved")
        return FinetuneResult(None, {}, stopped=True)
    except torch.cuda.OutOfMemoryError as e:
        error = OutOfMemory(f"CUDA ran out of memory while {phase}. Lower batch_size or max_length, keep "
                            "gradient_checkpointing and load_in_4bit on, or for the init lower estimation_batch_size "
                            "and grad_budget_gib.")
        fail(config, inputs, error, recorded)
        raise error from e
    except Exception as e:
        fail(config, inputs, e, recorded)
        raise
    finally:
        if replacing:  # ended before its first checkpoint (an error, a stop, Ctrl-C): the overwritten run as it was
            put_back(config.out)
        if model is not None:
            release(model)


def skeleton_of(model_config, config: Config) -> Optional[nn.Module]:
    """The model built without its weights (models.model_skeleton), or None for one that cannot be built so (remote
    code that needs real tensors): its loaded model is checked instead."""
    try:
        return model_skeleton(model_config, config.trust_remote_code)
    except Exception as e:
        log.warning("could not build %s without its weights (%s: %s); its layers are checked once it has loaded",
                    config.model, type(e).__name__, e)
        return None


def check_positions(skeleton: Optional[nn.Module], model_config, examples: list[Example], config: Config) -> None:
    """ConfigError where the longest batch (its padded_width) takes more positions than a model with a learned
    position table embeds (models.position_limit; GPT-2, OPT): it would fail inside the model, after the load."""
    limit = position_limit(skeleton, model_config) if skeleton is not None else None
    width = padded_width(max(len(e.input_ids) for e in examples))
    if limit is not None and width > limit:
        raise ConfigError(f"{getattr(model_config, 'model_type', 'this model')} embeds at most {limit} positions (a "
                          f"learned position table) and the longest example takes {width} (max_length="
                          f"{config.max_length}, padded to a multiple of {WIDTH_MULTIPLE}); lower max_length to "
                          f"{limit // WIDTH_MULTIPLE * WIDTH_MULTIPLE} or less")


def planned_targets(skeleton: Optional[nn.Module], model_path: str, config: Config, resuming: bool
                    ) -> Optional[dict]:
    """The layers to adapt by name, found on the model's skeleton (skeleton_of), with the weights' shapes and the
    ranks checked: bad input refused before the weights load. None without a skeleton."""
    if skeleton is None:
        return None
    check_weight_shapes(model_path, skeleton)
    return checked_targets(skeleton, config, resuming)


def checked_targets(model, config: Config, resuming: bool) -> dict:
    """find_targets, and the 4-bit error's correction rank checked against them (a resume takes its correction from
    the checkpoint)."""
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    if config.load_in_4bit and config.nf4_error_rank and not resuming:
        check_correction_rank(targets, config.nf4_error_rank)
    return targets


def fail(config: Config, inputs: Optional[dict], error: Exception, recorded: bool) -> None:
    """Mark the run failed in its record: one this call wrote, or where the out folder exists without one (the app
    makes the folder first, for its copy of the data), so that the run is listed with its error. A folder that
    holds another run's record keeps it, and a refused CLI run leaves no folder."""
    out_without_record = Path(config.out).is_dir() and read_record(config.out) is None
    if inputs is not None and (recorded or out_without_record):
        try:
            write_record(config, inputs, "failed", str(error) or type(error).__name__)
        except RunError:  # the disk that failed the run may refuse the record too: the error raised says it all
            pass


def check_data(config: Config) -> None:
    """DataError for what is wrong in the data files that needs no tokenizer to see (data.checked_records)."""
    for path in (config.data, config.eval_data):
        if path:
            checked_records(path, config.data_format, config.column_map())


def load_data(config: Config, tokenizer) -> tuple[list[Example], list[Example]]:
    """The training and eval examples: eval_data's, or eval_fraction split off the training data."""
    examples, report = load_examples(config.data, config.data_format, tokenizer, config.max_length,
                                     config.column_map(), config.chat_template)
    log.info("training data: %s", report.summary())
    if not config.eval_data:
        return split_eval(examples, config.eval_fraction, config.seed)
    return examples, load_examples(config.eval_data, config.data_format, tokenizer, config.max_length,
                                   config.column_map(), config.chat_template)[0]


def write_metrics(metrics: Metrics, config: Config) -> None:
    """out/metrics.json, then the metrics_json copy (checked writable before the run)."""
    text = json.dumps(metrics, indent=1)
    paths = [Path(config.out) / "metrics.json"] + ([Path(config.metrics_json)] if config.metrics_json else [])
    for path in dict.fromkeys(paths):
        atomic_write(path, lambda tmp: tmp.write_text(text))
