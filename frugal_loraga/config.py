"""Run configuration: one typed dataclass that the API, the CLI and the app all build.

Every field carries its default and a one-line help text (used for `--help` and the app's tooltips).
`Config(...)` validates on construction and raises ConfigError with what is wrong and what to do.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import numpy as np

from .errors import ConfigError

DataFormat = Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"]
InitMethod = Literal["lora_ga", "lora"]
Direction = Literal["ArB2r", "A2rBr"]
Scale = Literal["stable", "gd", "unit"]
SvdMethod = Literal["lowrank", "exact"]
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "paged_adamw_8bit"]
Dtype = Literal["auto", "bfloat16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
ChatTemplate = Literal["model", "plain"]
FORMAT_COLUMN_NAMES = ("instruction", "input", "output", "messages", "conversations", "prompt", "completion", "text")

ALL_LINEAR = "all-linear"
# Each init method's learning rate: LoRA-GA's best is near full fine-tuning's, about 10x below LoRA's (the paper's
# 2e-5 at Llama-2-7B; our sweep on the demo model picked 3e-5 for LoRA-GA on NF4 and 3e-4 for LoRA and QLoRA).
DEFAULT_LR = {"lora_ga": 3e-5, "lora": 3e-4}
# A field a run recorded before it existed ran with this value, not the field's default (experts were 16-bit then).
ABSENT_FROM_OLDER_RUNS = {"quantize_experts": False}
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest learning rate, alpha or gamma an fp32 tensor holds


def field_type(hint) -> tuple[type, Optional[list], bool]:
    """A Config field's type hint -> (its value type, its choices when a Literal, whether it may be None)."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    if optional:
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return str, list(get_args(hint)), optional
    return hint, None, optional


KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}  # a value type, in words


def as_kind(value, kind: type, optional: bool):
    """value as a field of this value type (field_type) holds it, or TypeError: a path as text, any integer (numpy's
    too) as an int, any real number as a float; a bool (numpy's too) only where a bool is asked; None only in an
    optional field."""
    if value is None and optional:
        return value
    if kind is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if kind in (int, float) and not isinstance(value, bool) and \
            isinstance(value, numbers.Integral if kind is int else numbers.Real):
        try:
            return kind(value)
        except OverflowError:  # an integer past float's range
            raise TypeError(f"needs {KINDS[kind]} within a float's range") from None
    raise TypeError(f"needs {KINDS[kind]}")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Config:
    # --- model
    model: str = _f("demo", "'demo' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder, or a hub id when online")
    load_in_4bit: bool = _f(True, "load the base weights in 4-bit NF4 (bitsandbytes, double quant)")
    quantize_experts: bool = _f(True, "with load_in_4bit: mixture-of-experts expert stacks in NF4 too (transformers "
                                      "keeps them in 16 bits, so its 4-bit model differs from ours by their 4-bit "
                                      "error); off: in 16 bits")
    embeddings_on_cpu: bool = _f(True, "keep the input embedding table in CPU memory, looking tokens up there (saves "
                                       "vocab x hidden x 2 bytes of GPU memory: 1 GiB for Llama-3-8B; not for models "
                                       "whose head shares the table)")
    dtype: Dtype = _f("auto", "compute dtype: auto = bfloat16 on CUDA, float32 on CPU")
    device: Device = _f("auto", "auto = CUDA when available, else CPU")
    trust_remote_code: bool = _f(False, "run Python code shipped with the model folder (off: only safetensors weights load)")
    # --- data
    data: str = _f("", "training data: .jsonl, .json, .csv or .txt")
    data_format: DataFormat = _f("auto", "alpaca, chat (messages), sharegpt (conversations), prompt_completion, text, "
                                         "or auto-detect")
    columns: Optional[str] = _f(None, "the file's column for each column the format reads, when they are named "
                                      "otherwise: format_column=file_column,... (instruction=question,output=answer)")
    chat_template: ChatTemplate = _f("model", "how alpaca and chat data are turned into text: model = the "
                                              "tokenizer's chat template (plain when it has none); plain = "
                                              "'### User:' / '### Assistant:' turns")
    eval_data: Optional[str] = _f(None, "held-out data file; default: split eval_fraction off the training data")
    eval_fraction: float = _f(0.1, "fraction of the data held out for eval when no eval_data is given")
    max_length: int = _f(512, "tokens per example; longer examples are truncated (and counted)")
    # --- adapter
    init: InitMethod = _f("lora_ga", "lora_ga (gradient-aligned) or lora (Kaiming A, zero B)")
    rank: int = _f(8, "LoRA rank r (LoRA-GA exports rank 2r: trainable plus frozen initial adapter)")
    alpha: float = _f(16.0, "LoRA alpha")
    use_rslora: bool = _f(True, "eta = alpha / sqrt(r) (rsLoRA, as in the paper's runs); off: alpha / r")
    target_modules: str = _f(ALL_LINEAR, "comma-separated module name suffixes (q_proj,v_proj) or all-linear")
    # --- LoRA-GA initialisation
    direction: Direction = _f("ArB2r", "A from singular vectors 1..r and B from r+1..2r (ArB2r) or the reverse")
    scale: Scale = _f("stable", "stable: A, B times m^(1/4)/sqrt(gamma); gd: divided by eta; unit: as is")
    gamma: float = _f(16.0, "gamma of the stable scale")
    estimation_samples: Optional[int] = _f(None, "training examples used to estimate the full gradient; default: 128 on "
                                                 "CUDA, 16 on the CPU (where each batch takes seconds)")
    estimation_batch_size: int = _f(2, "examples per forward/backward during estimation")
    grad_budget_gib: Optional[float] = _f(None, "GiB held at once by the estimate (fp32 gradients of a group of decoder "
                                                "layers and their activations); default: half of free memory")
    svd: SvdMethod = _f("lowrank", "top-2r SVD of each gradient: lowrank (randomized, 4 power iterations) or exact")
    nf4_error_rank: int = _f(16, "with load_in_4bit: rank of a frozen correction of the 4-bit weights' error as the "
                                 "estimation samples see it, read from the model's safetensors files (CLoQ-style; "
                                 "the model starts closer to the original one); 0: off")
    # --- training
    steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(2, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: Optional[float] = _f(None, "peak learning rate; default: 3e-5 for lora_ga (near full fine-tuning's, as the "
                                   "paper and our sweep found), 3e-4 for lora")
    schedule: Schedule = _f("cosine", "learning-rate schedule after warmup")
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    optimizer: Optimizer = _f("adamw", "adamw (torch) or paged_adamw_8bit (bitsandbytes, CUDA only)")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory, in the decoder layers "
                                            "that cannot keep them (keep_activations_gib)")
    keep_activations_gib: Optional[float] = _f(None, "with gradient_checkpointing: memory for decoder layers that keep "
                                                     "their activations for backward rather than recompute them, as "
                                                     "many as fit, then, with what is left, for some of them keeping "
                                                     "their 4-bit weights' 16-bit copies rather than dequantize them "
                                                     "again; at most what the GPU has free once training has what it "
                                                     "needs; default: all of that (none on the CPU); 0: recompute in "
                                                     "every layer")
    compile: bool = _f(True, "torch.compile each decoder layer for the LoRA-GA estimate and training on CUDA: faster "
                             "4-bit steps after a one-off compile, cached in ~/.cache/frugal_loraga/compiled for later "
                             "runs (ignored on CPU)")
    eval_every: int = _f(20, "steps between evaluations (0: only at the end)")
    eval_samples: Optional[int] = _f(None, "at most this many eval examples per evaluation; default: 64 on CUDA, 16 on "
                                           "the CPU")
    save_every: int = _f(50, "steps between checkpoints (0: only at the end)")
    seed: int = _f(0, "seed for data order and initialisation")
    # --- output
    out: str = _f("runs/latest", "output folder: adapter/, checkpoint/, metrics.json")
    metrics_json: Optional[str] = _f(None, "also write the metrics JSON here")
    resume: bool = _f(False, "continue the run in out from its checkpoint (out/checkpoint)")
    overwrite: bool = _f(False, "start a new run in an out folder that holds one, replacing its checkpoint, adapter and "
                                "metrics (other files there are left alone; put back if the new run ends before its "
                                "first checkpoint)")
    progress: bool = _f(True, "show tqdm progress bars")

    def __post_init__(self):
        for name, hint in get_type_hints(type(self)).items():
            kind, _, optional = field_type(hint)
            try:
                value = as_kind(getattr(self, name), kind, optional)
            except TypeError as e:
                raise ConfigError(f"{name} {e}, got {getattr(self, name)!r}") from None
            setattr(self, name, value)
            if get_origin(hint) is Literal and value not in get_args(hint):
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(get_args(hint))}")
        for name in ("model", "out"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} is empty; give " + ("'demo', a model folder or a hub id" if name == "model"
                                                               else "a folder for the run"))
        positive = ["rank", "max_length", "estimation_samples", "estimation_batch_size", "steps", "batch_size",
                    "grad_accum", "eval_samples"]
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ["alpha", "lr", "gamma"]:  # they meet fp32 tensors: within fp32's range
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= FLOAT32_MAX:
                raise ConfigError(f"{name} must be a positive finite number (at most {FLOAT32_MAX:.4g}), got "
                                  f"{getattr(self, name)}")
        if not -2**63 <= self.seed < 2**63:
            raise ConfigError(f"seed must be a 64-bit integer (between -2**63 and 2**63 - 1), got {self.seed}")
        for name in ["eval_every", "save_every", "weight_decay", "max_grad_norm", "nf4_error_rank",
                     "keep_activations_gib"]:
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.grad_budget_gib is not None and not 0 < self.grad_budget_gib < math.inf:
            raise ConfigError(f"grad_budget_gib must be positive, got {self.grad_budget_gib}")
        if not self.data:
            raise ConfigError("no training data: set data to a .jsonl, .json, .csv or .txt file")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in out, overwrite "
                              "replaces it; choose one")
        self.column_map()  # raises on a malformed mapping
        if not self.target_list():
            raise ConfigError("target_modules is empty: name module suffixes such as q_proj,v_proj, or all-linear")

    @property
    def eta(self) -> float:
        """LoRA scaling eta: alpha / sqrt(r) with rsLoRA, else alpha / r."""
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)

    def resolve(self, device_type: str, previous: Optional[dict] = None) -> "Config":
        """A copy with the settings left as None filled in; finetune runs with it. A resumed run takes them from the
        settings it was started with (`previous`, its checkpoint's), so that a resume on another machine continues
        the same run. Otherwise the learning rate is the init method's, and the CPU gets fewer estimation and eval
        samples (a 135M model takes seconds a batch on two cores). Refuses settings this device cannot run."""
        cpu, previous = device_type == "cpu", previous or {}
        if self.optimizer == "paged_adamw_8bit" and device_type != "cuda":
            raise ConfigError(f"optimizer=paged_adamw_8bit needs CUDA and this run is on {device_type}; use "
                              "optimizer=adamw")
        return dataclasses.replace(
            self, lr=self.lr or previous.get("lr") or DEFAULT_LR[self.init],
            estimation_samples=self.estimation_samples or previous.get("estimation_samples") or (16 if cpu else 128),
            eval_samples=self.eval_samples or previous.get("eval_samples") or (16 if cpu else 64))

    def column_map(self) -> dict[str, str]:
        """columns as {format column: file column}: "instruction=question,output=answer" -> {"instruction":
        "question", "output": "answer"}."""
        pairs = [p.strip() for p in (self.columns or "").split(",") if p.strip()]
        mapping = {}
        for pair in pairs:
            ours, _, theirs = (part.strip() for part in pair.partition("="))
            if ours not in FORMAT_COLUMN_NAMES or not theirs:
                raise ConfigError(f"columns: {pair!r} is not format_column=file_column, with format_column one of "
                                  f"{', '.join(FORMAT_COLUMN_NAMES)} (e.g. instruction=question,output=answer)")
            mapping[ours] = theirs
        return mapping

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
