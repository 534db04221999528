"""Prefect's per-node costs on a process pool, paid once instead of on every node.

Measured (bench/README.md, py-spy on a reduced study, 2 pool processes): each node sent to a pool process
cost ~35 ms in the flow's process (Prefect's ProcessPoolTaskRunner.submit serializes the whole settings
model again) and ~130 ms in the pool process (the settings parsed back into a pydantic model: ~65 ms;
two API clients, each building a TLS context that parses every CA certificate: ~30 ms each), beside node
compute of 0.1-4 s: the largest share of a fresh study's orchestration. The settings do not change within
a flow run and a TLS context can serve many clients, so each is built once per process and reused:

- flow process: a settings context's serialized form, cached on that context (a new context, e.g. a
  `temporary_settings` block, serializes anew);
- pool process: the settings context hydrated from a serialized form it has seen before is the model built
  the first time (keyed by the serialized content), and Prefect's client reuses its TLS context for the
  same certificate file.

pkt's process runner applies them (flows/graph.py), and its Dask runner on every worker (flows/dask_runner.py:
prefect-dask's workers hydrate a node's context through prefect.task_engine, patched as well). Each patch
applies only where the Prefect internal it wraps exists (prefect>=3.4,<4), else it is left out.
"""
from __future__ import annotations

import functools
import json
import ssl


def in_flow_process() -> None:
    """Before a process pool takes nodes: serialize each settings context once."""
    from prefect.context import SettingsContext

    if getattr(SettingsContext.serialize, "_pkt_cached", False):
        return
    serialize = SettingsContext.serialize
    cache: dict[int, tuple] = {}  # id(context) -> (context, its serialized form): the context kept, so its id is its own

    @functools.wraps(serialize)
    def cached(self, include_secrets: bool = True):
        key = (id(self), include_secrets)
        hit = cache.get(key)  # two threads may both miss: each stores the same form
        if hit is None or hit[0] is not self:
            hit = cache[key] = (self, serialize(self, include_secrets=include_secrets))
        return hit[1]

    cached._pkt_cached = True
    SettingsContext.serialize = cached


def in_pool_process() -> None:
    """In each pool process, before its first node: hydrate each distinct settings context once, and give
    Prefect's clients one TLS context per certificate file."""
    import prefect.client.orchestration as orchestration
    import prefect.context as context
    import prefect.task_engine as engine

    for module in (context, engine):  # the process pool's calls read it from prefect.context, Dask's from the engine
        hydrated = getattr(module, "hydrated_context", None)
        if hydrated is not None and not getattr(hydrated, "_pkt_cached", False):
            module.hydrated_context = _hydrating_settings_once(hydrated, context.SettingsContext)
    if getattr(orchestration, "ssl", None) is ssl:
        orchestration.ssl = _TLSContextOnce()


def _hydrating_settings_once(hydrated, settings_context_cls):
    """hydrated_context, with the serialized settings context replaced by the models built from it the first
    time it was seen (the same content: the same settings)."""
    built: dict[str, dict] = {}

    @functools.wraps(hydrated)
    def hydrated_context(serialized_context=None, client=None):
        fields = (serialized_context or {}).get("settings_context")
        if fields:
            key = json.dumps(fields, sort_keys=True, default=str)
            if key not in built:
                made = settings_context_cls(**fields)
                built[key] = {"profile": made.profile, "settings": made.settings}
            serialized_context = {**serialized_context, "settings_context": built[key]}
        return hydrated(serialized_context, client)

    hydrated_context._pkt_cached = True
    return hydrated_context


class _TLSContextOnce:
    """Prefect's client module's view of `ssl`: create_default_context returns one context per arguments
    (the module asks for a verified one per certificate file, or an unverified one that it then sets up
    the same way each time); everything else is the ssl module itself."""

    def __getattr__(self, name):
        return getattr(ssl, name)

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def create_default_context(*args, **kwargs) -> ssl.SSLContext:
        return ssl.create_default_context(*args, **kwargs)
