"""The DAG a flow builds: node specs submitted as Prefect futures to a task runner.

Each upstream future is handed to its downstream nodes, so Prefect records the true edges and the
task runner (threads, processes, or a Dask cluster) runs independent branches at once. A node
this flow already submitted (one teacher chain feeds many runs) is answered with the same future.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pkt.artifacts.keys import canonical_json
from pkt.artifacts.store import Store
from pkt.core import stop
from pkt.core.cpus import available_cpus
from pkt.tasks.node import Node, node_task
from pkt.tasks.nodes import source

RUNNERS = ("threads", "processes", "dask")


class _StopsOnSignal:
    """A runner whose exit on Ctrl-C or SIGTERM (KeyboardInterrupt, or the TerminationSignal that
    Prefect's own SIGTERM handler raises in the flow) first stops the nodes still running: the
    runner's exit waits for them, and in a worker thread no signal ever arrives."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not issubclass(exc_type, Exception):
            stop.request(f"stopped ({exc_type.__name__})")
            self._stop_workers()
        return super().__exit__(exc_type, exc, tb)

    def _stop_workers(self) -> None:
        """Threads see the stop flag; nothing else to do."""


class StoppableThreads(_StopsOnSignal, ThreadPoolTaskRunner):
    pass


class StoppableProcesses(_StopsOnSignal, ProcessPoolTaskRunner):
    def _stop_workers(self) -> None:
        """Pool processes never see this process's flag (nor a signal sent to it alone): end them. A
        node killed mid-write leaves only its temp area, which gc reaps; its lock dies with it."""
        executor = getattr(self, "_executor", None)
        for process in list(getattr(executor, "_processes", {}).values()):  # concurrent.futures' own table
            process.terminate()


def task_runner(kind: str = "threads", workers: int = 1, address: str | None = None) -> TaskRunner:
    """threads: in this process (one worker keeps torch's global RNG to one branch at a time, so
    results are reproducible bit for bit); processes: a local process pool; dask: prefect-dask's
    DaskTaskRunner on the scheduler at `address`, or on a LocalCluster of `workers` processes (its
    exit closes the cluster, which ends the worker processes and the nodes they run)."""
    if kind == "threads":
        return StoppableThreads(max_workers=workers)
    if kind == "processes":
        return StoppableProcesses(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError("runner dask needs prefect-dask: pip install 'pkt[dask]'") from None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise ValueError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")


def torch_threads_per_worker(kind: str, workers: int) -> int | None:
    """Torch threads each worker uses: the CPUs pkt may use (pkt_core/cpus.py) shared among the workers,
    so N workers on N cores do not oversubscribe them (None: one worker and the user's OMP_NUM_THREADS)."""
    if kind == "threads" and workers == 1 and os.environ.get("OMP_NUM_THREADS"):
        return None  # the user's choice, which torch follows
    return max(1, available_cpus() // workers)  # affinity and cgroup quota: torch's default counts every core


@functools.lru_cache(maxsize=None)
def source_task(kind: str):
    """The source task under the source kind's own task name (model, file, dir)."""
    kind_task = source.with_options(name=kind)
    kind_task.task_key = f"pkt-source-{kind}"
    return kind_task


def source_name(path: str) -> str:
    """A short, telling name for a file or model: 'gsm/seeds.jsonl', 'teacher'."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.suffix else (p.name or str(path))


@dataclass
class Graph:
    store: Store
    runner: TaskRunner
    torch_threads: int | None = None
    futures: dict[str, PrefectFuture] = field(default_factory=dict)  # node identity -> its future
    kinds: dict[str, str] = field(default_factory=dict)  # node identity -> kind
    sources: dict[str, PrefectFuture] = field(default_factory=dict)
    _identity_of: dict[int, str] = field(default_factory=dict)  # id(future) -> node or source identity
    _labels: set[str] = field(default_factory=set)
    upstream: dict[str, list[str]] = field(default_factory=dict)  # node identity -> its input nodes' identities
    origins: dict[Path, PrefectFuture] = field(default_factory=dict)  # folder -> the node that made it

    def provides(self, folder: str | Path, future: PrefectFuture) -> None:
        """Sources read from inside folder (a family's teacher, student and task files) were taken
        from the node of `future`: the graph draws that edge."""
        self.origins[Path(folder).resolve()] = future

    def _origin(self, path: str) -> list[PrefectFuture]:
        p = Path(path).resolve()
        return [f for folder, f in self.origins.items() if p == folder or folder in p.parents]

    def source(self, kind: str, path: str, names: list[str] | None = None) -> PrefectFuture:
        """The future of an input that is not a node: a model ("model"), a data file ("file") or the
        named files of a task directory ("dir")."""
        identity = canonical_json({"source": kind, "path": str(path), "names": names})
        if identity not in self.sources:
            label = f"{kind}[{source_name(path)}" + (f": {', '.join(names)}]" if names else "]")
            future = self.runner.submit(source_task(kind), parameters={
                "kind": kind, "path": str(path), "store_root": str(self.store.root), "label": self._unique(label),
                "names": names}, wait_for=self._origin(path) or None)
            self.sources[identity] = future
            self._identity_of[id(future)] = identity
        return self.sources[identity]

    def submit(self, spec: Node, inputs: dict, label: str) -> PrefectFuture:
        """The future of spec's ref, submitting it once per (spec, upstream nodes/sources)."""
        identity = canonical_json({"spec": spec.identity(), "inputs": self._input_identity(inputs)})
        if identity not in self.futures:
            future = self.runner.submit(node_task(spec.KIND), parameters={
                "spec": spec, "inputs": inputs, "store_root": str(self.store.root),
                "label": self._unique(f"{spec.KIND}[{label}]"), "torch_threads": self.torch_threads})
            self.futures[identity], self.kinds[identity] = future, spec.KIND
            self._identity_of[id(future)] = identity
            self.upstream[identity] = self._input_nodes(inputs)
        return self.futures[identity]

    def _input_nodes(self, inputs) -> list[str]:
        if isinstance(inputs, PrefectFuture):
            identity = self._identity_of[id(inputs)]
            return [identity] if identity in self.futures else []  # a source is not a node
        if isinstance(inputs, list):
            return [i for x in inputs for i in self._input_nodes(x)]
        if isinstance(inputs, dict) and "digest" not in inputs:
            return [i for x in inputs.values() for i in self._input_nodes(x)]
        return []

    def lineage(self, future: PrefectFuture) -> list[PrefectFuture]:
        """The node of `future` and every node upstream of it (what it took to make it)."""
        seen, todo = set(), [self._identity_of[id(future)]]
        while todo:
            identity = todo.pop()
            if identity not in seen:
                seen.add(identity)
                todo += self.upstream.get(identity, [])
        return [self.futures[i] for i in seen]

    def _input_identity(self, inputs):
        if isinstance(inputs, PrefectFuture):
            return self._identity_of[id(inputs)]
        if isinstance(inputs, list):
            return [self._input_identity(x) for x in inputs]
        if isinstance(inputs, dict) and "digest" in inputs:  # a source
            return inputs["digest"]
        return {name: self._input_identity(x) for name, x in sorted(inputs.items())}

    def _unique(self, label: str) -> str:
        """Run names a person can tell apart: a second node with the same description gets a number."""
        name, n = label, 1
        while name in self._labels:
            n += 1
            name = f"{label} #{n}"
        self._labels.add(name)
        return name

    def results(self) -> list[dict]:
        """Every node's ref and status, once all have finished; the first failure is raised."""
        wait(list(self.futures.values()))
        return [f.result() for f in self.futures.values()]

    def computed(self) -> int:
        return sum(r["status"] == "computed" for r in self.results())
