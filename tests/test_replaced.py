"""An overwritten run's files set aside, put back and dropped (frugal_loraga/replaced.py), with a kill at each point
simulated by the folders a killed process leaves: settle always ends with the old run whole, or with the new run's
first checkpoint and nothing of the old."""
import pytest

from frugal_loraga import replaced
from frugal_loraga.checkpoint import RECORD, checkpoint_path, run_files

OLD = {"run.json": "old record", "checkpoint/state.pt": "old checkpoint", "metrics.json": "old metrics",
       "adapter/adapter_model.safetensors": "old adapter", "notes.txt": "the user's"}


def folder(out, files: dict) -> None:
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def contents(out) -> dict:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def test_set_aside_then_put_back_leaves_the_old_run_as_it_was(tmp_path):
    folder(tmp_path, OLD)
    assert replaced.set_aside(tmp_path)
    assert contents(tmp_path) == {f"{replaced.COMPLETE}/{k}": v for k, v in OLD.items() if k != "notes.txt"} | \
        {"notes.txt": "the user's"}
    (tmp_path / RECORD).write_text("new record")
    replaced.put_back(tmp_path)
    assert contents(tmp_path) == OLD


def test_a_run_that_saved_nothing_is_not_set_aside(tmp_path):
    folder(tmp_path, {"run.json": "stopped before training"})
    assert not replaced.set_aside(tmp_path) and (tmp_path / RECORD).exists()


@pytest.mark.parametrize("moved", [1, 3])
def test_settle_after_a_kill_while_setting_aside_or_putting_back(tmp_path, moved):
    """Some files in .partial, the rest still (or already back) in out: all go back, none is deleted."""
    folder(tmp_path, OLD)
    for path in [p for p in run_files(tmp_path) if p.exists()][:moved]:
        target = tmp_path / replaced.PARTIAL / path.relative_to(tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    replaced.settle(tmp_path)
    assert contents(tmp_path) == OLD


def test_settle_after_a_kill_before_the_first_checkpoint_puts_the_old_run_back(tmp_path):
    folder(tmp_path, OLD)
    replaced.set_aside(tmp_path)
    (tmp_path / RECORD).write_text("the killed run's record")
    replaced.settle(tmp_path)
    assert contents(tmp_path) == OLD


def test_settle_after_a_kill_after_the_first_checkpoint_keeps_the_new_run(tmp_path):
    folder(tmp_path, OLD)
    replaced.set_aside(tmp_path)
    folder(tmp_path, {"run.json": "new record", "checkpoint/state.pt": "new checkpoint"})
    replaced.settle(tmp_path)
    assert contents(tmp_path) == {"checkpoint/state.pt": "new checkpoint", "notes.txt": "the user's",
                                  "run.json": "new record"}
    folder(tmp_path, {f"{replaced.DROPPED}/metrics.json": "left by a kill while deleting"})
    replaced.settle(tmp_path)
    assert not (tmp_path / replaced.DROPPED).exists() and checkpoint_path(tmp_path).read_text() == "new checkpoint"
