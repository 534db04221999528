"""Every run fully recorded (issue 25, item 1): a `pkt` command ends only once its Prefect server holds
every task run it made, so that a fully cached rerun of the test demo reads back through the REST API,
after the command ended, with all its task runs Cached and the graph's edges equal to the store's
records; on pkt's temporary server and on a server of the user's alike."""
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest

from pkt.artifacts.store import Store
from pkt.flows.server import TemporaryServer


def pkt_demo(store, home, report, api_url=None) -> str:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    out = subprocess.run([sys.executable, "-c", "import sys; from pkt.flows.cli import main; sys.exit(main())",
                          "demo", "--size", "test", "--seeds", "2", "--store", str(store), "--report-dir",
                          str(report)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@contextmanager
def server_of(home):
    """A Prefect server on the database of `home` (the one a finished command wrote), and its URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    server = TemporaryServer()
    try:
        server.start(300)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        server.stop()
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


def last_flow_runs(n: int):
    """The n latest flow runs named demo, newest first, read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["demo"]}),
                                     sort=FlowRunSort.START_TIME_DESC, limit=n)


def task_runs(flow_run_id) -> list:
    """Every task run of a flow run, read once (no waiting: the command said it was all recorded)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    runs, flt = [], FlowRunFilter(id={"any_": [flow_run_id]})
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(flow_run_filter=flt, limit=200, offset=len(runs)):
            runs += page
    return runs


def check_cached_run(runs: list, store: Store, reused: int) -> None:
    """All `reused` nodes Cached with their artifact key, and each node's upstream task runs exactly the
    inputs its store record names (by digest; a source's digest is in its state's message, and the
    tables the flow stored for the report are inputs without a task run)."""
    assert all(r.state is not None for r in runs)
    nodes = [r for r in runs if r.state.state_details.cache_key]
    sources = [r for r in runs if not r.state.state_details.cache_key]
    assert len(nodes) == reused and {r.state.name for r in nodes} == {"Cached"}
    assert {r.state.name for r in sources} == {"Completed"} and sources
    digest = {r.id: re.fullmatch(r"sha256 ([0-9a-f]{64})", r.state.message).group(1) for r in sources}
    records = {}
    for r in nodes:
        kind, key = re.fullmatch(r"pkt-(\w+)-([0-9a-f]{64})", r.state.state_details.cache_key).groups()
        records[r.id] = store.record(kind, key)
        assert records[r.id] is not None and r.task_key == f"pkt-{kind}" and r.name.startswith(f"{kind}[")
        digest[r.id] = records[r.id]["digest"]
    tables = {rec["digest"] for rec in store.records() if rec["kind"] == "table"}
    edges = 0
    for r in nodes:
        read = sorted(d for v in records[r.id]["inputs"].values() for d in (v if isinstance(v, list) else [v])
                      if d not in tables)
        upstream = sorted(digest[i.id] for inputs in r.task_inputs.values() for i in inputs)
        assert upstream == read, r.name
        edges += len(upstream)
    assert edges > len(nodes)  # a graph, not a list


@pytest.mark.slow  # a fresh test demo and two cached reruns, each with its own server: minutes on 2 cores
@pytest.mark.ci
def test_a_cached_rerun_is_fully_recorded_on_the_temporary_and_a_users_server(tmp_path):
    store = tmp_path / "store"
    pkt_demo(store, tmp_path / "home-fresh", tmp_path / "report")
    home = tmp_path / "home"
    out = pkt_demo(store, home, tmp_path / "report")  # its temporary server is gone once this returns
    computed, reused = map(int, re.search(r"(\d+) nodes computed, (\d+) reused", out).groups())
    assert computed == 0 and reused > 100
    assert "pkt: the Prefect server recorded" not in out and "Runs, scores and reports are in the Prefect UI" in out
    with server_of(home):
        (flow_run,) = last_flow_runs(5)
        check_cached_run(task_runs(flow_run.id), Store(store), reused)

    with server_of(tmp_path / "users-home") as url:  # a server the user started: read the moment pkt returns
        pkt_demo(store, tmp_path / "home-client", tmp_path / "report", api_url=url)
        (flow_run,) = last_flow_runs(5)
        check_cached_run(task_runs(flow_run.id), Store(store), reused)
