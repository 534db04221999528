"""The process pool runner passes a ready node to its workers while others wait on their upstream nodes
(flows/graph.py StoppableProcesses: Prefect's own held every node submitted behind max_workers waiting ones)."""
from __future__ import annotations

import concurrent.futures
import uuid

import pytest
from prefect import task
from prefect.futures import PrefectConcurrentFuture
from prefect.states import Completed


READY_S = 240  # the pool's processes start (imports) on a loaded 2-core machine well within this


@task
def echo(x):
    return x


@pytest.mark.slow
def test_a_ready_node_runs_while_as_many_nodes_as_workers_wait_on_their_upstream(prefect_env):
    from pkt.flows.graph import task_runner

    upstream_done = concurrent.futures.Future()  # an upstream node still running
    upstream = PrefectConcurrentFuture(uuid.uuid4(), upstream_done)
    with task_runner("processes", 2) as runner:
        waiting = [runner.submit(echo, {"x": upstream}) for _ in range(2)]  # one per worker, as a sweep submits
        ready = runner.submit(echo, {"x": 7})
        try:  # with Prefect's 2 resolver threads both wait on `upstream`, and `ready` never reaches the pool
            ran = ready.result(timeout=READY_S)
        except TimeoutError:
            ran = None
        finally:
            upstream_done.set_result(Completed(data=3))  # else the runner's exit waits on it for ever
        assert ran == 7, f"a ready node did not run within {READY_S} s while 2 nodes waited on their upstream"
        assert [f.result(timeout=240) for f in waiting] == [3, 3]
