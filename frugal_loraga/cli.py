"""Command line: `frugal-loraga train --model demo --data FILE ...` (or `python -m frugal_loraga`); one flag per Config
field. Exit codes: 0 done, 2 bad input (settings, data, model folder, out of memory: the message says what to change),
1 a failure during the run (a full disk, training that diverged), 130 stopped by Ctrl-C (after the current step, with
a checkpoint to resume from; a second Ctrl-C ends it at once)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, get_type_hints

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


STOPPED = 130  # the shell's code for a command ended by Ctrl-C


@contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """An event that the first Ctrl-C (SIGINT) sets: the run stops as the app's Stop button stops it, after the
    current step with a checkpoint written. A second Ctrl-C raises KeyboardInterrupt, as Python does by default. Under
    torchrun (several processes, which must stop at the same step), or outside the main thread (where no handler can
    be set), Ctrl-C keeps Python's default."""
    stop = threading.Event()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the current step (a checkpoint is written); Ctrl-C again ends at once",
              file=sys.stderr)
    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def stopped_message(config: Config, result) -> str:
    """What a stopped run kept, and the command that continues it."""
    if result.adapter_dir is None:
        return "stopped before training began: nothing was saved; run the same command to start again"
    step = (result.metrics.get("train_loss") or [[0]])[-1][0]
    resume = dataclasses.replace(config, resume=True, overwrite=False)
    return (f"stopped after step {step} of {config.steps}; the checkpoint is in {config.out}/checkpoint and the "
            f"adapter so far in {result.adapter_dir}. Continue with:\n  {command_line(resume, invoked_as())}")


def invoked_as() -> str:
    """How this process was started, as a command: the installed `frugal-loraga` script, or `python -m`."""
    return "frugal-loraga" if Path(sys.argv[0]).name == "frugal-loraga" else "python -m frugal_loraga"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = Config(**{k: v for k, v in vars(args).items() if k != "command"})
        from .api import finetune  # torch loads here, not for --help
        from .blocks import keep_compiled_graphs
        keep_compiled_graphs()
        with ctrl_c_stops() as stop:
            result = finetune(config, stop=stop)
    except KeyboardInterrupt:
        print("\nended by Ctrl-C; any checkpoint written so far is kept (resume with --resume)", file=sys.stderr)
        return STOPPED
    except (ConfigError, DataError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stopped:
        print(stopped_message(config, result), file=sys.stderr)
        return STOPPED
    summary = {k: v for k, v in result.metrics.items() if not isinstance(v, list)}
    print(json.dumps({"adapter": str(result.adapter_dir), **summary}, indent=1))
    return 0


def command_line(config: Config, program: str = "python -m frugal_loraga") -> str:
    """The `<program> train` command that builds this config: a flag for each setting that differs from its default
    (the app's "show the CLI command", the resume hint after Ctrl-C). `python -m` by default: it runs in the
    repository without `pip install .` too."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    words = [*program.split(), "train"]
    for name, value in config.to_dict().items():
        if value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)
