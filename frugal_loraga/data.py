"""Data: read JSONL / JSON / CSV / TXT, detect the format, render to text with response spans, tokenize with a
loss mask, split off an eval set, and pad batches.

Every format becomes (text, [(start, end) character spans that carry loss]); tokens whose first character lies in
a span get labels, all others -100. Chat templates come from the tokenizer (a plain one is used if it has none).
"""
from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import ConfigError, DataError

log = logging.getLogger("frugal_loraga")
IGNORE = -100
FORMAT_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",),
                  "prompt_completion": ("prompt", "completion"), "text": ("text",)}
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What tokenization did, for logs and the app: counts and token lengths."""
    format: str
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        n = max(len(self.lengths), 1)
        return (f"{self.examples} examples ({self.format}); tokens min {min(self.lengths, default=0)}, "
                f"mean {sum(self.lengths) / n:.0f}, max {max(self.lengths, default=0)}; "
                f"{self.truncated} truncated to max_length, {self.dropped_no_target} dropped with no response tokens")


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv file as dicts; a .txt file gives one {"text": paragraph} per paragraph."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from e
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {number}: malformed JSON ({e.msg}); fix or remove that line") from e
            if not isinstance(record, dict):
                raise DataError(f"{path.name} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    elif suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {e.lineno}: malformed JSON ({e.msg})") from e
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError(f"{path.name}: expected a JSON list of objects")
    elif suffix == ".csv":
        records = list(csv.DictReader(raw.splitlines()))
    elif suffix == ".txt":
        records = [{"text": p.strip()} for p in re.split(r"\n\s*\n", raw) if p.strip()]
    else:
        raise DataError(f"{path.name}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .txt")
    if not records:
        raise DataError(f"{path.name} holds no examples")
    return records


def detect_format(records: list[dict]) -> str:
    keys = set(records[0])
    for name in ("chat", "alpaca", "prompt_completion", "text"):
        if set(FORMAT_COLUMNS[name]) <= keys:
            return name
    raise DataError(f"cannot tell the format from the columns {sorted(keys)}; expected instruction/output (alpaca), "
                    "messages (chat), prompt/completion, or text")


def check_columns(records: list[dict], fmt: str) -> None:
    for number, record in enumerate(records, 1):
        missing = [c for c in FORMAT_COLUMNS[fmt] if record.get(c) is None]
        if missing:
            raise DataError(f"record {number}: missing column {', '.join(missing)} needed by the {fmt} format "
                            f"(it has {sorted(record)})")


def render(record: dict, fmt: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """One record -> (text, loss spans). Alpaca becomes a user/assistant chat; chat spans are the assistant turns."""
    if fmt == "text":
        return record["text"], [(0, len(record["text"]))]
    if fmt == "prompt_completion":
        return record["prompt"] + record["completion"], [(len(record["prompt"]), len(record["prompt"] + record["completion"]))]
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise DataError("chat records need messages: a list of {role, content} objects")
    template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
    chat = lambda ms, gen=False: tokenizer.apply_chat_template(ms, chat_template=template, tokenize=False,
                                                               add_generation_prompt=gen)
    text, spans = chat(messages), []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(chat(messages[:i], gen=True)), len(chat(messages[:i + 1]))
            spans.append((start, end))
    return text, spans


def tokenize(records: list[dict], fmt: str, tokenizer, max_length: int) -> tuple[list[Example], DataReport]:
    if not tokenizer.is_fast:
        raise ConfigError("a fast tokenizer (tokenizer.json) is needed to place the loss mask")
    report, examples = DataReport(fmt), []
    templated = fmt in ("alpaca", "chat")
    for record in records:
        text, spans = render(record, fmt, tokenizer)
        encoded = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [i if any(s <= a < e for s, e in spans) else IGNORE for i, (a, _) in zip(ids, encoded["offset_mapping"])]
        if not templated and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(ids) > max_length:
            report.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            report.dropped_no_target += 1
            continue
        examples.append(Example(ids, labels))
        report.lengths.append(len(ids))
    report.examples = len(examples)
    if report.truncated:
        log.warning("%d of %d examples were longer than max_length=%d tokens and were truncated",
                    report.truncated, len(records), max_length)
    if not examples:
        raise DataError("no usable examples: every response was empty or cut off by max_length; raise max_length")
    return examples, report


def load_examples(path, fmt: str, tokenizer, max_length: int) -> tuple[list[Example], DataReport]:
    records = read_records(path)
    fmt = detect_format(records) if fmt == "auto" else fmt
    check_columns(records, fmt)
    return tokenize(records, fmt, tokenizer, max_length)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split: at least one eval example when fraction > 0 and there are two or more examples."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


WIDTH_MULTIPLE = 8


def padded_width(length: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """The width of a batch whose longest example has `length` tokens: rounded up to a multiple of `multiple`.
    On data of many lengths the decoder layers are compiled for any width (in training and in the LoRA-GA estimate),
    but inductor checks that flash attention's inputs are aligned to 8 elements, and so guards on the width mod 8: a
    graph traced at a width that is not a multiple of 8 was traced again at the first width that was (9 s at 8 layers,
    bench/results/profile_widths_flash_odd.json; a 12 s step at Llama-2-7B). It also bounds how many widths there
    are. The pads cost at most 7 tokens a row and change no loss."""
    return -(-length // multiple) * multiple


def collate(examples: list[Example], pad_id: int, device: torch.device,
            width: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (1 on tokens) and labels (-100 on pads and prompts), (B, T);
    T = width, or the longest example's padded_width."""
    width = width or padded_width(max(len(e.input_ids) for e in examples))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def causal_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is called with for a collated batch: input_ids and labels, no attention mask. The pads are on
    the right, after every real token, which causal attention never lets see them, and they carry no loss, so the loss
    and every gradient are those with the mask. Without it the attention runs plain causal (flash attention), and
    every batch gives the compiled decoder layers the same kind of inputs."""
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


def micro_batch(examples: list[Example], batch_size: int, seed: int, index: int) -> list[Example]:
    """The examples of micro-batch number `index`: a seeded shuffle per epoch, so any index is reproducible."""
    per_epoch = max(len(examples) // batch_size, 1)
    epoch, position = divmod(index, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[i] for i in order[position * batch_size:(position + 1) * batch_size]]
