"""What finetune reports as its work advances: progress(phase, done, total, metrics), phase one of Phase."""
from __future__ import annotations

from enum import Enum
from typing import Callable


class Phase(str, Enum):
    """A run's phases, in order. Each is its own text, so that a callback may compare it with a string."""
    LOADING_DATA = "loading data"
    LOADING_MODEL = "loading the model"
    COMPILING = "compiling the decoder layers"  # before the estimate's first batch, and training's first step
    ESTIMATING = "estimating gradients"  # done / total: batches x groups
    TRAINING = "training"  # done / total: steps
    SAVING = "saving the adapter"

    def __str__(self) -> str:
        return self.value


ProgressFn = Callable[[Phase, int, int, dict], None]  # (phase, done, total, live metrics)
