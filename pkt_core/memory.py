"""Peak resident memory of a piece of work, sampled while it runs.

ru_maxrss is the process's all-time peak: after one large node it hides every later one, and a
thread cannot reset it. So a thread samples the process's resident set (psutil) every few
milliseconds while the work runs and keeps the largest value. What that measures, honestly:
- the whole process (interpreter, torch, Prefect, every model still referenced), not the node
  alone: `start` is the resident set when the work began, `peak - start` what it added;
- memory freed by earlier work but kept by the allocator counts at `start` and can be reused by
  the node unseen, so `peak - start` is a lower bound of what the node needed on its own;
- a spike shorter than the interval can be missed (interval 10 ms by default);
- other threads of the process (a second node in a thread runner) are counted too: with one
  thread worker (pkt's default) nodes run one at a time; process and Dask workers measure
  their own process.
"""
from __future__ import annotations

import threading

import psutil


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """`with PeakRSS() as m: work()`; then m.start and m.peak (bytes)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="pkt-peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def as_record(self) -> dict:
        return {"peak_rss_bytes": self.peak, "start_rss_bytes": self.start}
