"""scripts/server.sh: the Prefect server a team shares, on PostgreSQL. A deployment run on a worker and a
`pkt demo` beside it write to it at once (on SQLite that logged "database is locked"); every node of both
runs is recorded, and `stop` ends Prefect's server and PostgreSQL."""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "server.sh"


def _postgres_installed() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(folder: str, port: int) -> list[psutil.Process]:
    """Processes this test started through the script: PostgreSQL on its cluster, Prefect's server on its port."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if folder in cmd or ("prefect" in cmd and f"--port {port}" in cmd):
            found.append(p)
    return found


def _sql(folder: str, query: str) -> str:
    """A query to the script's PostgreSQL, as its database user."""
    server = Path(folder) / "server"
    initdb = (glob.glob("/usr/lib/postgresql/*/bin/initdb") or [shutil.which("initdb")])[-1]
    out = subprocess.run([str(Path(initdb).with_name("psql")), "-h", "127.0.0.1", "-p", (server / "pg.port").read_text().strip(),
                          "-U", "pkt", "-d", "prefect", "-tAc", query], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PGPASSWORD": (server / "pg.password").read_text().strip()})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _node_runs(client, flow_run_id) -> dict[str, str]:
    """task-run name -> state name of a flow run's nodes (its sources left out), read through the API."""
    from prefect.client.schemas.filters import FlowRunFilter

    runs, flt = [], FlowRunFilter(id={"any_": [flow_run_id]})
    while page := client.read_task_runs(flow_run_filter=flt, limit=200, offset=len(runs)):
        runs += page
    return {r.name: r.state.name for r in runs if r.task_key.startswith("pkt-")
            and not r.task_key.startswith("pkt-source-")}


@pytest.mark.slow  # PostgreSQL, Prefect's server, a worker and two test-size demos at once: minutes
@pytest.mark.ci
@pytest.mark.skipif(not _postgres_installed(), reason="PostgreSQL's initdb is not installed")
def test_a_deployment_on_a_worker_and_a_demo_beside_it_share_the_postgres_server(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pkt.flows.deploy import deploy

    # a folder PostgreSQL's own user can reach when the suite runs as root (pytest's tmp_path is private)
    folder = tempfile.mkdtemp(prefix="pkt-server-test-")
    os.chmod(folder, 0o711)
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
           "PKT_SERVER_DIR": f"{folder}/server", "PKT_SERVER_PORT": str(port), "PKT_PYTHON": sys.executable,
           "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    store, procs, logs = tmp_path / "store", [], {}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        url = re.search(r"export PREFECT_API_URL=(\S+)", up.stdout).group(1)
        assert url == f"http://127.0.0.1:{port}/api"
        env |= {"PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "2"}
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            assert deploy(ROOT, ["demo"], out=lambda *_: None) == ["demo/demo"]
            dep = client.read_deployment_by_name("demo/demo")

            def start(name, *argv):
                logs[name] = tmp_path / f"{name}.log"
                with open(logs[name], "w") as log:
                    procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
                return procs[-1]

            start("worker", "-m", "prefect", "worker", "start", "--pool", "pkt-process", "--limit", "1")
            params = {"size": "test", "seeds": [0], "store": str(store), "report_dir": str(tmp_path / "report-a")}
            run = client.create_flow_run_from_deployment(dep.id, parameters=params)
            demo = start("demo", "-m", "pkt.flows.cli", "demo", "--size", "test", "--seeds", "1", "--store", str(store),
                         "--report-dir", str(tmp_path / "report-b"))
            deadline = time.monotonic() + 1800
            while demo.poll() is None or not (state := client.read_flow_run(run.id).state).is_final():
                assert time.monotonic() < deadline, logs["worker"].read_text()[-3000:]
                time.sleep(5)
            assert demo.returncode == 0, logs["demo"].read_text()[-3000:]
            assert state.is_completed(), (state, logs["worker"].read_text()[-3000:])
            out = logs["demo"].read_text()
            computed, reused = map(int, re.search(r"(\d+) nodes computed, (\d+) reused", out).groups())
            mine = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["demo"]}),
                                         flow_run_filter=FlowRunFilter(id={"not_any_": [run.id]}))
            assert len(mine) == 1 and not mine[0].deployment_id
            expected = computed + reused  # the same graph in both runs (one store: each node computed once)
            deadline = time.monotonic() + 300  # the server records task runs from events, in batches
            while True:
                nodes = {r: _node_runs(client, r) for r in (run.id, mine[0].id)}
                done = all(len(n) == expected and set(n.values()) <= {"Completed", "Cached"} for n in nodes.values())
                if done or time.monotonic() > deadline:
                    break
                time.sleep(5)
            for r, n in nodes.items():
                assert len(n) == expected and set(n.values()) <= {"Completed", "Cached"}, (r, len(n), expected)
            assert nodes[run.id].keys() == nodes[mine[0].id].keys()
            # Prefect wrote them into PostgreSQL (not a SQLite file of its own)
            assert int(_sql(folder, "SELECT count(*) FROM task_run")) >= 2 * expected
        for name in ("demo", "worker"):
            assert "database is locked" not in logs[name].read_text(), name
        assert "database is locked" not in Path(f"{folder}/server/prefect.log").read_text()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        down = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)
        status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
        left = _ours(folder, port)
        psutil.wait_procs(left, timeout=30)  # PostgreSQL's last children exit just after pg_ctl returns
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(folder, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, [p.cmdline() for p in left]
    assert status.returncode == 3 and "prefect: stopped" in status.stdout and "postgresql: stopped" in status.stdout


def test_the_script_says_how_to_call_it():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "start|stop|status" in out.stderr
