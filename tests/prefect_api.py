"""Reading a flow run's task runs back through the Prefect API, as the UI does."""


def task_graph(state) -> dict[str, tuple[str, list[str]]]:
    """task-run name -> (state name, names of the task runs it read), read back through the Prefect API."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import TaskRunSort

    def read_all():
        runs, flt = [], FlowRunFilter(id={"any_": [state.state_details.flow_run_id]})
        with get_client(sync_client=True) as client:
            while page := client.read_task_runs(flow_run_filter=flt, sort=TaskRunSort.ID_DESC, limit=200,
                                                offset=len(runs)):
                runs += page
        return runs

    # the server records task runs from events, in batches: read until two reads agree
    runs, before = read_all(), None
    while before is None or [(r.id, r.state_name) for r in runs] != before:
        before = [(r.id, r.state_name) for r in runs]
        time.sleep(2)
        runs = read_all()
    names = [r.name for r in runs]
    assert len(names) == len(set(names)), "two task runs of one flow run share a name"
    by_id = {r.id: r.name for r in runs}
    return {r.name: (r.state.name, [by_id[i.id] for inputs in r.task_inputs.values() for i in inputs
                                    if getattr(i, "id", None) in by_id]) for r in runs}


def task_names(state) -> dict[str, str]:
    """task-run name -> the name of its task (what the UI's filter by task lists), read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    runs, flt = [], FlowRunFilter(id={"any_": [state.state_details.flow_run_id]})
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(flow_run_filter=flt, limit=200, offset=len(runs)):
            runs += page
    return {r.name: r.task_key.removeprefix("pkt-").removeprefix("source-") for r in runs}
