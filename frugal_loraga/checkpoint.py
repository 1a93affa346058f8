"""The run folder: what a run writes (out/run.json, out/checkpoint/state.pt, out/adapter/, out/adapter_nf4/ where the
4-bit error is corrected, out/metrics.json), checked
before the slow work, written atomically, and read back to resume.

out/run.json is the run's record, small enough to list many runs by: its settings (Config, resolved), what it learns
from (inputs), and its status: running, stopped, finished or failed (with the message).

A checkpoint (save_checkpoint, load_checkpoint) is {"config", "inputs", "step", "metrics", "adapter"[, "optimizer",
"scheduler"]}. "inputs" identifies
what the run was trained on by content, not by how a path was spelled: the model folder resolved, and a SHA-256 of
each data file. A resume must match them and every setting that changes the result (all but RESUMABLE_CHANGES).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ABSENT_FROM_OLDER_RUNS, Config
from .distributed import is_writer
from .errors import ConfigError, RunError
from .progress import Metrics

log = logging.getLogger(__name__)

# What makes the init (factors and corrections): a resume takes them from the checkpoint, so these may differ there (a
# resume that names other values is told so).
INIT_SETTINGS = {"estimation_samples", "estimation_batch_size", "grad_budget_gib", "svd", "nf4_error_rank"}
# Fields that may change between a run and its resume without changing the result. The paths (out, data, eval_data,
# model) are compared through `inputs` instead: the same file spelled another way, or at another path, is the same.
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "metrics_json", "save_every", "device", "compile", "out",
                     "data", "eval_data", "model", "embeddings_on_cpu", "gradient_checkpointing",
                     "keep_activations_gib", *INIT_SETTINGS}
RECORD = "run.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what export_adapter writes in an adapter folder
ADAPTER_FOLDERS = ("adapter", "adapter_nf4")  # for the original base; for the 4-bit base, with its correction


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoint" / "state.pt"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_inputs(config: Config, model_path: str) -> dict:
    """What the run learns from, by content: the model (a local folder resolved, or a hub id) and the data's hashes."""
    local = Path(model_path).expanduser()
    return {"model": str(local.resolve()) if local.exists() else model_path,
            "data": file_sha256(config.data),
            "eval_data": file_sha256(config.eval_data) if config.eval_data else None}


def _probe_writable(folder: Path, what: str) -> None:
    """Refuse a folder that could not be created or written, without creating it: a temporary file in the folder,
    or in its nearest existing ancestor when it does not exist yet (a bad input leaves no empty folder behind)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {what} in {folder}: {e.strerror or e}; choose a folder you can write to") from e


def check_outputs(config: Config) -> None:
    """Before any slow work: the out folder and the metrics file can be written, the metrics file is none the run
    reads or writes, and the out folder holds no files that this run would write over (another run's, or files of
    those names: unless resuming it or asked to overwrite), or holds a run to resume."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder; choose a folder for the run")
    for part in (*ADAPTER_FOLDERS, "checkpoint"):
        if (out / part).exists() and not (out / part).is_dir():
            raise ConfigError(f"{out / part} is a file, but the run writes a folder there; move it or choose another out")
    _probe_writable(out, "the run")
    if config.metrics_json:
        metrics = Path(config.metrics_json)
        if metrics.is_dir():
            raise ConfigError(f"metrics_json={metrics} is a folder; give a file path such as {metrics / 'metrics.json'}")
        _probe_writable(metrics.parent, "the metrics file")
        taken = [Path(p) for p in (config.data, config.eval_data) if p] + \
            [p for p in run_files(out) if p != out / "metrics.json"]
        if any(metrics.resolve() == path.resolve() for path in taken):
            raise ConfigError(f"metrics_json={metrics} is a file the run reads or writes (its data, record, checkpoint "
                              "or adapter); choose another path")
        if metrics.exists() and config.resume and not _runs_metrics(out, metrics):
            raise ConfigError(f"metrics_json={metrics} exists and is not the metrics file of the run to resume; "
                              "choose another path, or move that file")
        if metrics.exists() and not (config.resume or config.overwrite):
            raise ConfigError(f"metrics_json={metrics} exists; choose another path, or replace it with overwrite "
                              "(--overwrite)")
    check_not_running_elsewhere(out)
    record = read_record(out)
    existing = checkpoint_path(out).exists()
    adapters = [str(out / folder / ADAPTER_FILES[1]) for folder in ADAPTER_FOLDERS
                if (out / folder / ADAPTER_FILES[1]).exists()]
    if adapters and not existing and not config.overwrite:
        raise ConfigError(f"{out} holds an adapter ({adapters[0]}) but no checkpoint to resume: the run would replace "
                          "it; choose another out folder, or replace it with overwrite (--overwrite)")
    check_unfinished(out, config.resume)
    if config.resume and not existing:
        raise ConfigError(f"nothing to resume: {checkpoint_path(out)} does not exist; start a new run without resume, "
                          "or point out at the folder of the run to continue")
    if existing and not config.resume and not config.overwrite:
        resumable = "" if record is not None and record["status"] == "finished" else \
            "continue it with resume (--resume), "
        raise ConfigError(f"{out} already holds a run ({checkpoint_path(out)}); {resumable}choose another out folder, "
                          "or replace it with overwrite (--overwrite)")
    held = [path for path in run_files(out) if path.exists()]
    saved_nothing = record is not None and held == [out / RECORD]  # stopped or failed before training: started over
    if held and not (saved_nothing or config.resume or config.overwrite):
        names = ", ".join(str(path.relative_to(out)) for path in held)
        raise ConfigError(f"{out} holds {names}, which this run would write over; choose another out folder, or "
                          "replace them with overwrite (--overwrite)")


def _runs_metrics(out: Path, metrics: Path) -> bool:
    """Whether `metrics` is the metrics_json file the run in `out` last wrote (its record's, an absolute path): a
    resume may write it again."""
    recorded = ((read_record(out) or {}).get("config") or {}).get("metrics_json")
    return recorded is not None and Path(recorded).resolve() == metrics.resolve()


def check_unfinished(out: str | Path, resume: bool) -> None:
    """ConfigError for a resume of a run that has finished: it would train nothing and export the same adapter
    again. (A run whose last checkpoint was written but whose export was cut short is not finished: it resumes.)"""
    record = read_record(out)
    if resume and record is not None and record["status"] == "finished" and has_adapter(out):
        raise ConfigError(f"the run in {out} has finished its {record['config']['steps']} steps (its adapter is in "
                          f"{Path(out) / ADAPTER_FOLDERS[0]}): nothing to resume; to train more, start a new run")


def has_adapter(out: str | Path) -> bool:
    """Whether the run in out has exported an adapter."""
    return (Path(out) / "adapter" / ADAPTER_FILES[1]).exists()


def adapter_for(out: str | Path, load_in_4bit: bool) -> Path:
    """The run's adapter folder that gives the trained model on the base loaded as load_in_4bit says: adapter_nf4 (with
    the 4-bit error's correction) on a 4-bit base where the run wrote one, else adapter."""
    corrected = Path(out) / ADAPTER_FOLDERS[1]
    return corrected if load_in_4bit and (corrected / ADAPTER_FILES[1]).exists() else Path(out) / ADAPTER_FOLDERS[0]


def run_files(out: str | Path) -> list[Path]:
    """The files a run writes in out: its record, checkpoint, metrics and adapter files."""
    out = Path(out)
    adapter = [out / folder / name for folder in ADAPTER_FOLDERS for name in ADAPTER_FILES]
    return [out / RECORD, checkpoint_path(out), out / "metrics.json", *adapter]


def load_checkpoint(config: Config, inputs: dict) -> Optional[dict]:
    """The run's checkpoint when resuming; refuses one written with other settings or on other inputs."""
    if not config.resume:
        return None
    path = checkpoint_path(config.out)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch's errors vary by how it is broken
        raise ConfigError(f"cannot resume: {path} does not read as a checkpoint ({type(e).__name__}: {e}); start the "
                          "run over with overwrite (--overwrite) or in a new out folder (in the app: Train under a new "
                          "name)") from e
    now = config.to_dict()
    state["config"] = {**ABSENT_FROM_OLDER_RUNS, **state["config"]}
    changed = sorted(k for k, v in state["config"].items()  # a setting left None takes the checkpoint's (resolve)
                     if k not in RESUMABLE_CHANGES and now.get(k) is not None and now.get(k) != v)
    changed += sorted(k for k, v in state.get("inputs", {}).items() if inputs.get(k) != v)
    if changed:
        raise ConfigError(f"cannot resume {path}: it was written with other settings or inputs for "
                          f"{', '.join(changed)}; use the same settings and files, or a new out folder")
    used = INIT_SETTINGS if config.load_in_4bit else INIT_SETTINGS - {"nf4_error_rank"}
    differ = sorted(k for k in used if now.get(k) is not None and now.get(k) != state["config"].get(k))
    if differ:
        log.warning("resuming %s with its own init, made with %s: the %s here differ and would apply to a new run "
                    "only", path, ", ".join(f"{k}={state['config'].get(k)}" for k in differ),
                    ", ".join(f"{k}={now[k]}" for k in differ))
    return state


def atomic_write(path: Path, write: Callable[[Path], None], last_good: str = "",
                 when_full: str = "Free disk space, then resume.") -> None:
    """write(tmp) then rename tmp over path: a reader sees the old file or the new one, never half of one. A full disk
    (or any OS error, a read-only folder too) leaves the old file as it was and becomes a RunError that says so, with
    when_full's advice for a full disk. Of several processes, only rank 0 writes (distributed.is_writer)."""
    if not is_writer():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with contextlib.suppress(OSError):  # a file system without modes keeps its own
            os.chmod(tmp, 0o666 & ~UMASK)  # as open() makes a file: some writers (safetensors) make theirs private
        os.replace(tmp, path)
    except Exception as e:  # torch and safetensors report a full disk in errors of their own, not as OSError
        with contextlib.suppress(OSError):  # a folder turned read-only refuses this too: the error is the write's
            tmp.unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 2**20
        reason = getattr(e, "strerror", None) or ("No space left on device" if full else str(e))
        raise RunError(f"could not write {path}: {reason}. {last_good or 'The previous file is unchanged.'} "
                       + (when_full if full else "")) from e


def file_mode_mask() -> int:
    """The process's umask: from /proc where there is one, else by setting it and setting it back (at import,
    before any thread makes files)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = file_mode_mask()


def save_checkpoint(config: Config, inputs: dict, step: int, metrics: Metrics, layers: dict,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None) -> None:
    """The run's state after `step` optimizer steps, written atomically and flushed to disk: its settings, inputs and
    metrics, every adapter's A, B, A0, B0 (layers: name -> LoraLinear) and, once training has begun, the optimizer's
    and the lr scheduler's state."""
    state = {"config": config.to_dict(), "inputs": inputs, "step": step, "metrics": metrics,
             "adapter": adapter_state(layers)}
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    path = checkpoint_path(config.out)
    if path.exists():
        atomic_write(path, write, f"The last checkpoint ({path}) is intact.")
    else:  # the run's first: nothing to resume from
        atomic_write(path, write, "No checkpoint was saved yet.", "Free disk space, then start the run over with "
                     "overwrite (--overwrite; in the app: select it under Runs and press Resume).")


def adapter_state(layers: dict) -> dict:
    """name -> {"A", "B", "A0", "B0", "L", "R"} on the CPU (A0, B0 empty for plain LoRA; L, R without a correction)."""
    return {name: {k: getattr(layer, k).detach().cpu() for k in ("A", "B", "A0", "B0", "L", "R")}
            for name, layer in layers.items()}


def factors_from_checkpoint(adapter: dict, device: torch.device) -> tuple[dict, dict]:
    """From a checkpoint's adapter tensors, on device: name -> (A, B, A0 | None, B0 | None) (empty A0: plain LoRA),
    and name -> (L, R) for the layers with a correction (none in a checkpoint from before corrections)."""
    factors = {name: tuple(t.to(device) if t.numel() else None for t in (s["A"], s["B"], s["A0"], s["B0"]))
               for name, s in adapter.items()}
    corrections = {name: (s["L"].to(device), s["R"].to(device)) for name, s in adapter.items()
                   if s.get("R", torch.zeros(0)).numel()}
    return factors, corrections


def process_identity(pid: int) -> Optional[str]:
    """Which process runs under pid, None when none does: on Linux its start time since boot (/proc), which tells it
    from a later process that reuses the pid; elsewhere only whether one is alive."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process
        pass
    return "alive"


def running_elsewhere(record: dict) -> bool:
    """Whether another live process on this machine runs the run of this record now (the CLI in a terminal, say)."""
    pid = record.get("pid")
    return (record["status"] == "running" and record.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid > 0 and pid != os.getpid() and record.get("process") is not None
            and process_identity(pid) == record["process"])


def check_not_running_elsewhere(out: str | Path) -> None:
    """ConfigError while another process on this machine runs the run in out: it is neither resumed, replaced nor
    deleted under that process."""
    record = read_record(out)
    if record is not None and running_elsewhere(record):
        raise ConfigError(f"{Path(out).name} is being run by another process (pid {record['pid']}); wait for it to end "
                          "or stop it (Ctrl-C in its terminal)")


def with_absolute_paths(config: Config) -> dict:
    """config.to_dict() with its files and folders (data, eval_data, out, metrics_json, a local model) as absolute
    paths: a run started in one folder (the CLI in a terminal) resumes from another (the app)."""
    settings = config.to_dict()
    for key in ("data", "eval_data", "out", "metrics_json", "model"):  # a model: a local folder, not 'demo' or hub id
        if settings[key] and (key != "model" or settings[key] != "demo" and Path(settings[key]).expanduser().exists()):
            settings[key] = str(Path(settings[key]).expanduser().absolute())
    return settings


def write_record(config: Config, inputs: dict, status: str, message: str = "") -> None:
    """out/run.json with the run's settings, inputs and status (running, stopped, finished, failed), and the process
    that wrote it (host, pid and process_identity: whether a run said to be running still is, running_elsewhere)."""
    record = {"config": with_absolute_paths(config), "inputs": inputs, "status": status, "message": message,
              "updated": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
              "process": process_identity(os.getpid())}
    atomic_write(Path(config.out) / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def read_record(out: str | Path) -> Optional[dict]:
    """The run's record, or None where there is none (or it does not parse)."""
    try:
        record = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"config", "status"} <= set(record) else None
