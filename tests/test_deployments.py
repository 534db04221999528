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
