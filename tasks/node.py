"""How every pkt node runs as a Prefect task.

A node is a typed, frozen spec (mergekit's Task pattern): its fields are its identity, its
upstream artifacts arrive as Prefect futures, and its key is computed in one place,
`Node.key(inputs)`, once those inputs have resolved. One wrapper, `run_node`, answers a node
from the store or computes, stores, times and records it.

The store is the only cache. Prefect keeps no result files for pkt's tasks (nothing a worker
could plant in a results directory is ever deserialized); a node the store holds finishes in a
state named Cached, so the UI still shows reuse, and Prefect records the true edges because
every upstream ref is passed in as a future.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from prefect import Task, get_run_logger, task
from prefect._internal.engine import dynamic_key_for_task_run
from prefect._internal.uuid7 import uuid7
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, StateDetails, TaskRun, TaskRunPolicy
from prefect.context import FlowRunContext
from prefect.logging import get_logger
from prefect.states import Cancelled, Completed
from prefect.utilities.engine import emit_task_run_state_change_event

from pkt.artifacts import catalog
from pkt.artifacts.keys import canonical_json
from pkt.artifacts.store import Ref, Store
from pkt.core import stop
from pkt.core.errors import UserError
from pkt.core.memory import PeakRSS

TIMEOUT_VAR = "PKT_TIMEOUT"  # what `--timeout` sets: KIND=SECONDS[,KIND=SECONDS]


class NodeTimeout(UserError, TimeoutError):
    """A node stopped at its kind's time limit. A TimeoutError, so Prefect's task engine ends its run in
    the state TimedOut (a Failed state); a UserError, so the CLI prints its one sentence."""


def timeout_message(label: str, kind: str, seconds: float) -> str:
    return (f"{label} stopped at its {kind} timeout of {seconds:g} s and stored nothing; raise it with "
            f"--timeout {kind}=SECONDS ({TIMEOUT_VAR}, or timeouts: {{{kind}: SECONDS}} in a sweep config)")


class NodeRef:
    """What a pkt task returns: {kind, key, digest, status} read like a dict. Deliberately not a dict
    or dataclass: Prefect links a returned collection's *items* by id() to later task arguments,
    and interned strings such as "file" or "extraction" would draw edges that do not exist."""

    __slots__ = ("kind", "key", "digest", "status")

    def __init__(self, kind: str, key: str, digest: str, status: str = ""):
        self.kind, self.key, self.digest, self.status = kind, key, digest, status

    def __getitem__(self, name: str) -> str:
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name, default)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __getstate__(self):  # Dask ships refs between processes
        return self.as_dict()

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)

    def __eq__(self, other) -> bool:
        return isinstance(other, NodeRef) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"NodeRef({self.kind}, {self.key[:12]}, {self.status or 'source'})"


def opaque(ref: dict) -> NodeRef:
    return NodeRef(ref["kind"], ref["key"], ref["digest"], ref.get("status", ""))


def digests(inputs: dict) -> dict:
    """name -> digest (or list of digests) of resolved input refs: the bytes a node read (its record)."""
    return {name: [r["digest"] for r in ref] if isinstance(ref, list) else ref["digest"]
            for name, ref in sorted(inputs.items())}


SOURCE_KINDS = ("model", "file", "dir")  # inputs that are not stored nodes (tasks/sources.py)


def identities(inputs: dict) -> dict:
    """name -> what a key sees of each input: a source's content digest (a moved model reuses
    everything), a stored node's *key*. A node's bytes can differ in the last bits with torch's
    thread count (LAPACK's SVD, training: 1 thread per Dask worker, every core serially), so keys
    chained through digests would split one sweep's cache by runner; chained through keys, a node
    computed on any runner serves every runner, and its record still names the digests it read."""
    def one(ref):
        return ref["digest"] if ref["kind"] in SOURCE_KINDS else f"{ref['kind']}:{ref['key']}"

    return {name: [one(r) for r in ref] if isinstance(ref, list) else one(ref) for name, ref in sorted(inputs.items())}


def execution(**kw):
    """A spec field that says how or where a node runs, not what it is: kept out of the key,
    written into the record."""
    return dataclasses.field(metadata={"execution": True}, **kw)


def _unset(spec, f: dataclasses.Field) -> bool:
    return f.metadata.get("keyed_if_set", False) and getattr(spec, f.name) == f.default


def keyed_if_set(default):
    """A spec field added after artifacts were stored: in the key only when it differs from its default,
    so every artifact made before it existed (which all had the default) keeps its key."""
    return dataclasses.field(default=default, metadata={"keyed_if_set": True})


@dataclass(frozen=True)
class Tensors:
    """What a single-file node's compute returns: tensors and header metadata (one safetensors blob)."""

    tensors: dict
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    """A node spec: subclasses declare KIND, VERSION, INPUTS and their parameters as fields, and
    implement compute(store, inputs, out_dir) -> Tensors, or None after writing files to out_dir."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    INPUTS: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("execution") and not _unset(self, f)}

    def execution(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("execution")}

    def key(self, inputs: dict) -> str:
        """The artifact key: sha256 of {kind, kind_version, params, inputs: {name: identity}}, an
        input's identity being a source's digest or an upstream node's kind:key (identities())."""
        missing = set(self.INPUTS) - set(inputs)
        if missing:
            raise ValueError(f"{self.KIND} node lacks inputs {sorted(missing)}")
        return Store.key(self.KIND, self.params(), identities(inputs), self.VERSION)

    def identity(self) -> str:
        """Canonical spelling of the spec (kind, version, every field): two specs with one identity
        and the same upstream nodes are one node."""
        return canonical_json({"kind": self.KIND, "version": self.VERSION, **self.params(), **self.execution()})

    def compute(self, store: Store, inputs: dict, out_dir: Path) -> Tensors | None:
        raise NotImplementedError


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (plain Python): still say what happened
        return get_logger("pkt")


def log(msg: str) -> None:
    _logger().info(msg)


def build(spec: Node, inputs: dict, store: Store, label: str = "", recompute: bool = False) -> NodeRef:
    """The node's ref as {kind, key, digest, status}: 'reused' when the store holds it, else
    'computed'. A node being computed elsewhere (another branch, another process) is waited for
    under the store's lock, never computed twice. recompute: compute it even if the store holds it
    (the new record replaces the key's record; the old bytes stay until gc). Plain Python: no
    Prefect run needed."""
    key = spec.key(inputs)
    if recompute:
        with store.lock(spec.KIND, key):
            return opaque({**_compute(store, spec, key, inputs, label).as_dict(), "status": "computed"})
    hit = store.lookup(spec.KIND, key)  # a stored node needs no lock (nor a writable store)
    store.misses.clear()  # a miss is looked up (and reported) again under the lock
    if hit is None:
        with store.lock(spec.KIND, key):
            hit = lookup(store, spec.KIND, key)  # computed by someone else while we waited
            if hit is None:
                return opaque({**_compute(store, spec, key, inputs, label).as_dict(), "status": "computed"})
    return opaque({**hit.as_dict(), "status": "reused"})


def cached_state(ref: NodeRef) -> State:
    """The state of a node the store holds: Completed, named Cached, the artifact key shown as its
    cache key (Prefect itself looks nothing up by it)."""
    return Completed(name="Cached", message=f"{ref.kind} {ref.key[:12]} reused from the store", data=ref,
                     state_details=StateDetails(cache_key=f"pkt-{ref.kind}-{ref.key}"))


@task(name="node", cache_policy=NO_CACHE, persist_result=False, task_run_name="{label}")
def run_node(spec: Node, inputs: dict, store_root: str, label: str, torch_threads: int | None = None,
             recompute: bool = False, timeout: float | None = None):
    """build() as a Prefect task: a node the store holds finishes in a state named Cached.

    timeout (seconds, wall clock): past it the node stops at its next step (pkt_core/stop.py; Prefect's
    own task timeout cannot stop a node in a worker thread, and its injected exception could land
    mid-write) and its run ends TimedOut. A node stopped by a cancel, Ctrl-C or SIGTERM ends Cancelled,
    not Crashed: it was asked to stop. Either way it stored nothing."""
    if torch_threads and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)  # N workers on N cores: no oversubscription
    try:
        with stop.deadline(timeout):
            ref = build(spec, inputs, Store(store_root), label, recompute)
    except stop.TimedOut:
        raise NodeTimeout(timeout_message(label, spec.KIND, timeout)) from None
    except stop.Stopped as e:
        return Cancelled(message=f"{label}: {e}; nothing was stored, a rerun computes it")
    return ref if ref["status"] == "computed" else cached_state(ref)


def record_run(task_: Task, label: str, state: State, task_inputs: dict[str, list]) -> uuid.UUID:
    """Record a task run that already has its final state without running it (a node the flow found
    in the store, a source it read): the one state-change event Prefect's task engine emits for each
    state a run enters, from which the server's task-run recorder writes the run, its state and its
    edges (task_inputs: parameter name -> TaskRunResult of the upstream runs). No pool round trip,
    no API call. Outside a flow run nothing is recorded."""
    run_id = uuid7()
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return run_id
    state.state_details.task_run_id, state.state_details.flow_run_id = run_id, ctx.flow_run.id
    run = TaskRun(id=run_id, name=label, flow_run_id=ctx.flow_run.id, task_key=task_.task_key,
                  dynamic_key=str(dynamic_key_for_task_run(ctx, task_, stable=False)), task_version=task_.version,
                  empirical_policy=TaskRunPolicy(), tags=sorted(task_.tags), task_inputs=task_inputs,
                  expected_start_time=state.timestamp, start_time=state.timestamp, end_time=state.timestamp,
                  total_run_time=datetime.timedelta(0), run_count=1, state_id=state.id, state_type=state.type,
                  state_name=state.name, state=state, created=state.timestamp, updated=state.timestamp)
    emit_task_run_state_change_event(task_run=run, initial_state=None, validated_state=state)
    return run_id


@functools.lru_cache(maxsize=None)
def node_task(kind: str):
    """run_node under the kind's own task name and key, so the UI's task filter tells kinds apart."""
    kind_task = run_node.with_options(name=kind)
    kind_task.task_key = f"pkt-{kind}"
    return kind_task


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _compute(store: Store, spec: Node, key: str, inputs: dict, label: str = "") -> Ref:
    stop.check()  # a node that starts after Ctrl-C (queued in a pool) does not start its work
    t0 = time.time()
    upstream = [store.record(r["kind"], r["key"]) or {} for ref in inputs.values()
                for r in (ref if isinstance(ref, list) else [ref]) if r["kind"] not in catalog.SOURCE_KINDS]
    record = {"params": spec.params(), "inputs": digests(inputs), "execution": spec.execution(),
              "description": catalog.describe(label or f"{spec.KIND}[]", spec.params(), inputs, upstream)}
    with store.scratch_dir() as out:
        try:
            with PeakRSS() as rss:  # the compute's own peak resident set (pkt_core/memory.py says what it measures)
                result = spec.compute(store, inputs, out)
        except Exception as e:  # a node writes its files into the store's temp area first
            store.raise_if_disk_full(e, needed=_bytes_under(out), at_least=True)
            raise
        seconds = time.time() - t0
        record["measured"] = rss.as_record()
        if isinstance(result, Tensors):
            ref = store.put_tensors(spec.KIND, key, result.tensors, seconds=seconds, metadata=result.metadata, **record)
        else:
            ref = store.put_tree(spec.KIND, key, out, seconds=seconds, **record)
    log(f"{spec.KIND} {key[:12]} computed in {seconds:.1f}s on {os.uname().nodename}, peak RSS "
        f"{rss.peak / 2**20:.0f} MiB ({(rss.peak - rss.start) / 2**20:+.0f} MiB)")
    return ref


def lookup(store: Store, kind: str, key: str) -> Ref | None:
    """store.lookup, saying in the run's log why a stored entry could not be used."""
    hit = store.lookup(kind, key)
    for note in store.misses:
        _logger().warning(note)
    store.misses.clear()
    return hit


KIND_MODULES = tuple(f"{__package__}.{m}" for m in ("extract", "family", "fresh", "laten", "scores", "train"))


def node_kinds() -> set[str]:
    """Every node kind pkt defines (the KIND of each Node subclass, KIND_MODULES loaded)."""
    for module in KIND_MODULES:  # their classes are the kinds
        importlib.import_module(module)

    todo, kinds = [Node], set()
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        kinds |= {cls.KIND} - {""}
    return kinds
