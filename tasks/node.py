"""How every pkt node runs as a Prefect task.

The Prefect cache key is the artifact key (plus which store), so the UI shows a reused node as
Cached. The store stays the source of truth: when it lacks a node (first run, wiped, or a corrupt
blob) the task runs with refresh_cache=True; when it has one, its ref is what the flow gets, never
a Prefect record that may predate a rebuilt store; and the task body itself answers from the
store when Prefect's own cache is gone.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger

from pkt.artifacts.store import Ref, Store

# kind -> version: bump a kind's version when its computation changes meaning
KIND_VERSIONS = {"family": 1, "random_model": 1, "sensitivity": 1, "layer_plan": 1, "extraction": 1,
                 "lora_init": 2, "residual_model": 1, "adapter": 2, "scores": 2, "report": 2}


def digests(inputs: dict[str, dict]) -> dict[str, str]:
    return {name: ref["digest"] for name, ref in sorted(inputs.items())}


def node_key(kind: str, params: dict, inputs: dict[str, dict]) -> str:
    return Store.key(kind, params, digests(inputs), KIND_VERSIONS[kind])


@dataclass
class ArtifactKeyPolicy(CachePolicy):
    kind: str = ""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        # Prefect's cache is one per machine, stores are many: a ref is only good in its own store
        store = hashlib.sha256(str(Path(inputs["store_root"]).resolve()).encode()).hexdigest()[:12]
        return f"pkt-{self.kind}-{node_key(self.kind, inputs['params'], inputs['inputs'])}-{store}"


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (plain Python): still say what happened
        return get_logger("pkt")


def _lookup(store: Store, kind: str, key: str) -> Ref | None:
    """store.lookup, saying in the run's log why a stored entry could not be used."""
    hit = store.lookup(kind, key)
    for note in store.misses:
        _logger().warning(note)
    store.misses.clear()
    return hit


Compute = Callable[[Store, str, dict, dict], Ref]


def artifact_task(kind: str, compute: Compute, run_name: str):
    """A Prefect task that returns the ref of kind's artifact for (params, inputs), computing it
    (under a store lock, so concurrent runs compute it once) only when the store lacks it."""

    def body(store_root: str, params: dict, inputs: dict[str, dict], label: str = "") -> dict:
        store = Store(store_root)
        key = node_key(kind, params, inputs)
        with store.lock(kind, key):
            hit = _lookup(store, kind, key)
            if hit is not None:
                return hit.as_dict()
            t0 = time.time()
            ref = compute(store, key, params, inputs)
            _logger().info(f"{kind} {key[:12]} computed in {time.time() - t0:.1f}s")
            return ref.as_dict()

    body.__name__ = f"{kind}_task"
    return task(body, name=kind, cache_policy=ArtifactKeyPolicy(kind=kind), persist_result=True,
                result_serializer="json", task_run_name=run_name)


@dataclass
class NodeResult:
    ref: dict
    status: str  # "computed" or "reused"
    kind: str

    @property
    def key(self) -> str:
        return self.ref["key"]


def run_node(node_task, store: Store, params: dict, inputs: dict[str, dict], label: str) -> NodeResult:
    kind = node_task.name
    hit = _lookup(store, kind, node_key(kind, params, inputs))
    ref = node_task.with_options(refresh_cache=hit is None)(
        store_root=str(store.root), params=params, inputs=inputs, label=label)
    if hit is not None:  # the store answers: Prefect's record may predate a rebuilt or copied store
        ref = hit.as_dict()
    return NodeResult(ref, "reused" if hit else "computed", kind)
