"""prefect-dask's runner with Prefect's per-node costs paid once per process (flows/pool_costs.py): the flow's
process serializes each settings context once, and every worker of the cluster, through a worker plugin,
hydrates each distinct settings once and builds one TLS context (prefect-dask's workers hydrate a node's
context through prefect.task_engine, which pool_costs patches as well)."""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner

from . import pool_costs


class PoolCosts(WorkerPlugin):
    """pool_costs.in_pool_process on each worker, those that join later included."""
    name = "pkt-pool-costs"

    def setup(self, worker) -> None:
        pool_costs.in_pool_process()


class PktDaskTaskRunner(DaskTaskRunner):
    @property
    def client(self):
        fresh = not self._client
        client = DaskTaskRunner.client.fget(self)
        if fresh:
            pool_costs.in_flow_process()
            client.register_plugin(PoolCosts())
        return client
