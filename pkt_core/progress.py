"""Progress of long work: a bar on a terminal, plain lines everywhere else.

Off a terminal (a Prefect worker, CI, output piped to a file) a tqdm bar is either hidden or a
smear of carriage returns, and a 10-minute sensitivity pass looks hung. There a line is printed
after the first step, then at most every `every` seconds, and at the end; inside a Prefect flow (log_prints) each line is a
record in the run's log.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from . import stop

T = TypeVar("T")
EVERY = 30.0  # seconds between progress lines off a terminal


def on_terminal() -> bool:
    return sys.stderr.isatty()


# what turns off the libraries' own bars (tqdm, huggingface_hub and transformers, datasets); each
# library reads its variable once, at import, so this runs before they are imported
LIBRARY_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def library_bars_off_terminal() -> None:
    """Off a terminal, no library draws a bar (in a log file each is a smear of carriage returns);
    pkt's own progress still prints its timed lines. A variable the user set is left alone."""
    if not on_terminal():
        for name, value in LIBRARY_BARS_OFF.items():
            os.environ.setdefault(name, value)


class Progress:
    """tqdm-like counter: `update(n)`, `set_postfix(...)`, `close()`; a bar on a terminal, timed lines elsewhere."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, every: float = EVERY):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.t0 = 0, time.monotonic()
        self._last = self.t0
        self.postfix = ""
        self.bar = None
        self.lines = enabled and not on_terminal()
        if enabled and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        stop.check()  # every long loop reports progress: there it also honours Ctrl-C and SIGTERM
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and (self.done == n or time.monotonic() - self._last >= self.every):
            self._line()  # the first step gives an early estimate of the time left

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.done:
            self._line()
        self.lines = False  # one final line, even if closed twice

    def _line(self) -> None:
        now = time.monotonic()
        self._last, elapsed = now, now - self.t0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and 0 < self.done < self.total:
            eta = f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.done}{of} {self.unit}s{extra}, {elapsed:.0f} s{eta}", flush=True)


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None, enabled: bool = True,
          every: float = EVERY) -> Iterator[T]:
    """Iterate over items, reporting progress (see Progress)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    p = Progress(total, desc, unit, enabled, every)
    try:
        for item in items:
            stop.check()  # before each step too: a stop during the first one needs no second
            yield item
            p.update()
    finally:
        p.close()
