"""A stopped run on a process pool ends Cancelled (issue 25, item 4): `pkt demo --runner processes`
stopped mid-node, by a terminal's Ctrl-C (SIGINT to the whole process group: the pool processes get it
too) or by SIGTERM to pkt alone (the pool processes get nothing), records the running node's task run
as Cancelled, not Crashed or Running, and the flow run as Cancelled; the pool processes are gone and
the stopped node stored nothing. Judged through the API of the command's own temporary server."""
import os
import signal
import time

import psutil
import pytest

from procs import pkt_until
from test_recording import server_of
from test_shared_server import _node_runs

READY = "pretrain teacher: 1/"  # the family node is under way, in a pool process


def _demo_stopped(tmp_path, sig, group: bool):
    """Run `pkt demo --size test --runner processes --workers 2` in its own process group, send sig once
    the family node pretrains (to the group, as a terminal's Ctrl-C does, or to pkt alone). Returns
    (seconds from the signal to the exit, exit code, output, pkt's pool processes)."""
    argv = ["demo", "--size", "test", "--seeds", "1", "--runner", "processes", "--workers", "2"]
    with pkt_until(argv, tmp_path, READY, "its family node", own_group=True) as (p, out):
        pool = [c for c in psutil.Process(p.pid).children() if "multiprocessing" in " ".join(c.cmdline())]
        time.sleep(2)  # well inside the node
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
        t0 = time.monotonic()
        out += p.stdout.readlines()
        p.wait(120)
        return time.monotonic() - t0, p.returncode, "".join(out), pool


@pytest.mark.slow  # a temporary server, a pool of two, a family node stopped mid-pretraining, its record read back
@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "SIGTERM-to-pkt"])
def test_a_stopped_process_pool_run_ends_its_running_node_and_flow_run_cancelled(tmp_path, sig, group):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter
    from prefect.client.schemas.objects import StateType

    seconds, code, out, pool = _demo_stopped(tmp_path, sig, group)
    print(f"{signal.Signals(sig).name}: exited {code} {seconds:.1f} s after the signal")
    assert pool, out[-3000:]
    assert code == 128 + sig and seconds < 45, out[-3000:]  # 45: a loaded 2-core machine
    _, alive = psutil.wait_procs(pool, timeout=15)
    assert not alive, [c.cmdline() for c in alive]
    with server_of(tmp_path / "prefect"), get_client(sync_client=True) as client:  # the command's database
        runs = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["demo"]}))
        assert len(runs) == 1, runs
        nodes = _node_runs(client, runs[0].id)
    assert [s for n, s in nodes.items() if n.startswith("family[")] == ["Cancelled"], (nodes, out[-3000:])
    assert not {"Crashed", "Running", "Pending"} & set(nodes.values()), nodes
    assert runs[0].state.type == StateType.CANCELLED, (runs[0].state, out[-3000:])
    assert not list((tmp_path / "store").glob("keys/family/*.json"))  # the stopped node stored nothing
