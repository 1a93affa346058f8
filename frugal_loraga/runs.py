"""The runs below a folder, as the app lists them: each run folder's record (checkpoint.RECORD) and metrics, and the
settings to resume one with, read from its own folder (so a resume needs nothing from the page that started it)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .checkpoint import check_unfinished, checkpoint_path, has_adapter, read_record, running_elsewhere
from .config import ABSENT_FROM_OLDER_RUNS, Config


def run_config(folder: str | Path) -> Config:
    """The settings a run was started with (resolved), from its record; fields this version does not know are left
    out, fields it added since keep their defaults, or the value older runs ran with (ABSENT_FROM_OLDER_RUNS)."""
    record = read_record(folder)
    if record is None:
        raise FileNotFoundError(f"{folder} holds no run (no {Path(folder) / 'run.json'})")
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in {**ABSENT_FROM_OLDER_RUNS, **record["config"]}.items() if k in names})


def resume_config(folder: str | Path) -> Config:
    """The settings that continue the run in folder: from its checkpoint, or, for a run that ended before writing one
    (stopped or failed before training began: nothing was saved), the same run started over. ConfigError for a run
    that has finished."""
    config = dataclasses.replace(run_config(folder), out=str(Path(folder).absolute()))  # where it is now, if moved
    check_unfinished(folder, resume=True)
    if checkpoint_path(folder).exists():
        return dataclasses.replace(config, resume=True, overwrite=False)
    return dataclasses.replace(config, resume=False, overwrite=True)


def final_loss(metrics: dict, key: str):
    """The last [step, loss] of a curve's loss, or None."""
    curve = metrics.get(key) or []
    return curve[-1][1] if curve else None


def live_status(record: dict, busy_here: bool) -> str:
    """The record's status, a 'running' one checked against its process: 'running elsewhere' while another live
    process on this machine runs it (checkpoint.running_elsewhere), 'running' while this process runs a job
    (busy_here) and wrote it, else 'interrupted': its process ended before it could say so (or ran on another
    machine, which cannot be asked)."""
    if record["status"] != "running":
        return record["status"]
    if running_elsewhere(record):
        return "running elsewhere"
    return "running" if busy_here and record.get("pid") in (os.getpid(), None) else "interrupted"


def list_runs(root: str | Path, busy_here: bool = False, live: dict[str, dict] | None = None) -> list[dict]:
    """One row per run folder directly below root, the last updated first: name, status (live_status; busy_here:
    whether this process runs a job now), method, model, steps done and asked, final train and eval loss, and
    whether an adapter was exported. live: the metrics so far of the runs this process runs, by folder name, read in
    place of their metrics.json (written when a run ends)."""
    rows = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        record = read_record(folder)
        if record is None:
            continue
        try:
            metrics = (live or {}).get(folder.name) or json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        config = record["config"]
        steps_done = (metrics.get("train_loss") or [[0]])[-1][0]
        rows.append({"name": folder.name, "status": live_status(record, busy_here), "init": config["init"],
                     "model": config["model"], "steps": f"{steps_done}/{config['steps']}",
                     "train_loss": final_loss(metrics, "train_loss"),
                     "eval_loss": final_loss(metrics, "eval_loss"),
                     "adapter": has_adapter(folder),
                     "message": record.get("message", ""), "updated": record["updated"]})
    return sorted(rows, key=lambda row: row["updated"], reverse=True)
