"""Cached work answered where it is (issue 25, item 2) and --recompute (item 4): a node the store holds
never goes to the task runner, and a recompute computes the nodes of the named kinds and every node
below them, counted by kind."""
import collections

import pytest
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from pkt.flows import cli, graph
from pkt.flows.extract import extract_teacher
from prefect_api import task_graph


@pytest.fixture
def shipped(monkeypatch):
    """Task name -> how many task runs the flows' runners were handed."""
    counts = collections.Counter()
    submit = graph.StoppableThreads.submit

    def counting(self, task, *a, **kw):
        counts[task.name] += 1
        return submit(self, task, *a, **kw)

    monkeypatch.setattr(graph.StoppableThreads, "submit", counting)
    return counts


def args(mini_family, store):
    return dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0, store=str(store))


def statuses(out) -> dict[str, str]:
    return {kind: status for kind, _, status in out["_ledger"]}


def test_only_nodes_to_compute_reach_the_task_runner(prefect_env, mini_family, tmp_path, shipped):
    first = extract_teacher(**args(mini_family, tmp_path / "store"))
    assert shipped == collections.Counter(kind for kind, _, _ in first["_ledger"])  # sources are read in the flow
    shipped.clear()
    state = extract_teacher(**args(mini_family, tmp_path / "store"), return_state=True)
    assert shipped == {} and set(statuses(state.result()).values()) == {"reused"}
    runs = task_graph(state)  # yet every node is in the run, Cached, with its edges
    assert {s for n, (s, _) in runs.items() if not n.startswith(("model[", "file["))} == {"Cached"}
    assert sorted(runs[next(n for n in runs if n.startswith("extraction["))][1]) == [
        next(n for n in runs if n.startswith("layer_plan[")), "model[teacher]",
        next(n for n in runs if n.startswith("sensitivity["))]


def test_recompute_computes_a_kind_and_everything_below_it(prefect_env, mini_family, tmp_path, monkeypatch, shipped):
    extract_teacher(**args(mini_family, tmp_path / "store"))
    monkeypatch.setenv("PKT_RECOMPUTE", "layer_plan")
    out = statuses(extract_teacher(**args(mini_family, tmp_path / "store")))
    assert out == {"sensitivity": "reused", "layer_plan": "computed", "extraction": "computed",
                   "lora_init": "computed", "residual_model": "computed"}
    monkeypatch.setenv("PKT_RECOMPUTE", "all")
    assert set(statuses(extract_teacher(**args(mini_family, tmp_path / "store"))).values()) == {"computed"}
    monkeypatch.delenv("PKT_RECOMPUTE")
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):  # Prefect's own switch means all
        assert set(statuses(extract_teacher(**args(mini_family, tmp_path / "store"))).values()) == {"computed"}
    assert set(statuses(extract_teacher(**args(mini_family, tmp_path / "store"))).values()) == {"reused"}


def test_a_recompute_of_an_unknown_kind_is_one_sentence(mini_family, tmp_path, capsys):
    code = cli.main(["extract", "--teacher", str(mini_family / "teacher"), "--seeds",
                     str(mini_family / "tasks/gsm/seeds.jsonl"), "--student", str(mini_family / "student"),
                     "--store", str(tmp_path / "store"), "--recompute", "adaptr"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("pkt extract: error: --recompute adaptr: adaptr is not a node kind;") and "adapter" in err
    assert not (tmp_path / "store").exists()  # refused before any work
