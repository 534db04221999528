"""A sweep's plan before it starts: the nodes it will submit, those the store holds apart.

The flow's own submission code runs on a Planner, a Graph that hands nothing to a task runner and
records nothing in Prefect: every key is derived as the flow derives it (upstream keys and the
sources' digests, tasks/node.py: identities; a model's digest is memoized in the store, so the flow
does not hash it again) and looked up in the store. A node the store lacks is pending: its key is
known, its result is not. Where a grid's choice waits for val scores still to compute, the test runs
are planned at the grid's first setting and every node from there on counts as to compute (an upper
bound: the chosen setting is not known before those scores are).
"""
from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

from prefect.states import Completed

from pkt.artifacts.store import Store

from .graph import Answered, Graph, NotComputed


class Pending(Answered):
    """A planned node the store lacks: its key is known, its result is not."""

    def result(self, *args, **kwargs):
        raise NotComputed


@dataclass
class Plan:
    compute: dict[str, int]  # kind -> nodes to compute
    reused: dict[str, int]  # kind -> nodes the store holds
    choice_pending: bool  # a grid's choice waits for val scores to compute: `compute` is an upper bound


@dataclass
class Planner(Graph):
    runner: object = None
    unsure: bool = False  # from here on a held node may not be the one the flow submits
    _unsure: set[str] = field(default_factory=set)

    def _compute(self, spec, inputs, label, recompute):
        return Pending(uuid.uuid4(), Completed())

    def _answered(self, task_, label, state, edges):
        return Answered(uuid.uuid4(), state)  # no task run: a plan records nothing

    def submit(self, spec, inputs, label):
        new = len(self.futures)
        future = super().submit(spec, inputs, label)
        if self.unsure and len(self.futures) > new:
            self._unsure.add(next(reversed(self.futures)))
        return future

    def unchosen(self) -> dict:
        """The flow's choice of settings, unknown while val scores are to compute: the grid's first."""
        self.unsure = True
        return {}

    def plan(self) -> Plan:
        compute, reused = Counter(), Counter()
        for identity, future in self.futures.items():
            todo = isinstance(future, Pending) or identity in self._unsure
            (compute if todo else reused)[self.kinds[identity]] += 1
        return Plan(dict(compute), dict(reused), self.unsure)


def plan_sweep(cfg) -> Plan:
    """The nodes a sweep (flows/config.py: SweepConfig) submits up to its report, with the kinds the
    store holds apart. No Prefect API, no process: sources are hashed, keys looked up."""
    from .diagnose import submit_diagnostics
    from .sweep import submit_runs

    import pandas as pd

    planner = Planner(Store(cfg.store), None)
    scored = submit_runs(planner, cfg)[0]
    runs = pd.DataFrame([fields for fields, _, _ in scored])
    if not runs.empty:
        submit_diagnostics(planner, cfg, runs)
    return planner.plan()
