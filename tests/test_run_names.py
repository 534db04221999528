"""Flow runs are named from the command and its parameters, as the UI lists them."""
from prefect import flow

from pkt.flows import demo, names, sweep


def test_names_say_the_command_and_the_parameters_that_tell_runs_apart():
    assert names.describe("demo", {"size": "test", "seeds": [0, 1]}, ("size",)) == "demo[size=test]"
    assert names.describe("transfer", {"student": "/m/student", "task_dir": "data/gsm"}, ("student", "task_dir")) \
        == "transfer[student=student, task_dir=gsm]"
    assert names.describe("family-sweep", {"size": None}, ("size",)) == "family-sweep[]"
    assert sweep._config_name({"name": "mine"}) == "invalid"  # no teacher: the run reports the error itself


def test_each_flow_names_its_runs():
    """Every flow in flows/ (found by import, so a new one is checked too), the study's included."""
    import importlib
    import pkgutil

    from prefect import Flow

    import pkt.flows

    found = {}
    for mod in pkgutil.iter_modules(pkt.flows.__path__):
        for obj in vars(importlib.import_module(f"pkt.flows.{mod.name}")).values():
            if isinstance(obj, Flow):
                found[obj.name] = obj
    assert {"demo", "sweep", "study", "extract-teacher"} <= set(found)
    for f in found.values():
        assert callable(f.flow_run_name), f.name


def test_a_run_gets_its_name_from_its_parameters(prefect_env):
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    @flow(flow_run_name=names.run_name("demo", "size"))
    def named(size: str = "demo", seeds: list[int] = (0,)):
        return get_run_context().flow_run.id

    run_id = named(size="test")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).name == "demo[size=test]"
