"""An overwritten run's files, set aside until the run replacing it has its first checkpoint.

A run started with overwrite in a folder whose run saved work (a checkpoint, metrics or an adapter) moves that run's
files (checkpoint.run_files, its record too) into out/.replaced-run/. If the new run ends before its first checkpoint
(an error, a stop, Ctrl-C), they go back over its record; once it has one, they are deleted. Each step survives a
kill at any point, because a folder's name says how far it got:
  set_aside  move the files into .replaced-run.partial/, then rename that .replaced-run (complete)
  put_back   rename .replaced-run to .replaced-run.partial, then move every file in it back
  drop       rename .replaced-run to .replaced-run.dropped, then delete it
and settle, before the next run in the folder decides anything, finishes what a killed process left: a .partial
folder's files go back (nothing of the old run was deleted), a complete one goes back unless out holds a checkpoint
(which only the new run can have written: then it is dropped), a .dropped one is deleted. Rank 0's work, of several
processes (distributed.is_writer).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .checkpoint import RECORD, checkpoint_path, read_record, run_files, running_elsewhere
from .distributed import is_writer
from .errors import RunError

log = logging.getLogger("frugal_loraga")
COMPLETE, PARTIAL, DROPPED = ".replaced-run", ".replaced-run.partial", ".replaced-run.dropped"


def set_aside(out: str | Path) -> bool:
    """Move the run files in out into out/.replaced-run/ where its run saved work; whether it did. A run that saved
    nothing (only its record: stopped or failed before training) is not kept: the new record replaces it."""
    out = Path(out)
    held = [path for path in run_files(out) if path.exists()]
    if not is_writer() or held in ([], [out / RECORD]):
        return False
    for path in held:
        target = out / PARTIAL / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    os.replace(out / PARTIAL, out / COMPLETE)
    return True


def put_back(out: str | Path) -> None:
    """Move the set-aside files back into out, over what the run replacing them wrote (its record). A failure is
    logged, not raised: the error that ended the run is the one to report, and settle finishes the move later."""
    out = Path(out)
    try:
        _move_back(out)
    except OSError as e:
        log.warning("could not put back the run set aside in %s (%s): the next run started in %s does", out / PARTIAL,
                    e, out)


def _move_back(out: Path) -> None:
    """A complete .replaced-run renamed .replaced-run.partial, then every file in that to its place in out, and the
    emptied folder removed."""
    if (out / COMPLETE).is_dir():
        os.replace(out / COMPLETE, out / PARTIAL)
    partial = out / PARTIAL
    for kept in sorted(p for p in partial.rglob("*") if p.is_file()):
        target = out / kept.relative_to(partial)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, target)
    shutil.rmtree(partial)


def drop(out: str | Path) -> None:
    """Delete the set-aside files: the run replacing them has written its first checkpoint."""
    out = Path(out)
    os.replace(out / COMPLETE, out / DROPPED)
    _delete_dropped(out)


def _delete_dropped(out: Path) -> None:
    try:
        shutil.rmtree(out / DROPPED)
    except OSError as e:  # the run goes on; settle tries again at the next run in the folder
        log.warning("could not delete %s, the files of the run this one replaced (%s); delete it by hand",
                    out / DROPPED, e)


def settle(out: str | Path) -> None:
    """Finish what a process killed while setting aside, putting back or dropping left in out (module docstring),
    unless a live process on this machine still runs there."""
    out = Path(out)
    record = read_record(out)
    if not is_writer() or (record is not None and running_elsewhere(record)):
        return
    try:
        if (out / DROPPED).is_dir():
            _delete_dropped(out)
        if (out / COMPLETE).is_dir() and checkpoint_path(out).exists():
            drop(out)
        elif (out / COMPLETE).is_dir() or (out / PARTIAL).is_dir():
            _move_back(out)
    except OSError as e:
        raise RunError(f"{out} holds the files of a run that an unfinished overwrite set aside, and they could not be "
                       f"moved back ({e}); make the folder writable and run again") from e
