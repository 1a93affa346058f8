"""The app's background job and its Try model: one job at a time, run in a thread, never beside a Try.

Jobs holds one lock: a job is checked for and started under it, so two Trains at the same moment start one job; a job
first releases the Try model, so that the run finds the card free; a Try loads its model only under it while no job
runs, and the app deletes a run only while no job runs that run (Jobs.idle). What a job writes (phase, curves, the
closing message) is what the page shows, word for word.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .api import FinetuneResult, finetune
from .checkpoint import adapter_for
from .config import Config
from .errors import ConfigError, DataError, OutOfMemory, RunError
from .eta import JobClock, format_seconds
from .generate import Completion, Generator
from .progress import Metrics
from .runs import run_config

log = logging.getLogger("frugal_loraga.app")
BUSY = "A run is already in progress: wait for it or press Stop."


def summary(label: str, result: FinetuneResult) -> str:
    """One finished run in a line: final losses, time, speed, peak memory and where its adapter is."""
    m = result.metrics
    losses = ", ".join(f"{split} loss {m[key][-1][1]:.4f}" for split, key in (("train", "train_loss"),
                                                                                ("eval", "eval_loss")) if m.get(key))
    return (f"- **{label}**: {losses}; init {m.get('init_seconds', 0):.0f} s, training {m['train_seconds']:.0f} s "
            f"({m['tokens_per_second']:.0f} tokens/s), peak {m['peak_memory_gib']:.2f} GiB; adapter in "
            f"`{result.adapter_dir}`")


def gpu_memory() -> str:
    """What the card holds now: this process's reserved memory of the card's total."""
    if not torch.cuda.is_available():
        return ""
    total = torch.cuda.get_device_properties(0).total_memory
    return f" GPU memory {torch.cuda.memory_reserved() / 2**30:.1f} of {total / 2**30:.1f} GiB."


@dataclass
class Job:
    """One background job: its thread, stop switch, phase and live metrics of each curve."""
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    phase: str = "idle"
    done: int = 0
    total: int = 0
    clock: JobClock | None = None  # the whole job's time left
    curves: dict[str, Metrics] = field(default_factory=dict)  # by run label (its init)
    message: str = ""
    configs: list[Config] = field(default_factory=list)  # its runs' settings, in order (the main run's first)

    @property
    def runs(self) -> list[str]:
        """The names of its runs (their folders'): the main run's, then its baseline's."""
        return [Path(config.out).name for config in self.configs]

    @property
    def run(self) -> str:
        """The name of its main run ("" for no job)."""
        return self.runs[0] if self.configs else ""

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def work(self) -> None:
        """Run the configs one after another (the thread's target); an error or a stop ends the job early. The
        message says how it ended."""
        summaries = []
        for index, config in enumerate(self.configs):
            label, run = config.init, self.runs[index]

            def progress(phase: str, done: int, total: int, metrics: Metrics, label: str = label,
                         index: int = index) -> None:
                self.clock.update(index, phase, done, total)
                self.phase, self.done, self.total = f"{label}: {phase}", done, total
                if metrics:
                    self.curves[label] = metrics
            try:
                result = finetune(config, progress=progress, stop=self.stop)
            except (ConfigError, DataError, OutOfMemory, RunError) as e:
                self.message = f"**Error:** {e}"
                break
            except Exception as e:  # not foreseen: the page says so, the server log has the traceback
                log.exception("the %s run failed", label)
                self.message = f"**Error:** the {label} run failed unexpectedly ({type(e).__name__}: {e}); see the log"
                break
            self.curves[label] = result.metrics
            if result.stopped:
                self.message = (f"Stopped {run}; a checkpoint was saved. Select {run} under Runs and press Resume "
                                "to continue." if result.adapter_dir else
                                f"Stopped {run} before training began; nothing was saved. Select {run} under Runs and "
                                "press Resume to start it over.")
                break
            summaries.append(summary(label, result))
        else:
            self.message = "Finished.\n\n" + "\n".join(summaries)
        self.phase = "idle"

    def status(self) -> str:
        """Phase i/n, the whole job's time left and the GPU memory held while it runs, and its message."""
        text = f"**{self.phase}**"
        if self.busy():
            text += f" {self.done}/{self.total}" if self.total else ""
            left = self.clock.seconds_left() if self.clock else None
            if left is None:
                text += "."
            else:  # past the predicted end (a slow last step, the adapter's export): no "0 s left" for a minute
                text += f", about {format_seconds(left)} left for the whole job." if left >= 1 else \
                    ", taking longer than estimated."
            text += gpu_memory()
            if self.stop.is_set():
                text += " Stop requested: the run ends after the current step, batch or layer."
        return text + (f" {self.message}" if self.message else "")

    def live_metrics(self) -> dict[str, Metrics]:
        """The metrics so far of each of its runs that has begun, by run name, while it runs."""
        if not self.busy():
            return {}
        return {run: self.curves[config.init] for config, run in zip(self.configs, self.runs)
                if config.init in self.curves}

    def loss_points(self) -> list[tuple[int, float, str]]:
        """Every loss so far as (step, loss, curve), the curve named '<label> <split>' ('lora_ga train')."""
        return [(step, loss, f"{label} {split}") for label, metrics in self.curves.items()
                for split in ("train", "eval") for step, loss in metrics.get(f"{split}_loss", [])]


class Jobs:
    """The app's one job at a time (job: the current or last one) and the Try generator, which never holds a model
    while a job runs."""

    def __init__(self) -> None:
        self.job = Job()
        self.generator = Generator()  # holds the model of the last Try; released before a job starts
        self._lock = threading.Lock()

    def busy(self) -> bool:
        return self.job.busy()

    @contextmanager
    def idle(self, run: str | None = None) -> Iterator[bool]:
        """Whether no job runs (given a run's name: none that runs it); none starts until the block ends.
        `with jobs.idle() as idle: if idle: ...`"""
        with self._lock:
            yield not self.job.busy() or (run is not None and run not in self.job.runs)

    def launch(self, configs: list[Config]) -> str:
        """Run the configs one after another in the background (a job named by its first run); refused while a job
        runs. The check and the start are one step under the lock, so that two launches at once cannot both pass it."""
        with self.idle() as idle:
            if not idle:
                return BUSY
            try:
                clock = JobClock.for_runs(configs, "cuda" if torch.cuda.is_available() else "cpu")
            except ConfigError as e:  # settings this machine cannot run (Config.resolve), e.g. a run from elsewhere
                return f"**Error:** {e}"
            self.generator.release()  # a Train after a Try gets the whole card
            self.job = Job(phase="starting", clock=clock, configs=configs)
            self.job.thread = threading.Thread(target=self.job.work, daemon=True)
            self.job.thread.start()
        return f"Started {self.job.run}."

    def stop(self) -> str:
        """Ask the running job to end after its current training step, estimation batch or corrected layer (its
        status says so until it has)."""
        if not self.job.busy():
            return "Nothing is running."
        self.job.stop.set()
        return ""

    def forget(self, run: str) -> None:
        """Drop the last job's status and curves if it ran `run` (whose folder the app deletes); within idle()."""
        if run in self.job.runs:
            self.job = Job()

    def generate(self, folder: Path, prompt: str, max_new_tokens: int) -> dict[str, Completion] | None:
        """Greedy completions of the prompt by the base model and by the run in `folder` with its adapter (its model
        kept for the next Try, released if loading or generating fails); None while a job runs."""
        with self.idle() as idle:  # no job starts while the Try model loads, and no Try loads one while a job runs
            if not idle:
                return None
            try:
                config = run_config(folder)
                self.generator.load(config, adapter_for(folder, config.load_in_4bit))
                return self.generator.generate(prompt, max_new_tokens)
            except (ConfigError, DataError, torch.cuda.OutOfMemoryError):
                self.generator.release()
                raise
