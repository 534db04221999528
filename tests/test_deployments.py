"""prefect.yaml stays true to the flows: every entrypoint imports and its parameters validate."""
import importlib
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_points_at_a_flow_with_valid_parameters(tmp_path, monkeypatch):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(tmp_path)  # the sweep's typed config checks its task directory: give it one
    for name in ("train", "seeds", "test"):
        (tmp_path / "data/gsm").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"data/gsm/{name}.jsonl").write_text("")
    names = {d["name"] for d in spec["deployments"]}
    assert {"demo", "extract-teacher", "sweep", "nightly"} <= names
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        flow.validate_parameters(dep.get("parameters", {}))
        assert dep["work_pool"]["name"] == "pkt-process"
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"].count(" ") == 4 and nightly["schedules"][0].get("active", True)
    assert [d["name"] for d in spec["deployments"] if d.get("schedules")] == ["nightly"]  # scheduled: runs as shipped


def test_pkt_deploy_registers_this_checkout_and_a_worker_runs_from_it(prefect_env, tmp_path, monkeypatch, capsys):
    """`pkt deploy` read back through the Prefect API: every deployment of prefect.yaml, its flow,
    parameters, schedule, pool, and a pull step that changes into this checkout; running that pull
    step from elsewhere (as a worker does) makes the entrypoint load."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments.steps.core import run_steps
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.templating import apply_values

    from pkt.flows.cli import main
    from pkt.flows.deploy import pull_steps

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    monkeypatch.setenv("PWD", str(ROOT))  # what `prefect deploy` run from the root fills in
    assert apply_values(spec["pull"], {}) == pull_steps(ROOT)  # one pull step for both ways of deploying

    assert main(["deploy", "--checkout", str(ROOT), "--size", "test"]) == 0
    out = capsys.readouterr().out
    assert f"start in {ROOT}" in out and "-m prefect worker start --pool pkt-process" in out
    assert "deployment run 'demo/demo' --param size=test" in out  # the hint runs the family asked for
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("pkt-process").type == "process"
        for d in spec["deployments"]:
            flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
            dep = client.read_deployment_by_name(f"{flow.name}/{d['name']}")
            sized = {"size": "test"} if "size" in flow.parameters.properties else {}  # demo and nightly
            assert (dep.entrypoint, dep.work_pool_name, dep.parameters) == (d["entrypoint"], "pkt-process",
                                                                              d.get("parameters", {}) | sized)
            assert dep.pull_steps == pull_steps(ROOT)
            assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in d.get("schedules", [])]
            assert [s.active for s in dep.schedules] == [s.get("active", True) for s in d.get("schedules", [])]

    monkeypatch.chdir(tmp_path)  # a worker starts anywhere ...
    asyncio.run(run_steps(dep.pull_steps))
    assert Path.cwd() == ROOT  # ... and runs the flow from the checkout
    assert load_flow_from_entrypoint(dep.entrypoint).name == flow.name


def test_the_nightly_runs_on_the_family_the_store_holds(tmp_path, monkeypatch):
    """No size in prefect.yaml's nightly: it takes the family the store holds (the latest built), demo when
    it holds none; `pkt deploy`'s hint follows the same rule."""
    from pkt.artifacts.store import Store
    from pkt.flows.demo import built_size, family_sweep
    from pkt.flows.deploy import DeployError, family_size

    nightly = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    assert "size" not in nightly["parameters"] and family_sweep.parameters.properties["size"].get("default") is None
    monkeypatch.delenv("PKT_STORE", raising=False)
    store = Store(tmp_path / ".pkt/store")
    assert built_size(store) is None and family_size(tmp_path, None) == "demo"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/x").write_text("x")
    for i, size in enumerate(["demo", "test", "study"]):  # a study family is not one the nightly runs on
        store.put_tree("family", f"{i:064x}", tmp_path / "tree", params={"size": size}, inputs={})
        time.sleep(1.1)  # records are dated to the second
    assert built_size(store) == "test"
    assert family_size(tmp_path, None) == "test" and family_size(tmp_path, "demo") == "demo"
    with pytest.raises(DeployError, match="--size huge"):
        family_size(tmp_path, "huge")


def test_pkt_deploy_notify_creates_an_automation_for_failed_runs(prefect_env, capsys):
    """`pkt deploy --notify URL`: an automation, read back through the API, that fires on a failed or crashed
    flow run of the deployments it registered and sends to a webhook block at URL; a second deploy replaces it."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    from pkt.flows.cli import main

    for _ in range(2):
        assert main(["deploy", "--checkout", str(ROOT), "--name", "nightly", "--notify", "https://hooks.example/x"]) == 0
    assert "automation pkt-failed-runs" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("family-sweep/nightly")
        autos = [a for a in client.read_automations() if a.name == "pkt-failed-runs"]
    assert len(autos) == 1
    auto = Automation.read(name="pkt-failed-runs")
    assert auto.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.TimedOut", "prefect.flow-run.Crashed"}
    assert f"prefect.deployment.{dep.id}" in auto.trigger.match_related["prefect.resource.id"]
    (action,) = auto.actions
    block = CustomWebhookNotificationBlock.load("pkt-failed-runs")
    url = block.url.get_secret_value() if hasattr(block.url, "get_secret_value") else block.url
    assert url == "https://hooks.example/x"
    assert action.type == "send-notification" and action.block_document_id == block._block_document_id
    assert main(["deploy", "--checkout", str(ROOT), "--name", "nightly", "--notify", "hooks.example"]) == 2
    assert "--notify hooks.example: give the http(s) URL" in capsys.readouterr().err


def test_pkt_deploy_without_a_server_says_how_to_start_one(tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pkt.flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy", "--checkout", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err and "pkt ui" in err and len(err.strip().splitlines()) == 1
    assert main(["deploy", "--checkout", str(tmp_path)]) == 2
    assert "prefect.yaml: no such file" in capsys.readouterr().err


@pytest.mark.slow  # a real server, a worker and two flow runs of the test-size family: several minutes
def test_the_nightly_schedule_fires_on_the_built_family_and_its_second_run_computes_nothing(tmp_path):
    """prefect.yaml's scheduled deployment, registered by `pkt deploy` on a temporary server with its
    cron replaced by a short interval: a process worker runs two fired runs to Completed on inputs
    that exist without any preparation (the family is built or reused), and in the second every node
    is reused from the store (Cached), the teacher's extraction included."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from datetime import timedelta

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pkt.flows.deploy import deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    procs = []

    def start(*args):
        log = open(tmp_path / f"{args[0]}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(1)
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            assert deploy(ROOT, ["nightly"], out=lambda *_: None) == ["family-sweep/nightly"]
            dep = client.read_deployment_by_name("family-sweep/nightly")
            assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 2 * * *", True)]  # live as shipped
            # the same deployment, on a small family and a store of its own, firing every 20 s
            client.update_deployment(dep.id, DeploymentUpdate(parameters={
                **dep.parameters, "size": "test", "seeds": [0], "store": str(tmp_path / "store"),
                "report_dir": str(tmp_path / "report")}))
            client.delete_deployment_schedule(dep.id, dep.schedules[0].id)
            client.create_deployment_schedules(dep.id, [(IntervalSchedule(interval=timedelta(seconds=20)), True)])
            start("worker", "start", "--pool", "pkt-process", "--limit", "1")  # one run at a time
            flt = DeploymentFilter(id={"any_": [dep.id]})
            deadline = time.monotonic() + 1500
            while True:
                runs = client.read_flow_runs(deployment_filter=flt)
                done = sorted((r for r in runs if r.state and r.state.is_completed()), key=lambda r: r.start_time)
                bad = [r for r in runs if r.state and (r.state.is_failed() or r.state.is_crashed())]
                assert not bad, (bad[0].state, (tmp_path / "worker.log").read_text()[-3000:])
                if len(done) >= 2:
                    break
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(5)
            first, second = done[:2]
            assert second.start_time >= first.end_time  # fired apart, one after the other
            assert all(r.auto_scheduled for r in (first, second))

            def node_states(run):  # the server records task runs from events: read until two reads agree
                read = lambda: {t.name: t.state.name for t in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id={"any_": [run.id]}), limit=200)
                    if t.task_key.startswith("pkt-") and not t.task_key.startswith("pkt-source-")}
                before, now = None, read()
                while now != before:
                    time.sleep(3)
                    before, now = now, read()
                return now

            computed, reused = node_states(first), node_states(second)
            assert "Completed" in computed.values() and computed.keys() == reused.keys()
            assert set(reused.values()) == {"Cached"}, reused  # the second run computed no node
            assert any(name.startswith("extraction[") for name in reused)
    finally:
        for p in reversed(procs):  # worker first, then the server
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
