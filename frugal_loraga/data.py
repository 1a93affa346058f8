"""Data: read JSONL / JSON / CSV / TXT, detect the format, render to text with response spans, tokenize with a
loss mask, split off an eval set, and pad batches.

Every format becomes (text, [(start, end) character spans that carry loss]); tokens whose first character lies in
a span get labels, all others -100. Chat templates come from the tokenizer (a plain one is used if it has none).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

try:  # what a chat template raises to refuse messages (e.g. roles that do not alternate)
    from jinja2 import TemplateError
except ImportError:  # chat templates need jinja2; without it there is nothing of theirs to catch
    TemplateError = ()

from .errors import ConfigError, DataError

log = logging.getLogger("frugal_loraga")
IGNORE = -100
FORMAT_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "sharegpt": ("conversations",),
                  "prompt_completion": ("prompt", "completion"), "text": ("text",)}
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")
TEXT_COLUMNS = {"alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion"),
                "text": ("text",)}  # the text fields of each format but chat, in the order they are rendered
# A token is rarely longer than 32 characters, so max_length tokens fit in max_length * 32 characters; text cut
# beyond that only shortens an example that max_length truncates anyway, and bounds the tokenizer's work on it.
MAX_CHARS_PER_TOKEN = 32
CSV_CELL_LIMIT = 2**31 - 1  # csv's default is 131072 characters a cell; a long text is bounded when tokenized


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


def read_located(path: str | Path) -> tuple[list[dict], list[str]]:
    """The records of a data file and where each one is, for messages: "name.jsonl line 3", "name.json record 3"."""
    path = Path(path)
    raw = read_text(path)
    parse = PARSERS.get(path.suffix.lower())
    if parse is None:
        raise DataError(f"{path.name}: unsupported file type '{path.suffix.lower()}'; use .jsonl, .json, .csv or .txt")
    located = parse(raw, path.name)
    if not located:
        raise DataError(f"{path.name} holds no examples; add at least one record")
    return [record for _, record in located], [place for place, _ in located]


def read_text(path: Path) -> str:
    """The file's text as UTF-8; a byte-order mark (as Excel writes) is dropped."""
    if path.is_dir():
        raise DataError(f"data path {path} is a directory, not a file; give a .jsonl, .json, .csv or .txt file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read {path} as UTF-8 text (byte {e.start} is not UTF-8); "
                        "save the file as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e


def parse_jsonl(raw: str, name: str) -> list[tuple[str, dict]]:
    """One JSON object per line. Lines end at "\n" only: JSON strings may hold U+2028, U+2029 and U+0085."""
    located = []
    for number, line in enumerate(raw.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {number}: malformed JSON ({e.msg}); fix or remove that line") from e
        except (ValueError, RecursionError) as e:  # a number of over 4300 digits; lists nested thousands deep
            raise DataError(f"{name} line {number}: unreadable JSON ({unreadable(e)}); fix or remove that line") from e
        if not isinstance(record, dict):
            raise DataError(f"{name} line {number}: expected a JSON object {{...}}, got {describe(record)}; "
                            "put one record object on each line")
        located.append((f"{name} line {number}", record))
    return located


def unreadable(error: Exception) -> str:
    """Why Python's JSON reader gave up on valid JSON, in words: nesting too deep, or (its only other ValueError) a
    number too long."""
    if isinstance(error, RecursionError):
        return "lists or objects nested too deeply"
    return f"a number of more than {sys.get_int_max_str_digits()} digits"


def parse_json(raw: str, name: str) -> list[tuple[str, dict]]:
    """A JSON list of objects."""
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: malformed JSON ({e.msg}); fix it") from e
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}: unreadable JSON ({unreadable(e)}); fix it") from e
    if not isinstance(records, list):
        raise DataError(f"{name}: expected a JSON list of objects, but the file holds {describe(records)}; "
                        "put the records in a list [{...}, {...}], or give a .jsonl file with one object per line")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{name}: expected a JSON list of objects, but record {number} is {describe(record)}")
    return [(f"{name} record {number}", record) for number, record in enumerate(records, 1)]


def parse_csv(raw: str, name: str) -> list[tuple[str, dict]]:
    """A header row of column names, then one record a row; quoted cells keep their commas and newlines."""
    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    located, end, previous = [], 0, csv.field_size_limit(CSV_CELL_LIMIT)
    try:
        header = next(reader, [])
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{name} line {start}: {len(row)} cells, but the header has {len(header)} columns; "
                                "put quotes around cells that hold commas")
            located.append((f"{name} line {start}", dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{name} line {end + 1}: not valid CSV ({e}); "
                        "check the quotes of the row that starts there") from e
    finally:
        csv.field_size_limit(previous)
    return located


def parse_txt(raw: str, name: str) -> list[tuple[str, dict]]:
    """One {"text": paragraph} per paragraph; paragraphs are separated by blank lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    return [(f"{name} paragraph {number}", {"text": p}) for number, p in enumerate(paragraphs, 1)]


PARSERS = {".jsonl": parse_jsonl, ".json": parse_json, ".csv": parse_csv, ".txt": parse_txt}
KINDS = {type(None): "null", bool: "a boolean", int: "a number (int)", float: "a number (float)", str: "text",
         list: "a list", dict: "an object"}


def describe(value) -> str:
    """What kind of JSON value this is, for messages: "a number (int)", "a list", "null", ..."""
    return KINDS.get(type(value), type(value).__name__)


def detect_format(records: list[dict], file: str = "the data") -> str:
    """The format whose columns the first record has (file: the file's name, for the message)."""
    keys = set(records[0])
    for name in ("chat", "sharegpt", "alpaca", "prompt_completion", "text"):
        if set(FORMAT_COLUMNS[name]) <= keys:
            return name
    raise DataError(f"{file}: cannot tell the format from the columns {sorted(keys)}; expected instruction/output "
                    "(alpaca), messages (chat), conversations (sharegpt), prompt/completion, or text, or name yours "
                    "with columns (e.g. prompt=question,completion=answer)")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}


def from_sharegpt(records: list[dict], places: list[str]) -> list[dict]:
    """ShareGPT records, {"conversations": [{"from": "human" | "gpt" | "system", "value": text}, ...]}, as chat
    records, {"messages": [{"role": "user" | "assistant" | "system", "content": text}, ...]}."""
    shape = '{"from": ..., "value": ...}'
    chats = []
    for place, record in zip(places, records):
        if "conversations" not in record:
            raise DataError(f"{place}: missing column conversations needed by the sharegpt format (it has "
                            f"{sorted(record)})")
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{place}: column 'conversations' holds {describe(turns)}, not a list; ShareGPT "
                            f"conversations are a list of {shape} objects")
        messages = []
        for number, turn in enumerate(turns, 1):
            if not isinstance(turn, dict) or not {"from", "value"} <= set(turn):
                raise DataError(f"{place}: turn {number} is not a {shape} object")
            role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                raise DataError(f"{place}: turn {number} is from {turn['from']!r}; ShareGPT turns are from "
                                f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": turn["value"]})
        chats.append({"messages": messages})
    return chats


def check_columns(records: list[dict], fmt: str, places: list[str]) -> None:
    """Raise DataError at the first record that lacks a column the format needs or holds a non-string where text
    belongs. alpaca's input may be absent, null or empty."""
    for place, record in zip(places, records):
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in record]
        if missing:
            raise DataError(f"{place}: missing column {', '.join(missing)} needed by the {fmt} format "
                            f"(it has {sorted(record)})")
        if fmt == "chat":
            check_messages(record["messages"], place)
            continue
        for column in TEXT_COLUMNS[fmt]:
            if column in FORMAT_COLUMNS[fmt] or record.get(column) is not None:
                require_text(record[column], place, f"column '{column}'", column)


def check_messages(messages, place: str) -> None:
    """Raise DataError unless messages is a list of {"role": str, "content": str} objects."""
    shape = '{"role": ..., "content": ...}'
    if not isinstance(messages, list):
        raise DataError(f"{place}: column 'messages' holds {describe(messages)}, not a list; "
                        f"messages must be a list of {shape} objects")
    if not messages:
        raise DataError(f"{place}: column 'messages' is an empty list; a chat needs at least one {shape} object")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError(f"{place}: message {number} is {describe(message)}, not a {shape} object")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{place}: message {number} has no '{key}'; every message needs a role and a content")
            require_text(message[key], place, f"message {number}'s {key}", f"message's {key}")


def require_text(value, place: str, what: str, every: str) -> None:
    """Raise DataError unless value is a string: "<place>: <what> holds a number (int), not text; ..."; or one that
    holds half of a UTF-16 pair (JSON's escape "\\ud800" alone), which no tokenizer takes."""
    if not isinstance(value, str):
        raise DataError(f"{place}: {what} holds {describe(value)}, not text; every {every} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{place}: {what} holds {value[e.start]!r}, half of a UTF-16 pair with no other half (an "
                        "escape such as \\ud800 alone); fix or remove that text") from e


def clip_record(record: dict, fmt: str, max_length: int) -> tuple[dict, bool]:
    """The record with its text fields cut, in the order they are rendered, to max_length * MAX_CHARS_PER_TOKEN
    characters in all (and a chat to its first max_length messages), and whether anything was cut. What is cut lies
    past max_length tokens, so this bounds the tokenizer's work on a huge record without changing its example."""
    limit = max_length * MAX_CHARS_PER_TOKEN
    if fmt == "chat":
        messages = record["messages"][:max_length]
        contents = [m["content"] for m in messages]
        kept = clip_texts(contents, limit)
        clipped = {**record, "messages": [{**m, "content": c} for m, c in zip(messages, kept)]}
        return clipped, len(messages) < len(record["messages"]) or sum(map(len, contents)) > limit
    columns = [c for c in TEXT_COLUMNS[fmt] if record.get(c)]
    texts = [record[c] for c in columns]
    return {**record, **dict(zip(columns, clip_texts(texts, limit)))}, sum(map(len, texts)) > limit


def clip_texts(texts: list[str], limit: int) -> list[str]:
    """The texts cut so that together they hold at most `limit` characters, the first ones kept first."""
    kept = []
    for text in texts:
        kept.append(text[:limit])
        limit -= len(kept[-1])
    return kept


def chat_template(tokenizer, choice: str = "model") -> str:
    """The chat template to render with: the tokenizer's own ("model"; the plain one when it has none) or "plain"."""
    return PLAIN_CHAT_TEMPLATE if choice == "plain" else tokenizer.chat_template or PLAIN_CHAT_TEMPLATE


def render(record: dict, fmt: str, tokenizer, template: str = "model") -> tuple[str, list[tuple[int, int]]]:
    """One record -> (text, loss spans). Alpaca becomes a user/assistant chat; chat spans are the assistant turns.
    template: the chat template choice (chat_template)."""
    if fmt == "text":
        return record["text"], [(0, len(record["text"]))]
    if fmt == "prompt_completion":
        return record["prompt"] + record["completion"], [(len(record["prompt"]), len(record["prompt"] + record["completion"]))]
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = record["messages"]
    chosen = chat_template(tokenizer, template)
    chat = lambda ms, gen=False: tokenizer.apply_chat_template(ms, chat_template=chosen, tokenize=False,
                                                               add_generation_prompt=gen)
    text, spans = chat(messages), []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(chat(messages[:i], gen=True)) if i else _content_start(chat, message)
            if start is not None:
                spans.append((start, len(chat(messages[:i + 1]))))
    return text, spans


CONTENT_MARK = "\u2063frugal-loraga content\u2063"  # no chat template renders this but as a message's content


def _content_start(chat, message: dict) -> Optional[int]:
    """Where the content of a chat's first message (an assistant turn: no prompt to render before it) begins in the
    rendered chat: after the template's header (a default system prompt, the role), found by rendering the message
    with CONTENT_MARK for content; None where the template does not render it as given (the turn is then not
    trained)."""
    rendered = chat([{**message, "content": CONTENT_MARK}])
    return rendered.index(CONTENT_MARK) if CONTENT_MARK in rendered else None


def tokenize(records: list[dict], fmt: str, tokenizer, max_length: int, places: list[str],
             template: str = "model") -> tuple[list[Example], DataReport]:
    """Examples of at most max_length tokens, labels only on response tokens; the report counts what was cut."""
    if not tokenizer.is_fast:
        raise ConfigError("a fast tokenizer (tokenizer.json) is needed to place the loss mask")
    report, examples = DataReport(fmt), []
    templated = fmt in ("alpaca", "chat")
    for place, record in zip(places, records):
        record, clipped = clip_record(record, fmt, max_length)
        try:
            text, spans = render(record, fmt, tokenizer, template)
        except (TemplateError, ValueError) as e:  # transformers' own checks raise ValueError
            raise DataError(f"{place}: the tokenizer's chat template refused the messages ({e}); "
                            "fix their roles or order") from e
        encoded = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [i if any(s <= a < e for s, e in spans) else IGNORE for i, (a, _) in zip(ids, encoded["offset_mapping"])]
        if not templated and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if clipped or len(ids) > max_length:
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
    return examples, report


def rename_columns(records: list[dict], columns: dict[str, str], places: list[str]) -> list[dict]:
    """Records with the file's columns renamed to the format's: columns maps format column -> file column
    ({"instruction": "question", "output": "answer"})."""
    if not columns:
        return records
    for place, record in zip(places, records):
        missing = [theirs for theirs in columns.values() if theirs not in record]
        if missing:
            raise DataError(f"{place}: no column {', '.join(missing)} to map (it has {sorted(record)}); fix the "
                            "column mapping")
    renamed = {theirs: ours for ours, theirs in columns.items()}
    return [{renamed.get(key, key): value for key, value in record.items()} for record in records]


def read_data(path, fmt: str, columns: Optional[dict[str, str]] = None) -> tuple[list[dict], str, list[str]]:
    """A data file's records with its columns mapped, its format (detected when 'auto') and each record's place."""
    records, places = read_located(path)
    records = rename_columns(records, columns or {}, places)
    return records, detect_format(records, Path(path).name) if fmt == "auto" else fmt, places


def checked_records(path, fmt: str, columns: Optional[dict[str, str]] = None) -> tuple[list[dict], str, list[str]]:
    """read_data's records, format and places, ShareGPT's turned to chats, each record's columns checked: every
    error of the file but those that need the tokenizer (in seconds for the largest file the app takes)."""
    records, fmt, places = read_data(path, fmt, columns)
    if fmt == "sharegpt":
        records, fmt = from_sharegpt(records, places), "chat"
    check_columns(records, fmt, places)
    return records, fmt, places


def load_examples(path, fmt: str, tokenizer, max_length: int, columns: Optional[dict[str, str]] = None,
                  template: str = "model") -> tuple[list[Example], DataReport]:
    """Read, check and tokenize a data file; every bad input gives a DataError naming the file and the record.
    columns: format column -> file column (Config.column_map); template: the chat template choice (chat_template)."""
    records, fmt, places = checked_records(path, fmt, columns)
    examples, report = tokenize(records, fmt, tokenizer, max_length, places, template)
    if not examples:
        cause = (f"every response was cut off by max_length={max_length} or empty; raise max_length"
                 if report.truncated else "no record has a response to train on: an assistant turn of a chat, a "
                 "non-empty output, completion or text; check the file's content")
        raise DataError(f"{Path(path).name}: no usable examples: {cause}")
    return examples, report


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
    graph traced at a width that is not a multiple of 8 is traced again at the first width that is, a slow step
    (bench/RESULTS.md). It also bounds how many widths there are. The pads cost at most 7 tokens a row and change no loss."""
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
