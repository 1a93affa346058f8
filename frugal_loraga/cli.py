"""Command line: `python -m frugal_loraga train --model demo --data FILE ...`; one flag per Config field."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

from .config import Config
from .errors import ConfigError, DataError, OutOfMemory


def _arg_type(hint):
    """(argparse type, choices) for a Config field's type hint."""
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return str, list(get_args(hint))
    return hint, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m frugal_loraga", description="LoRA-GA fine-tuning on one GPU")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="initialise (LoRA-GA or LoRA), train and export a PEFT adapter",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind, choices = _arg_type(hints[f.name])
        if kind is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            train.add_argument(flag, type=kind, choices=choices, default=f.default, help=f.metadata["help"],
                               required=f.name == "data")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .api import finetune
    try:
        config = Config(**{k: v for k, v in vars(args).items() if k != "command"})
        result = finetune(config)
    except (ConfigError, DataError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.metrics.items() if not isinstance(v, list)}
    print(json.dumps({"adapter": str(result.adapter_dir), **summary}, indent=1))
    return 0
