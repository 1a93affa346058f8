"""frugal-loraga: LoRA-GA fine-tuning on a 4-bit base with the gradient streamed layer group by layer group.

Config, the errors, Phase and Metrics import without torch; finetune and FinetuneResult load the engine on first use
(PEP 562), so that `python -m frugal_loraga train --help` answers at once.
"""
from .config import Config
from .errors import ConfigError, DataError, OutOfMemory, RunError
from .progress import Metrics, Phase

__all__ = ["Config", "ConfigError", "DataError", "FinetuneResult", "Metrics", "OutOfMemory", "Phase", "RunError",
           "finetune"]


def __getattr__(name: str):
    if name in ("finetune", "FinetuneResult"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'frugal_loraga' has no attribute {name!r}")
