"""A stop request that long loops honour.

Nodes run in worker threads (Prefect's task runner), where Ctrl-C's KeyboardInterrupt never
arrives: it is raised in the main thread only, which then waits for the workers to finish. So the
pkt CLI's signal handler calls `request()`, and every long loop (sensitivity samples, extraction
pieces, SVDs, training and pretraining steps, evaluation batches: through pkt_core.progress and a
model forward hook) calls `check()`, which raises `Stopped` within one step. A stopped node
records nothing; the next run computes it again.

The same check enforces a per-node time limit: `deadline(seconds)` makes check() in this thread
raise `TimedOut` once the limit has passed, so a node that runs too long stops the way a stopped
one does (within one step, nothing recorded), in whatever thread or process it runs.

A process pool's workers have flags of their own, which a signal sent to pkt alone never reaches:
`ProcessFlag` carries this process's stop request into them (`follow()` in each worker).
"""
from __future__ import annotations

import contextlib
import threading
import time

_REQUESTED = threading.Event()
_REASON = ["stop requested"]


class Stopped(BaseException):
    """Raised in a long loop once a stop was requested. A BaseException, like KeyboardInterrupt, so
    that no library's `except Exception` swallows it and carries on."""


class TimedOut(Stopped):
    """Raised by check() once the deadline set by `deadline()` in this thread has passed."""

    def __init__(self, seconds: float):
        super().__init__(seconds)  # args stay (seconds,): the exception pickles
        self.seconds = seconds

    def __str__(self) -> str:
        return f"ran past its time limit of {self.seconds:g} s"


_DEADLINE = threading.local()  # .at: time.monotonic() past which check() raises; .seconds: the limit


def request(reason: str = "stop requested") -> None:
    _REASON[0] = reason
    _REQUESTED.set()


def requested() -> bool:
    return _REQUESTED.is_set()


def reason() -> str:
    """Why the stop was requested ("stopped by SIGINT"): what a stopped node's Cancelled state says."""
    return _REASON[0]


def clear() -> None:
    _REQUESTED.clear()


def check() -> None:
    """Raise Stopped if a stop was requested (cheap: call it once per step)."""
    if _REQUESTED.is_set():
        raise Stopped(_REASON[0])
    at = getattr(_DEADLINE, "at", None)
    if at is not None and time.monotonic() > at:
        raise TimedOut(_DEADLINE.seconds)


@contextlib.contextmanager
def deadline(seconds: float | None):
    """check() in this thread raises TimedOut once `seconds` (wall clock) have passed (None: no limit)."""
    if seconds is None:
        yield
        return
    previous = getattr(_DEADLINE, "at", None), getattr(_DEADLINE, "seconds", None)
    _DEADLINE.at, _DEADLINE.seconds = time.monotonic() + seconds, seconds
    try:
        yield
    finally:
        _DEADLINE.at, _DEADLINE.seconds = previous


class ProcessFlag:
    """A stop request shared with child processes (a process pool's workers, spawned with this object
    among their start-up arguments): `set(reason)` here requests the stop in every child that called
    `follow()`, so the nodes they run stop within a step, as threads' nodes do, instead of being killed."""

    def __init__(self, context):
        self._set = context.Event()
        self._reason = context.Array("c", 256)  # shared bytes: the reason the children's nodes report

    def set(self, why: str) -> None:
        self._reason.value = why.encode()[:255]
        self._set.set()

    def follow(self) -> None:
        """In a child: a daemon thread requests this process's stop once the parent sets the flag."""
        def relay():
            self._set.wait()
            request(self._reason.value.decode(errors="replace"))

        threading.Thread(target=relay, name="pkt-stop-relay", daemon=True).start()


@contextlib.contextmanager
def on_every_forward(model):
    """Check for a stop before each forward call of model: the hook for loops pkt does not own
    (lm-eval's batches, generate's tokens)."""
    handle = model.register_forward_pre_hook(lambda module, args: check())
    try:
        yield model
    finally:
        handle.remove()
