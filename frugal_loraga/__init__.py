"""frugal-loraga: LoRA-GA fine-tuning on a 4-bit base with the gradient streamed layer group by layer group."""
from .api import FinetuneResult, OutOfMemory, finetune
from .config import Config, ConfigError
from .data import DataError

__all__ = ["Config", "ConfigError", "DataError", "FinetuneResult", "OutOfMemory", "finetune"]
