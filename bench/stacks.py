"""Where one thread's wall time goes: a sampling profiler for the benchmarks.

Every `interval` seconds a helper thread reads the profiled thread's Python stack (sys._current_frames) and counts
each function on it once (inclusive time) and the innermost one (self time), each sample weighted by the time since
the last one (a thread that holds the GIL delays the sampler). Unlike cProfile it adds almost nothing to the profiled
code's own time, and it counts time spent waiting: on the GPU, on locks, on compile workers, in imports.
"""
import collections
import sys
import threading
import time
from pathlib import Path


def _name(code) -> str:
    """file:line:function, the file by its last three path parts."""
    return f"{'/'.join(Path(code.co_filename).parts[-3:])}:{code.co_firstlineno}:{code.co_name}"


class StackSampler:
    """with StackSampler() as sampler: ...; sampler.report() -> the functions with the most seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.thread_id = threading.get_ident()
        self.inclusive: collections.Counter = collections.Counter()
        self.innermost: collections.Counter = collections.Counter()
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._done.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            now = time.perf_counter()
            weight, last = now - last, now  # since the last sample: longer while the profiled thread held the GIL
            if frame is None:
                continue
            self.samples += 1
            self.innermost[_name(frame.f_code)] += weight
            seen = set()
            while frame is not None:
                seen.add(_name(frame.f_code))
                frame = frame.f_back
            for name in seen:
                self.inclusive[name] += weight

    def __enter__(self) -> "StackSampler":
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.start

    def report(self, count: int = 60) -> dict:
        return {"seconds": self.seconds, "samples": self.samples,
                "inclusive_seconds": [[n, round(t, 3)] for n, t in self.inclusive.most_common(count)],
                "self_seconds": [[n, round(t, 3)] for n, t in self.innermost.most_common(count // 2)]}
