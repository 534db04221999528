"""The main job end to end at the test size, through Prefect: results, reuse, and the graph the UI draws."""
import math
import shutil

import pandas as pd

from pkt.flows.demo import ALL_VARIANTS, demo
from prefect_api import task_graph


def check_edges(graph: dict) -> None:
    """Exactly the true dependencies, no more: teacher -> sensitivity -> plan -> extraction -> init ->
    adapter -> scores -> report, each node with the models and data it read."""
    kind = lambda name: name.split("[")[0]
    for name, (_, ups) in graph.items():
        teacher = "random_model" if "untrained" in name else "model"
        expected = {"sensitivity": [teacher, "file"], "layer_plan": ["sensitivity"],
                    "extraction": [teacher, "sensitivity", "layer_plan"], "lora_init": ["extraction"],
                    "random_model": ["model"], "adapter": ["model", "file"], "diagnostic": ["model", "file"],
                    "scores": ["model", "dir"],
                    "report": ["scores"] * sum(kind(n) == "scores" for n in graph)}.get(kind(name), [])
        if kind(name) in ("adapter", "diagnostic") and not any(f", {v}, " in name for v in ("lora", "pissa")):
            expected = expected + ["lora_init"]
        if kind(name) == "scores" and ", vanilla, " not in name:
            expected = expected + ["adapter"]
        assert sorted(kind(u) for u in ups) == sorted(expected), (name, ups)
    adapters = [n for n in graph if kind(n) == "adapter"]
    assert len(adapters) == 2 * (len(ALL_VARIANTS) - 1)
    for name in adapters:
        assert {"model[student]", "file[gsm/train.jsonl]"} <= set(graph[name][1]), name
    (_, (_, ups)), = [(n, v) for n, v in graph.items() if kind(n) == "report"]
    assert sorted(ups) == sorted(n for n in graph if kind(n) == "scores")


def test_demo_end_to_end_then_fully_reused(prefect_env, tmp_path):
    store, report_dir = str(tmp_path / "store"), tmp_path / "report"
    state = demo(size="test", seeds=[0, 1], store=store, report_dir=str(report_dir), return_state=True)
    first = state.result()
    rows = first["table"]
    gsm = [r for r in rows if r["metric"] == "exact_match/strict-match"]
    assert sorted(r["variant"] for r in gsm) == sorted(ALL_VARIANTS)
    assert all(math.isfinite(r["mean"]) for r in rows)
    nll = {r["variant"]: r for r in rows if r["metric"] == "answer_nll"}
    assert set(nll) == set(ALL_VARIANTS)
    assert {v: r["n"] for v, r in nll.items()} == {v: 1 if v == "vanilla" else 2 for v in ALL_VARIANTS}
    assert "diff" in nll["transfer"] and math.isfinite(nll["transfer"]["diff"])
    for name in ("report.md", "summary.csv", "runs.csv", "report.png"):
        assert (report_dir / name).stat().st_size > 0
    text = (report_dir / "report.md").read_text()
    assert "transfer" in text and "lora" in text
    graph = task_graph(state)
    check_edges(graph)
    assert {s for n, (s, _) in graph.items() if not n.startswith(("model[", "file[", "dir["))} == {"Completed"}

    drawn = {f.name: f.read_bytes() for f in report_dir.iterdir()}
    shutil.rmtree(report_dir)  # the report is a store node too: a rerun puts it back, drawing nothing
    state = demo(size="test", seeds=[0, 1], store=store, report_dir=str(report_dir), return_state=True)
    second = state.result()
    assert second["computed"] == 0 and second["family"]["status"] == "reused"
    assert ("report", "reused") in {(kind, status) for kind, _, status in second["nodes"]}
    assert {f.name: f.read_bytes() for f in report_dir.iterdir()} == drawn
    pd.testing.assert_frame_equal(pd.DataFrame(second["table"]), pd.DataFrame(first["table"]))
    cached = task_graph(state)
    check_edges(cached)  # a cached run draws the same graph
    assert cached.keys() == graph.keys()
    assert {s for n, (s, _) in cached.items() if not n.startswith(("model[", "file[", "dir["))} == {"Cached"}
