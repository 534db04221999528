"""The DAG a flow builds: node specs as Prefect futures, with their edges.

A key chains through its upstream nodes' *keys* and its sources' digests (tasks/node.py:
identities), so every node's key is known as soon as the sources it reads are: the flow reads its
sources itself and looks each node up in the store the moment it is submitted. A node the store
holds is answered right here, recorded as a Cached task run with its true edges (no pool round
trip); only the nodes to compute go to the task runner (threads, processes, or a Dask cluster),
which runs independent branches at once. A node this flow already submitted (one teacher chain
feeds many runs) is answered with the same future.

--recompute (PKT_RECOMPUTE, or Prefect's PREFECT_TASKS_REFRESH_CACHE for all kinds) computes the
nodes of the given kinds, and every node below them, even when the store holds them.

--timeout KIND=SECONDS (PKT_TIMEOUT, or a sweep config's `timeouts`) limits each node of a kind: past
it the node stops within one step, stores nothing, and its task run ends TimedOut (tasks/node.py).
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect.client.schemas.objects import TaskRunResult
from prefect.futures import PrefectConcurrentFuture, PrefectFuture, wait
from prefect.states import Completed, Failed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pkt.artifacts.keys import canonical_json
from pkt.artifacts.store import Store
from pkt.core import stop
from pkt.core.cpus import available_cpus
from pkt.tasks.node import (KIND_MODULES, TIMEOUT_VAR, Node, cached_state, lookup, node_kinds, node_task, opaque,
                            record_run)
from pkt.tasks import sources
from pkt.tasks.sources import source

from . import pool_costs
from .server import MODEL_LOADING, note_flow_run, note_task_run

RUNNERS = ("threads", "processes", "dask")
RECOMPUTE_VAR = "PKT_RECOMPUTE"  # what `--recompute` sets: KIND[,KIND] or all


def recompute_kinds() -> frozenset[str] | None:
    """The kinds to compute even when stored (None: none; an empty set: all), from PKT_RECOMPUTE or,
    for all kinds, Prefect's refresh_cache setting (PREFECT_TASKS_REFRESH_CACHE)."""
    from prefect.settings import get_current_settings

    raw = os.environ.get(RECOMPUTE_VAR, "").strip()
    if raw == "all" or (not raw and get_current_settings().tasks.refresh_cache):
        return frozenset()
    return frozenset(k.strip() for k in raw.split(",") if k.strip()) or None



def recompute_value(value: str, flag: str = "--recompute") -> str:
    """`--recompute`'s value checked: `all`, or node kinds separated by commas."""
    from .config import ConfigError

    kinds = [k.strip() for k in value.split(",") if k.strip()]
    if kinds == ["all"]:
        return "all"
    unknown = [k for k in kinds if k not in node_kinds()]
    if not kinds or unknown:
        raise ConfigError(f"{flag} {value}: {', '.join(unknown) or 'no kind'} is not a node kind; give all, or some of "
                          f"{', '.join(sorted(node_kinds()))} separated by commas")
    return ",".join(kinds)


def timeout_value(value: str, flag: str = "--timeout") -> dict[str, float]:
    """`--timeout`'s value checked: KIND=SECONDS pairs separated by commas -> {kind: seconds}."""
    import math

    from .config import ConfigError

    pairs = [p.strip() for p in value.split(",") if p.strip()]
    fix = (f"give KIND=SECONDS separated by commas (e.g. adapter=600,sensitivity=1800), KIND one of "
           f"{', '.join(sorted(node_kinds()))}")
    out = {}
    for pair in pairs or [""]:
        kind, eq, seconds = (x.strip() for x in pair.partition("="))
        if kind not in node_kinds():
            raise ConfigError(f"{flag} {value}: {kind or 'no kind'} is not a node kind; {fix}")
        if not eq:
            raise ConfigError(f"{flag} {value}: {kind} has no =SECONDS; {fix}")
        try:
            out[kind] = float(seconds)
        except ValueError:
            out[kind] = math.nan
        if not (0 < out[kind] < math.inf):
            raise ConfigError(f"{flag} {value}: {kind}'s timeout {seconds or '(none)'} is not a number of seconds "
                              f"above 0; {fix}")
    return out


def timeouts_from_env() -> dict[str, float]:
    """{kind: seconds} from PKT_TIMEOUT (what `--timeout` sets), empty when unset."""
    raw = os.environ.get(TIMEOUT_VAR, "").strip()
    return timeout_value(raw, TIMEOUT_VAR) if raw else {}


class NotComputed(Exception):
    """The result of a node a plan (flows/plan.py) has not computed (none is)."""


class Answered(PrefectConcurrentFuture):
    """The future of a task run the flow answered itself (a stored node, a source it read): final
    from the start."""

    def __init__(self, task_run_id, state):
        done = concurrent.futures.Future()
        done.set_result(state)
        super().__init__(task_run_id, done)
        self._final_state = state


class _StopsOnSignal:
    """A runner whose exit on Ctrl-C or SIGTERM (KeyboardInterrupt, or the TerminationSignal that
    Prefect's own SIGTERM handler raises in the flow) first stops the nodes still running: the
    runner's exit waits for them, and in a worker thread no signal ever arrives."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not issubclass(exc_type, Exception):
            if not stop.requested():  # pkt's signal handler has said why already ("stopped by SIGINT")
                stop.request(f"stopped ({exc_type.__name__})")
            self._stop_workers()
        return super().__exit__(exc_type, exc, tb)

    def _stop_workers(self) -> None:
        """Threads see the stop flag; nothing else to do."""


class StoppableThreads(_StopsOnSignal, ThreadPoolTaskRunner):
    pass


RESOLVER_THREADS = 1024  # nodes a process pool may hold waiting on their upstream nodes at once


class StoppableProcesses(_StopsOnSignal, ProcessPoolTaskRunner):
    """A local process pool whose nodes stop as threads' do: each pool process follows this process's stop
    flag (and takes a Ctrl-C or SIGTERM of its own as a stop), so a stopped node ends Cancelled."""

    def __enter__(self):
        """Prefect hands each submitted task to one of max_workers threads that waits for the task's
        upstream futures and then passes it to the pool. With 2 workers, two nodes whose upstream was
        still running held both threads, and every node submitted after them, ready or not, waited: a
        sweep ran about one node at a time (bench/runners.py). RESOLVER_THREADS of them (started as
        needed; a waiting one costs no CPU) let the ready nodes through to the pool."""
        context = pool_context()
        self._stop_flag = stop.ProcessFlag(context)
        self._initializer, self._initargs = _pool_process_start, (self._stop_flag,)  # run in each pool process
        super().__enter__()
        spawning = self._executor  # Prefect's, on the spawn context, no process started yet
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self._max_workers, mp_context=context, initializer=spawning._initializer, initargs=spawning._initargs)
        spawning.shutdown(wait=False)
        self._resolver_executor.shutdown(wait=False)  # Prefect's own, still empty
        self._resolver_executor = concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS, "pkt-resolve")
        pool_costs.in_flow_process()
        return self

    def _stop_workers(self) -> None:
        """Pool processes never see this process's flag (nor a signal sent to it alone): raise theirs, start
        nothing queued, and give the running nodes STOP_GRACE s to stop at their next step and report
        Cancelled; a process still busy then (one step longer than that) is killed, its node unrecorded. A
        killed node leaves only its temp area, which gc reaps; its lock dies with it."""
        executor = self._executor
        if executor is None:  # never started, or shut down already
            return
        processes = list((executor._processes or {}).values())  # concurrent.futures' own table
        self._stop_flag.set(stop.reason())
        executor.shutdown(wait=False, cancel_futures=True)  # each process exits once its node has stopped
        deadline = time.monotonic() + STOP_GRACE
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        stuck = [p for p in processes if p.is_alive()]
        for process in stuck:
            process.kill()  # not terminate(): SIGTERM only asks a pool process to stop
        for process in stuck:
            process.join(5)  # gone before the runner's exit returns


POOL_IMPORTS = ("peft", "transformers.models.llama.modeling_llama", *MODEL_LOADING)  # what a node's model load needs
STOP_GRACE = 15.0  # seconds a stopped pool node gets to end Cancelled (a worker's SIGKILL comes 30 s after its SIGTERM)
_POOL_SIGNALS: list[int] = []  # the stop signals a pool process received


def pool_context():
    """Pool processes forked from a server process that imported what every node needs (POOL_IMPORTS, the node
    kinds) once: each pool process started by spawning imported them itself, two at once on two cores, ~14 s
    before a fresh sweep's first node (bench/runners.py). The server imports nothing that starts a thread."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "pkt.tasks.node", *KIND_MODULES, *POOL_IMPORTS])
    return context


def _pool_process_start(flag: stop.ProcessFlag) -> None:
    """Each pool process, at its start: stop when the flow's process stops, and on a signal of its own (a
    terminal's Ctrl-C reaches the whole process group, a worker's cancel sends SIGTERM to it) request
    the stop instead of dying mid-node, so that its node too ends Cancelled. Then import what every node
    needs (torch, transformers, peft, the node kinds), and pay Prefect's per-node costs once (pool_costs)."""
    flag.follow()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _pool_signal)
    node_kinds()
    for module in POOL_IMPORTS:
        importlib.import_module(module)
    pool_costs.in_pool_process()


def _pool_signal(signum, frame) -> None:
    _POOL_SIGNALS.append(signum)
    if len(_POOL_SIGNALS) > 2:  # the third, as pkt's own handler (flows/cli.py): the user insists, leave now
        os._exit(128 + signum)
    stop.request(f"stopped by {signal.Signals(signum).name}")


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
            from .dask_runner import PktDaskTaskRunner
        except ImportError:
            raise ValueError("runner dask needs prefect-dask: pip install 'pkt[dask]'") from None
        if address:
            return PktDaskTaskRunner(address=address)
        return PktDaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
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


SOURCES = {"model": lambda store, path, names: sources.model_source(path, store, names),
           "file": lambda store, path, names: sources.file_source(path),
           "dir": lambda store, path, names: sources.dir_source(path, names)}


@dataclass
class Graph:
    store: Store
    runner: TaskRunner
    torch_threads: int | None = None
    recompute: frozenset[str] | None = field(default_factory=recompute_kinds)  # kinds to recompute (empty: all)
    timeouts: dict[str, float] = field(default_factory=timeouts_from_env)  # kind -> seconds a node may run
    futures: dict[str, PrefectFuture] = field(default_factory=dict)  # node identity -> its future
    kinds: dict[str, str] = field(default_factory=dict)  # node identity -> kind
    sources: dict[str, PrefectFuture] = field(default_factory=dict)
    _identity_of: dict[int, str] = field(default_factory=dict)  # id(future) -> node or source identity
    _labels: set[str] = field(default_factory=set)
    upstream: dict[str, list[str]] = field(default_factory=dict)  # node identity -> its input nodes' identities
    origins: dict[Path, PrefectFuture] = field(default_factory=dict)  # folder -> the node that made it
    _refs: dict[str, dict] = field(default_factory=dict)  # identity -> what a key sees of it (tasks/node.py)
    _forced: set[str] = field(default_factory=set)  # identities of the nodes recomputed

    def __post_init__(self):
        note_flow_run()  # the flow run a Ctrl-C on its command ends Cancelled (flows/server.py)

    def provides(self, folder: str | Path, future: PrefectFuture) -> None:
        """Sources read from inside folder (a family's teacher, student and task files) were taken
        from the node of `future`: the graph draws that edge."""
        self.origins[Path(folder).resolve()] = future

    def _origin(self, path: str) -> list[PrefectFuture]:
        p = Path(path).resolve()
        return [f for folder, f in self.origins.items() if p == folder or folder in p.parents]

    def source(self, kind: str, path: str, names: list[str] | None = None) -> PrefectFuture:
        """The future of an input that is not a node: a model ("model"), a data file ("file") or the
        named files of a task directory ("dir"), read here (its digest is what the keys below it need)
        once the node that makes its folder, if any, is done."""
        identity = canonical_json({"source": kind, "path": str(path), "names": names})
        if identity not in self.sources:
            label = self._unique(f"{kind}[{source_name(path)}" + (f": {', '.join(names)}]" if names else "]"))
            origins = self._origin(path)
            for origin in origins:
                origin.result()  # raises if it failed: nothing to read
            edges = {"wait_for": [TaskRunResult(id=f.task_run_id) for f in origins]} if origins else {}
            try:
                ref = opaque(SOURCES[kind](self.store, str(path), names))
            except Exception as e:
                note_task_run(record_run(source_task(kind), label, Failed(message=f"{type(e).__name__}: {e}"), edges))
                raise
            state = Completed(message=f"sha256 {ref.digest}", data=ref)  # what it read, in the UI too
            future = self._answered(source_task(kind), label, state, edges)
            self.sources[identity], self._refs[identity] = future, ref.as_dict()
            self._identity_of[id(future)] = identity
            if self._below_forced(origins):  # read from what a recomputed node made: below it too
                self._forced.add(identity)
        return self.sources[identity]

    def path_of(self, future: PrefectFuture) -> str:
        """The path (or hub id) of a model, file or directory source's future."""
        return json.loads(self._identity_of[id(future)])["path"]

    def submit(self, spec: Node, inputs: dict, label: str) -> PrefectFuture:
        """The future of spec's ref, once per (spec, upstream nodes/sources): answered here from the
        store when it holds the node's key (a Cached task run), else computed by the task runner."""
        identity = canonical_json({"spec": spec.identity(), "inputs": self._input_identity(inputs)})
        if identity not in self.futures:
            label, upstream = self._unique(f"{spec.KIND}[{label}]"), self._input_nodes(inputs)
            forced = self.recompute is not None and (not self.recompute or spec.KIND in self.recompute
                                                     or self._below_forced(inputs))
            key = spec.key(self._key_inputs(inputs))
            hit = None if forced else lookup(self.store, spec.KIND, key)
            if hit is not None:
                ref = opaque({**hit.as_dict(), "status": "reused"})
                future = self._answered(node_task(spec.KIND), label, cached_state(ref), self._edges(inputs))
            else:
                future = self._compute(spec, inputs, label, forced)
            self.futures[identity], self.kinds[identity] = future, spec.KIND
            self._identity_of[id(future)], self._refs[identity] = identity, {"kind": spec.KIND, "key": key}
            self.upstream[identity] = upstream
            if forced:
                self._forced.add(identity)
        return self.futures[identity]

    def _compute(self, spec: Node, inputs: dict, label: str, recompute: bool) -> PrefectFuture:
        """Ship the node to the task runner: futures it waits for pass as they are, answered ones as
        their refs (plain data any runner can carry) with their edges given alongside."""
        edges = self._edges(inputs, answered_only=True)
        future = self.runner.submit(node_task(spec.KIND), parameters={
            "spec": spec, "inputs": self._resolve_answered(inputs), "store_root": str(self.store.root),
            "label": label, "torch_threads": self.torch_threads, "recompute": recompute,
            "timeout": self.timeouts.get(spec.KIND)},
            dependencies={"inputs": set(edges["inputs"])} if edges else None)
        note_task_run(future.task_run_id)
        return future

    def _answered(self, task_, label: str, state, edges: dict) -> Answered:
        run_id = record_run(task_, label, state, edges)
        note_task_run(run_id)
        return Answered(run_id, state)

    def _below_forced(self, inputs) -> bool:
        """Whether a node or source among inputs is recomputed (what reads it is below it)."""
        if isinstance(inputs, PrefectFuture):
            return self._identity_of.get(id(inputs)) in self._forced
        if isinstance(inputs, list):
            return any(self._below_forced(x) for x in inputs)
        if isinstance(inputs, dict) and "digest" not in inputs:
            return any(self._below_forced(x) for x in inputs.values())
        return False

    def _key_inputs(self, inputs):
        """inputs as what a key sees of them: a source's digest, a node's kind and key (known for every
        node submitted, computed or not)."""
        if isinstance(inputs, PrefectFuture):
            return self._refs[self._identity_of[id(inputs)]]
        if isinstance(inputs, list):
            return [self._key_inputs(x) for x in inputs]
        if isinstance(inputs, dict) and "digest" not in inputs:
            return {name: self._key_inputs(x) for name, x in inputs.items()}
        return inputs  # a ref already (a table the flow stored)

    def _resolve_answered(self, inputs):
        if isinstance(inputs, Answered):
            return inputs.result()
        if isinstance(inputs, list):
            return [self._resolve_answered(x) for x in inputs]
        if isinstance(inputs, dict) and "digest" not in inputs:
            return {name: self._resolve_answered(x) for name, x in inputs.items()}
        return inputs

    def _edges(self, inputs, answered_only: bool = False) -> dict:
        """{"inputs": [TaskRunResult of each upstream task run]}: the edges the UI draws."""
        found, todo = [], [inputs]
        while todo:
            x = todo.pop()
            if isinstance(x, PrefectFuture):
                if not answered_only or isinstance(x, Answered):
                    found.append(TaskRunResult(id=x.task_run_id))
            elif isinstance(x, list):
                todo += x
            elif isinstance(x, dict) and "digest" not in x:
                todo += list(x.values())
        unique = list({r.id: r for r in found}.values())
        return {"inputs": unique} if unique else {}

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
