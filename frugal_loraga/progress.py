"""What finetune reports: progress(phase, done, total, metrics) as its work advances, phase one of Phase, and the
run's Metrics, also returned in FinetuneResult.metrics and written to metrics.json and the checkpoint."""
from __future__ import annotations

from enum import Enum
from typing import Callable, TypedDict


class Phase(str, Enum):
    """A run's phases, in order. Each is its own text, so that a callback may compare it with a string."""
    LOADING_DATA = "loading data"
    LOADING_MODEL = "loading the model"
    CORRECTING = "correcting the 4-bit error"  # done / total: target layers, each twice: its group's forwards, then
    # its SVD (load_in_4bit, nf4_error_rank)
    COMPILING = "compiling the decoder layers"  # before the estimate's first batch, and training's first step
    ESTIMATING = "estimating gradients"  # done / total: batches x groups
    TRAINING = "training"  # done / total: steps
    SAVING = "saving the adapter"

    def __str__(self) -> str:
        return self.value


class Metrics(TypedDict, total=False):
    """What a run measured (a plain dict, so that it saves as JSON). Empty for a run stopped during the estimate;
    the estimation_* keys only for LoRA-GA; tokens_per_second and peak_memory_gib once training has ended."""
    train_loss: list[list]  # [step, the step's mean loss over its micro-batches]
    eval_loss: list[list]  # [step, token-weighted mean loss over the eval examples]; step 0 before training
    train_tokens: int  # the tokens trained on (attention mask), over all steps and resumes
    train_seconds: float  # training's wall time, over all resumes
    tokens_per_second: float  # train_tokens / train_seconds
    init_seconds: float  # the initial factors' wall time (LoRA-GA: the gradient estimate and its SVDs)
    peak_memory_init_gib: float  # the peak after the initial factors (GPU: max allocated; CPU: max resident set)
    peak_memory_gib: float  # the whole run's peak, measured as peak_memory_init_gib
    recomputed_layers: int  # the decoder layers training recomputes in backward (gradient checkpointing)
    layers_keeping_weights: int  # of the layers keeping activations, those keeping their 4-bit weights' copies too
    correction_seconds: float  # the 4-bit error's correction (nf4_error.py), within init_seconds
    corrected_layers: int  # the layers whose 4-bit error is corrected
    estimation_groups: int  # the groups of layers the estimate walked
    estimation_batches: int  # the estimation batches
    estimation_peak_state_gib: float  # the most fp32 gradient state held at once
    estimation_budget_gib: float  # the budget it was held within (grad_budget_gib or the default)


ProgressFn = Callable[[Phase, int, int, Metrics], None]  # (phase, done, total, live metrics)
