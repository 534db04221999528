"""`pkt deploy`: register prefect.yaml's deployments for one checkout with a Prefect server.

Each deployment's pull step changes into the checkout's absolute path, so a worker runs its
flows from there: the entrypoints and every relative path in the parameters (models/...,
data/..., the default store .pkt/store) are read from that directory on the worker's machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pkt.core.errors import UserError

PULL_STEP = "prefect.deployments.steps.set_working_directory"


class DeployError(UserError, ValueError):
    pass


def pull_steps(checkout: Path) -> list[dict]:
    """What every flow run of these deployments does first, on the worker: chdir into the checkout."""
    return [{PULL_STEP: {"directory": str(checkout.resolve())}}]


def read_spec(checkout: Path) -> dict:
    path = checkout / "prefect.yaml"
    if not path.is_file():
        raise DeployError(f"{path}: no such file; run `pkt deploy` from the root of a pkt checkout (or pass "
                          "--checkout DIR)")
    return yaml.safe_load(path.read_text())


def check_api_url(api: str) -> None:
    """PREFECT_API_URL is an http(s) URL with a Prefect server answering there, before anything is registered."""
    from urllib.parse import urlparse

    from prefect.client.orchestration import get_client

    parsed = urlparse(api)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DeployError(f"PREFECT_API_URL {api!r} is not an http(s) URL; set it to the server's API, e.g. "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        why = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
        raise DeployError(f"PREFECT_API_URL {api}: no Prefect server answers there ({why}); start `pkt ui` in "
                          "another terminal, or point PREFECT_API_URL at a running server")


def deploy(checkout: Path, names: list[str] | None = None, out=print) -> list[str]:
    """Register (create or update) the deployments; returns their 'flow/deployment' names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import get_current_settings
    from prefect.utilities.callables import parameter_schema

    checkout = checkout.resolve()
    spec = read_spec(checkout)
    api = get_current_settings().api.url
    if not api:
        raise DeployError("PREFECT_API_URL is not set, so there is no server to register deployments with; start "
                          "`pkt ui` in another terminal and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    check_api_url(api)
    chosen = [d for d in spec["deployments"] if not names or d["name"] in names]
    unknown = sorted(set(names or []) - {d["name"] for d in spec["deployments"]})
    if unknown:
        raise DeployError(f"--name {', '.join(unknown)}: not in {checkout / 'prefect.yaml'}; deployments there: "
                          f"{', '.join(d['name'] for d in spec['deployments'])}")
    done, pools = [], set()
    with get_client(sync_client=True) as client:
        for d in chosen:
            pool = d["work_pool"]["name"]
            if pool not in pools:
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                pools.add(pool)
            flow = load_flow_from_entrypoint(str(checkout / d["entrypoint"]))
            schedules = [DeploymentScheduleCreate(schedule=CronSchedule(cron=s["cron"], timezone=s.get("timezone")),
                                                  active=s.get("active", True)) for s in d.get("schedules", [])]
            client.create_deployment(
                flow_id=client.create_flow(flow), name=d["name"], entrypoint=d["entrypoint"],
                work_pool_name=pool, parameters=d.get("parameters", {}), description=d.get("description"),
                schedules=schedules, pull_steps=pull_steps(checkout), enforce_parameter_schema=True,
                parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi())
            done.append(f"{flow.name}/{d['name']}")
            out(f"registered {done[-1]} (pool {pool})")
    python = sys.executable
    out(f"\nFlow runs of these deployments start in {checkout} on the worker's machine: entrypoints and relative "
        "paths in their parameters are read from there.\nStart a worker on a machine that has this checkout at that "
        f"path and pkt installed:\n  export PREFECT_API_URL={api}")
    for p in sorted(pools):
        out(f"  {python} -m prefect worker start --pool {p}")
    if done:
        out(f"then start a run, e.g.: {python} -m prefect deployment run '{done[0]}'")
    return done
