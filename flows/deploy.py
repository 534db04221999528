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


SIZED = "size"  # the parameter of the flows that run on the miniature family (demo, nightly)


def family_size(checkout: Path, size: str | None) -> str:
    """The family size the deployments run on: --size, else the one the default store holds (what the user
    built: `pkt demo --size test` builds the test family), else demo."""
    from pkt.artifacts.store import Store, default_root

    from .demo import built_size

    if size is not None:
        if size not in ("demo", "test"):
            raise DeployError(f"--size {size}: the miniature family comes in demo or test; give one of them")
        return size
    root = Path(default_root())
    return built_size(Store(root if root.is_absolute() else checkout / root)) or "demo"


def with_size(d: dict, flow, size: str | None) -> dict:
    """A deployment's parameters, its family size set to `size` where its flow takes one."""
    params = dict(d.get("parameters", {}))
    if size is not None and SIZED in flow.parameters.properties:
        params[SIZED] = size
    return params


NOTIFY_BLOCK = "pkt-failed-runs"  # the webhook block and the automation pkt deploy --notify creates
NOTIFY_BODY = ("Flow run {{ flow_run.name }} of deployment {{ deployment.name }} ended {{ flow_run.state.name }}: "
               "{{ flow_run.state.message }}")


def notify_failures(url: str, deployment_ids: list, out=print) -> None:
    """An automation that posts to `url` (a webhook: Slack, Teams, ntfy, your own) when a flow run of these
    deployments fails or crashes; registered again (replaced) by each `pkt deploy --notify`."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    if not url.startswith(("http://", "https://")):
        raise DeployError(f"--notify {url}: give the http(s) URL of a webhook, e.g. a Slack incoming webhook")
    block = CustomWebhookNotificationBlock(name=NOTIFY_BLOCK, url=url,
                                           json_data={"text": "{{subject}}: {{body}}"})
    block_id = block.save(NOTIFY_BLOCK, overwrite=True)
    try:
        Automation.read(name=NOTIFY_BLOCK).delete()
    except ValueError:  # none yet
        pass
    # events are named for the state's name: a run that a node's --timeout ended is TimedOut (a Failed state)
    trigger = EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.TimedOut", "prefect.flow-run.Crashed"},
                           posture=Posture.Reactive,
                           threshold=1, match_related={"prefect.resource.role": "deployment", "prefect.resource.id":
                                                       [f"prefect.deployment.{i}" for i in deployment_ids]})
    Automation(name=NOTIFY_BLOCK, description="pkt: a deployment's flow run failed or crashed", trigger=trigger,
               actions=[SendNotification(block_document_id=block_id, subject="pkt: a deployment run failed",
                                         body=NOTIFY_BODY)]).create()
    out(f"automation {NOTIFY_BLOCK}: a failed or crashed run of these deployments posts to {url}")


def deploy(checkout: Path, names: list[str] | None = None, out=print, size: str | None = None,
           notify: str | None = None) -> list[str]:
    """Register (create or update) the deployments; returns their 'flow/deployment' names. size: the family
    size of the deployments on the miniature family (default: theirs in prefect.yaml; the nightly's
    default is the family the store holds)."""
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
    done, pools, ids = [], set(), []
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
            ids.append(client.create_deployment(
                flow_id=client.create_flow(flow), name=d["name"], entrypoint=d["entrypoint"],
                work_pool_name=pool, parameters=with_size(d, flow, size), description=d.get("description"),
                schedules=schedules, pull_steps=pull_steps(checkout), enforce_parameter_schema=True,
                parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi()))
            done.append(f"{flow.name}/{d['name']}")
            out(f"registered {done[-1]} (pool {pool})")
    if notify:
        notify_failures(notify, ids, out)
    python = sys.executable
    out(f"\nFlow runs of these deployments start in {checkout} on the worker's machine: entrypoints and relative "
        "paths in their parameters are read from there.\nStart a worker on a machine that has this checkout at that "
        f"path and pkt installed:\n  export PREFECT_API_URL={api}")
    for p in sorted(pools):
        out(f"  {python} -m prefect worker start --pool {p}")
    if done:
        first = next((n for n in done if n == "demo/demo"), done[0])
        hint = f" --param size={family_size(checkout, size)}" if first == "demo/demo" else ""
        out(f"then start a run, e.g.: {python} -m prefect deployment run '{first}'{hint}")
    return done
