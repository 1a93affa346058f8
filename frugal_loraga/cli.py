"""Command line: `frugal-loraga train --model demo --data FILE ...` (or `python -m frugal_loraga`); one flag per Config
field. Exit codes: 0 done (or stopped with a checkpoint), 2 bad input (settings, data, model folder, out of memory:
the message says what to change), 1 a failure during the run (a full disk, training that diverged)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from typing import Optional, get_type_hints

from .config import Config, field_type
from .errors import ConfigError, DataError, OutOfMemory, RunError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugal-loraga", description="LoRA-GA fine-tuning on one GPU")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="initialise (LoRA-GA or LoRA), train and export a PEFT adapter",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind, choices, _ = field_type(hints[f.name])
        if kind is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            train.add_argument(flag, type=kind, choices=choices, default=f.default, help=f.metadata["help"],
                               required=f.name == "data")
    return parser


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_negative_values(argv: list[str]) -> list[str]:
    """'--lr -1e-4' -> '--lr=-1e-4': argparse takes a value that starts with '-' and is not a plain negative integer
    or decimal for a flag, so the setting would not reach Config, whose message says what is allowed."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and arg.startswith("-") \
                and _is_number(arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = Config(**{k: v for k, v in vars(args).items() if k != "command"})
        from .api import finetune  # torch loads here, not for --help
        from .blocks import keep_compiled_graphs
        keep_compiled_graphs()
        result = finetune(config)
    except (ConfigError, DataError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in result.metrics.items() if not isinstance(v, list)}
    print(json.dumps({"adapter": str(result.adapter_dir), **summary}, indent=1))
    return 0


def command_line(config: Config) -> str:
    """The `frugal-loraga train` command that builds this config: a flag for each setting that differs from its
    default (the app's "show the CLI command")."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    words = ["frugal-loraga", "train"]
    for name, value in config.to_dict().items():
        if value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)
