"""Time left in a job of runs (the app's Train: a LoRA-GA run, then perhaps its plain-LoRA baseline), from the
progress calls finetune makes.

Work is counted in examples through the network. Per example, the LoRA-GA estimate runs about one forward and one
forward + backward (estimate/walk.py), as a training micro-batch with gradient checkpointing does; an eval example
costs a forward, about a third of that; the 4-bit error's correction runs about two forwards over the estimation
samples (nf4_error.py), besides reading each weight and its SVD, which together price it at about one example each.
So one rate, seconds per example, measured in whichever stage has advanced last, prices the stages still to come:
  correction  estimation_samples examples (load_in_4bit with nf4_error_rank > 0, either init)
  estimate    estimation_samples examples (LoRA-GA)
  training    steps x batch_size x grad_accum examples, plus eval_samples / 3 per evaluation
The running stage goes at its own pace once it has one (from its first unit on: a compile before it is not counted).
Loading the data and the model is not priced. The time shown is the predicted end minus now, so it counts down while a
step runs instead of climbing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from .config import Config
from .progress import Phase

EVAL_COST = 1 / 3  # an eval example's forward, against a training example's forward + recompute + backward


def stage_work(config: Config) -> dict[str, float]:
    """Examples of network work per stage of one run (config resolved: estimation_samples and eval_samples set)."""
    evals = (config.steps // config.eval_every if config.eval_every else 0) + 1  # at step 0, every eval_every
    work = {}
    if config.load_in_4bit and config.nf4_error_rank and not config.resume:
        work["correction"] = float(config.estimation_samples)
    if config.init == "lora_ga" and not config.resume:
        work["estimate"] = float(config.estimation_samples)
    work["training"] = config.steps * config.batch_size * config.grad_accum + evals * config.eval_samples * EVAL_COST
    return work


@dataclass
class JobClock:
    """Feed it each run's progress (update); seconds_left() is the whole job's remaining time, None until a rate is
    known."""
    work: list[dict[str, float]]  # per run, per stage in order: examples of work
    rate: Optional[float] = None  # seconds per example, last measured
    run: int = 0
    phase: str = ""
    started: float = 0.0  # when the current phase began, at unit `started_at`
    started_at: int = 0
    end: Optional[float] = None  # predicted end of the job (time.time() clock)
    _estimated: set[int] = field(default_factory=set)  # runs whose estimate is behind them

    @classmethod
    def for_runs(cls, configs: list[Config], device_type: str) -> "JobClock":
        return cls([stage_work(config.resolve(device_type)) for config in configs])

    def update(self, run: int, phase: str, done: int, total: int, now: Optional[float] = None) -> None:
        """Run `run` (index into the job) reports `phase` at unit `done` of `total`."""
        now = time.time() if now is None else now
        stage = self._stage(run, phase)
        if (run, phase) != (self.run, self.phase) or done == self.started_at:  # a repeat there: work before its
            self.run, self.phase, self.started, self.started_at = run, phase, now, done  # units (step 0's eval)
        units = stage in self.work[run] and total and done - self.started_at
        if units and phase != Phase.COMPILING:
            per_unit = (now - self.started) / units
            self.rate = per_unit * total / self.work[run][stage]
            here = per_unit * (total - done)
        elif self.rate is not None:
            here = self.rate * self.work[run].get(stage, 0.0) * (1 - done / total if total else 1)
        else:
            self.end = None
            return
        self.end = now + here + self.rate * self._after(run, stage)
        if stage == "estimate" and total and done >= total:
            self._estimated.add(run)

    def seconds_left(self, now: Optional[float] = None) -> Optional[float]:
        if self.end is None:
            return None
        return max(self.end - (time.time() if now is None else now), 0.0)

    def _stage(self, run: int, phase: str) -> str:
        """The correction's phase is its stage; then 'estimate' until the run's estimate is done (its compile
        included), then 'training'; loading phases belong to no stage."""
        if phase in (Phase.LOADING_DATA, Phase.LOADING_MODEL):
            return "loading"
        if phase == Phase.CORRECTING:
            return "correction"
        if "estimate" in self.work[run] and run not in self._estimated and phase != Phase.TRAINING:
            return "estimate"
        return "training"

    def _after(self, run: int, stage: str) -> float:
        """Examples of work in the stages after `stage` of run `run`, and in the later runs."""
        stages = list(self.work[run])
        later = stages[stages.index(stage) + 1:] if stage in stages else stages
        return sum(self.work[run][s] for s in later) + sum(sum(w.values()) for w in self.work[run + 1:])


def format_seconds(seconds: float) -> str:
    """90 -> '1 min 30 s', 4000 -> '1 h 6 min'."""
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
