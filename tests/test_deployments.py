"""prefect.yaml stays true to the flows: every entrypoint imports and its parameters validate."""
import importlib
from pathlib import Path

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
    assert {"demo", "extract-teacher", "sweep"} <= names
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        flow.validate_parameters(dep.get("parameters", {}))
        assert dep["work_pool"]["name"] == "pkt-process"
    sweep = next(d for d in spec["deployments"] if d["name"] == "sweep")
    assert sweep["schedules"][0]["cron"].count(" ") == 4


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

    assert main(["deploy", "--checkout", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert f"start in {ROOT}" in out and "-m prefect worker start --pool pkt-process" in out
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("pkt-process").type == "process"
        for d in spec["deployments"]:
            flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
            dep = client.read_deployment_by_name(f"{flow.name}/{d['name']}")
            assert (dep.entrypoint, dep.work_pool_name, dep.parameters) == (d["entrypoint"], "pkt-process",
                                                                              d.get("parameters", {}))
            assert dep.pull_steps == pull_steps(ROOT)
            assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in d.get("schedules", [])]
            assert [s.active for s in dep.schedules] == [s.get("active", True) for s in d.get("schedules", [])]

    monkeypatch.chdir(tmp_path)  # a worker starts anywhere ...
    asyncio.run(run_steps(dep.pull_steps))
    assert Path.cwd() == ROOT  # ... and runs the flow from the checkout
    assert load_flow_from_entrypoint(dep.entrypoint).name == flow.name


def test_pkt_deploy_without_a_server_says_how_to_start_one(tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pkt.flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy", "--checkout", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err and "pkt ui" in err and len(err.strip().splitlines()) == 1
    assert main(["deploy", "--checkout", str(tmp_path)]) == 2
    assert "prefect.yaml: no such file" in capsys.readouterr().err
