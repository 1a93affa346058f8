"""The app's jobs (frugal_loraga/jobs.py) with finetune and the Try model stood in for: one job at a time however
many launches race, the Try model released before a job starts, no Try or delete while a job runs, and how a job's
end reads on the page."""
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from frugal_loraga import Config, DataError, FinetuneResult, jobs

CONFIGS = [Config(data="d.jsonl", init="lora_ga", steps=2, out="runs/x"),
           Config(data="d.jsonl", init="lora", steps=2, out="runs/x-lora")]
METRICS = {"train_loss": [[1, 2.5]], "eval_loss": [[1, 2.75]], "train_seconds": 3.0, "tokens_per_second": 100.0,
           "peak_memory_gib": 0.5}


class Engine:
    """finetune's stand-in: each run reports a training step, waits until `go` is set or it is stopped, then returns
    (stopped, when it was) or raises `error`. `calls` records the runs and the Try model's releases, in order."""

    def __init__(self, calls: list):
        self.calls, self.go, self.error, self.saved = calls, threading.Event(), None, True

    def __call__(self, config, progress, stop):
        self.calls.append(config.init)
        progress("training", 1, 2, {"train_loss": METRICS["train_loss"]})
        while not (self.go.wait(0.01) or stop.is_set()):
            pass
        if self.error:
            raise self.error
        return FinetuneResult(adapter_dir=Path(config.out) / "adapter" if self.saved else None, metrics=METRICS,
                              stopped=stop.is_set())


class TryModel:
    """The Try generator's stand-in: records loads and releases; a load raises `error` when one is set."""

    def __init__(self, calls: list):
        self.calls, self.error = calls, None

    def load(self, config, adapter_dir):
        self.calls.append("load")
        if self.error:
            raise self.error

    def generate(self, prompt, max_new_tokens):
        return {"base": prompt, "adapter": prompt}

    def release(self):
        self.calls.append("release")


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def engine(calls, monkeypatch) -> Engine:
    engine = Engine(calls)
    monkeypatch.setattr(jobs, "finetune", engine)
    return engine


@pytest.fixture
def tried(tmp_path) -> Path:
    """A finished run's folder, as the Try reads it."""
    record = {"config": {"data": "d.jsonl", "init": "lora"}, "status": "finished"}
    (tmp_path / "run.json").write_text(json.dumps(record))
    return tmp_path


@pytest.fixture
def runner(calls) -> jobs.Jobs:
    runner = jobs.Jobs()
    runner.generator = TryModel(calls)
    return runner


def finish(runner: jobs.Jobs, engine: Engine) -> str:
    """Let the job's runs end; the status it leaves."""
    engine.go.set()
    runner.job.thread.join(10)
    assert not runner.busy()
    return runner.job.status()


def test_racing_launches_start_one_job_after_releasing_the_try_model(runner, engine, calls):
    barrier = threading.Barrier(8)

    def press(name: str) -> str:
        barrier.wait()  # eight Trains pressed at the same moment
        return runner.launch([dataclasses.replace(c, out=c.out.replace("/x", f"/{name}")) for c in CONFIGS])
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(press, [f"run{i}" for i in range(8)]))
    started = [a for a in answers if a.startswith("Started ")]
    assert len(started) == 1 and answers.count("A run is already in progress: wait for it or press Stop.") == 7
    assert started[0] == f"Started {runner.job.run}." and runner.job.runs == [runner.job.run, f"{runner.job.run}-lora"]
    assert finish(runner, engine) == ("**idle** Finished.\n\n"
                                      "- **lora_ga**: train loss 2.5000, eval loss 2.7500; init 0 s, training 3 s "
                                      f"(100 tokens/s), peak 0.50 GiB; adapter in `runs/{runner.job.run}/adapter`\n"
                                      "- **lora**: train loss 2.5000, eval loss 2.7500; init 0 s, training 3 s "
                                      f"(100 tokens/s), peak 0.50 GiB; adapter in `runs/{runner.job.run}-lora/adapter`")
    assert calls == ["release", "lora_ga", "lora"]  # the Try model is released before the job's first run
    assert runner.launch(CONFIGS) == "Started x."  # a finished job makes room for the next


def test_no_try_or_delete_while_a_job_runs_and_no_job_starts_during_one(runner, engine, calls, tried):
    """No Try while a job runs, nor a delete of the job's runs (other runs' folders may go)."""
    runner.launch(CONFIGS)
    with runner.idle() as idle:
        assert not idle
    for run, free in (("x", False), ("x-lora", False), ("other", True)):  # a delete of a run the job does not run
        with runner.idle(run) as idle:
            assert idle == free, run
    assert runner.generate(tried, "hi", 4) is None and "load" not in calls
    finish(runner, engine)
    assert runner.generate(tried, "hi", 4) == {"base": "hi", "adapter": "hi"} and calls[-1] == "load"
    answers = []
    with runner.idle() as idle:  # a launch waits for the block, as a Try's model load or a delete does
        assert idle
        waiting = threading.Thread(target=lambda: answers.append(runner.launch(CONFIGS)))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and not runner.busy()
    waiting.join(10)
    assert answers == ["Started x."]
    finish(runner, engine)


def test_a_try_that_fails_to_load_releases_the_model(runner, calls, tried):
    runner.generator.error = DataError("the run's data file is gone")
    with pytest.raises(DataError, match="data file is gone"):
        runner.generate(tried, "hi", 4)
    assert calls == ["load", "release"]


def test_stop_ends_the_job_with_what_was_kept(runner, engine, calls):
    assert runner.stop() == "Nothing is running."
    runner.launch(CONFIGS)
    while runner.job.phase != "lora_ga: training":
        runner.job.thread.join(0.01)
    assert runner.job.live_metrics() == {"x": {"train_loss": METRICS["train_loss"]}}  # the Runs list's, while running
    assert runner.stop() == ""  # the status says it
    assert runner.job.status().endswith("Stop requested: the run ends after the current step, batch or layer.")
    runner.job.thread.join(10)
    assert runner.job.status() == "**idle** Stopped x; a checkpoint was saved. Select x under Runs and press Resume to " \
                                  "continue."
    assert calls == ["release", "lora_ga"]  # the baseline never started
    assert runner.job.loss_points() == [(1, 2.5, "lora_ga train"), (1, 2.75, "lora_ga eval")]
    assert runner.job.live_metrics() == {}  # ended: the runs' own metrics.json
    engine.saved = False
    runner.launch(CONFIGS)
    runner.stop()
    runner.job.thread.join(10)
    assert runner.job.message == ("Stopped x before training began; nothing was saved. Select x under Runs and "
                                  "press Resume to start it over.")


def test_a_stop_during_the_baseline_names_the_baseline_and_a_delete_forgets_the_job(runner, engine, monkeypatch):
    """The run stopped is the one to resume; once a run of the last job is deleted, its status and curves go."""
    finished = FinetuneResult(adapter_dir=Path("runs/x/adapter"), metrics=METRICS, stopped=False)
    monkeypatch.setattr(jobs, "finetune", lambda config, progress, stop: finished if config.init == "lora_ga" else
                        engine(config, progress, stop))  # the LoRA-GA run done, the baseline running
    runner.launch(CONFIGS)
    while runner.job.phase != "lora: training":
        runner.job.thread.join(0.01)
    runner.stop()
    runner.job.thread.join(10)
    assert runner.job.message == "Stopped x-lora; a checkpoint was saved. Select x-lora under Runs and press Resume " \
                                 "to continue."
    runner.forget("other")
    assert runner.job.message and runner.job.loss_points()
    runner.forget("x-lora")
    assert runner.job.status() == "**idle**" and runner.job.loss_points() == []


def test_an_error_ends_the_job_and_reaches_the_page(runner, engine, calls):
    engine.error = DataError("line 2: malformed JSON")
    runner.launch(CONFIGS)
    assert finish(runner, engine) == "**idle** **Error:** line 2: malformed JSON"
    assert calls == ["release", "lora_ga"]
