"""A cancelled run ends Cancelled with its running node stopped (issue 25, item 4): cancelling a
deployment run while a worker runs it (what the UI's Cancel and `prefect flow-run cancel` do) stops the
node it is computing, whose task run ends Cancelled, not Crashed; the flow run ends Cancelled and its
process is gone, within a bound; the stopped node stored nothing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_recording import server_of
from test_shared_server import _node_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a server, a worker, and a flow run started, then cancelled mid-node: a few minutes
def test_a_cancelled_deployment_run_ends_cancelled_with_its_running_node_stopped(mini_family, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateType

    from pkt.flows.deploy import deploy

    seeds = tmp_path / "many.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 1000)  # 8,000 samples: minutes
    home, store = tmp_path / "home", tmp_path / "store"
    with server_of(home) as url, get_client(sync_client=True) as client:
        assert deploy(ROOT, ["extract-teacher"], out=lambda *_: None) == ["extract-teacher/extract-teacher"]
        dep = client.read_deployment_by_name("extract-teacher/extract-teacher")
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "2",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        log = tmp_path / "worker.log"
        with open(log, "w") as f:
            worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "pkt-process",
                                       "--limit", "1"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            run = client.create_flow_run_from_deployment(dep.id, parameters={
                "teacher": str(mini_family / "teacher"), "seeds": str(seeds),
                "students": [str(mini_family / "student")], "rank": 2, "store": str(store)})
            deadline = time.monotonic() + 600
            while not [s for n, s in _node_runs(client, run.id).items() if n.startswith("sensitivity[")
                       and s == "Running"]:
                assert not client.read_flow_run(run.id).state.is_final(), log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            flow_processes = psutil.Process(worker.pid).children(recursive=True)  # the flow run's process
            assert flow_processes, log.read_text()[-3000:]
            time.sleep(2)  # well inside the node
            client.set_flow_run_state(run.id, State(type=StateType.CANCELLING))  # as `prefect flow-run cancel`
            t0 = time.monotonic()
            # the worker's SIGTERM comes a few seconds after the cancel, and its SIGKILL 30 s after that: a process
            # gone before then stopped by itself
            _, alive = psutil.wait_procs(flow_processes, timeout=30)
            gone = time.monotonic() - t0
            assert not alive, [p.cmdline() for p in alive] + [log.read_text()[-3000:]]
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert time.monotonic() - t0 < 120, log.read_text()[-3000:]
                time.sleep(1)
            print(f"cancelled: process gone {gone:.1f} s after the cancel, flow run {state.name} after "
                  f"{time.monotonic() - t0:.1f} s")
            assert state.type == StateType.CANCELLED, (state, log.read_text()[-3000:])
            deadline = time.monotonic() + 60  # the server records task runs from events, in batches
            while (nodes := _node_runs(client, run.id)) and "Running" in nodes.values():
                assert time.monotonic() < deadline, nodes
                time.sleep(2)
            sensitivity = [s for n, s in nodes.items() if n.startswith("sensitivity[")]
            assert sensitivity == ["Cancelled"], (nodes, log.read_text()[-3000:])
            assert "Crashed" not in nodes.values(), nodes
            assert not list(store.glob("keys/sensitivity/*.json"))  # the stopped node stored nothing
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGINT)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()


@pytest.mark.slow  # a sensitivity pass of minutes, stopped after a few seconds, then its record read back
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_ends_the_running_nodes_task_run_cancelled(mini_family, tmp_path, sig):
    """The local path: `pkt extract` stopped by Ctrl-C or SIGTERM mid-node records that node's task run
    and its flow run as Cancelled (they were asked to stop), not Crashed, on the command's own temporary
    server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    from test_stop import _start_and_signal

    seeds = tmp_path / "many.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 1000)  # 8,000 samples: minutes
    argv = ["extract", "--teacher", str(mini_family / "teacher"), "--seeds", str(seeds),
            "--student", str(mini_family / "student"), "--rank", "2"]
    seconds, code, out, _ = _start_and_signal(argv, tmp_path, sig, "sensitivity: 1/")
    assert code == 128 + sig and seconds < 30, out[-3000:]
    with server_of(tmp_path / "prefect"), get_client(sync_client=True) as client:  # the command's database
        run = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["extract-teacher"]}),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        nodes = _node_runs(client, run.id)
    assert [s for n, s in nodes.items() if n.startswith("sensitivity[")] == ["Cancelled"], (nodes, out[-3000:])
    assert "Crashed" not in nodes.values(), nodes
    assert run.state.type == StateType.CANCELLED, (run.state, out[-3000:])
    assert not list((tmp_path / "store").glob("keys/sensitivity/*.json"))
