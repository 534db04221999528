"""The main job end to end at the test size, through Prefect: results, reuse, and the graph the UI draws."""
import math
import shutil

import pandas as pd

from pkt.flows.demo import ALL_VARIANTS, demo
from pkt.flows.variants import VARIANTS
from prefect_api import task_graph, task_names

LATEN_VARIANTS = [v for v in ALL_VARIANTS if VARIANTS[v].chain == "laten"]
PEFT_INITS = [v for v in ALL_VARIANTS if VARIANTS[v].init in ("lora", "pissa")]  # no lora_init node
UNTRAINED = [v for v in ALL_VARIANTS if not VARIANTS[v].trains]  # scored as they are (vanilla, teacher)
FRESH = [v for v in ALL_VARIANTS if VARIANTS[v].chain == "fresh"]  # a new student pretrained, scored as a model


def check_edges(graph: dict, variants=ALL_VARIANTS, seeds: int = 2) -> None:
    """Exactly the true dependencies, no more: family -> the models and data taken from it; teacher ->
    sensitivity -> plan -> extraction -> init -> adapter -> scores -> report (and init -> diagnostic);
    LaTen's attribution (model, train file) -> translator (teacher, student, train file, the extract
    samples' attributions) -> delta (teacher, translator, the seed sample's two attributions) -> scores;
    each node with the models and data it read."""
    kind = lambda name: name.split("[")[0]
    fam = ["family"] if any(kind(n) == "family" for n in graph) else []  # a sweep on a family built elsewhere
    for name, (_, ups) in graph.items():
        teacher = "random_model" if "untrained" in name else "model"
        # what a layer selector and a reducer read: evenly spaced layers read only the teacher's depth,
        # block influence the activations; weight selection reads no scores, subcloning the activations
        plan = ([teacher] if ", evenly-spaced" in name else ["activations"] if ", block-influence" in name
                else ["sensitivity"])
        cut = [] if ", weight-selection" in name else ["activations"] if ", subcloning" in name else ["sensitivity"]
        expected = {"sensitivity": [teacher, "file"], "activations": [teacher, "file"], "layer_plan": plan,
                    "extraction": [teacher, "layer_plan", *cut], "lora_init": ["extraction"],
                    "random_model": ["model"], "adapter": ["model", "file"], "scores": ["model", "dir"],
                    "diagnostic": ["model", "file"], "kd_adapter": ["model", "model", "dir"],
                    "teacher_completions": ["model", "dir"], "adapter_checkpoint": ["adapter"],
                    "laten_attribution": ["model", "file"], "laten_translator": [],  # below
                    "laten_delta": ["model", "laten_translator", "laten_attribution", "laten_attribution"],
                    "report": ["scores"] * sum(kind(n) == "scores" for n in graph),
                    "fresh_init": ["model", "model"], "fresh_student": ["model"],
                    "model": fam, "file": fam, "dir": fam, "family": []}.get(kind(name))
        assert expected is not None, f"a node of an unexpected kind: {name}"
        if kind(name) == "laten_translator":  # two attributions (teacher, student) per extract sample
            n_attr = sum(kind(u) == "laten_attribution" for u in ups)
            assert n_attr >= 2 and n_attr % 2 == 0, (name, ups)
            expected = ["model", "model", "file"] + ["laten_attribution"] * n_attr
        if kind(name) == "adapter" and ", seq-kd, " in name:  # trained on the teacher's completions
            expected = ["model", "teacher_completions"]
        elif kind(name) in ("adapter", "diagnostic") and not any(f", {v}, " in name for v in PEFT_INITS):
            expected = expected + ["lora_init"]
        if kind(name) == "fresh_student" and ", random-student, " not in name:  # from the teacher's selection
            expected = expected + ["fresh_init"]
        if kind(name) == "scores" and any(f", {v}, " in name for v in FRESH):  # the fresh student, not the student
            expected = ["fresh_student", "dir"]
        elif kind(name) == "scores" and not any(f", {v}, " in name for v in UNTRAINED):
            expected = expected + ["laten_delta" if any(f", {v}, " in name for v in LATEN_VARIANTS) else
                                   "kd_adapter" if ", kd, " in name and ", step " not in name else
                                   "adapter_checkpoint" if ", step " in name else "adapter"]
        assert sorted(kind(u) for u in ups) == sorted(expected), (name, ups)
    adapters = [n for n in graph if kind(n) == "adapter"]
    assert len(adapters) == seeds * sum(VARIANTS[v].chain in ("adapter", "seq-kd") and VARIANTS[v].trains
                                        for v in variants)
    deltas = [n for n in graph if kind(n) == "laten_delta"]
    assert len(deltas) >= seeds * sum(VARIANTS[v].chain == "laten" for v in variants)
    for name in adapters:  # the oracle trains on the split it is scored on; seq-kd on the teacher's completions
        split = "test" if ", oracle, " in name else "train"
        train = "teacher_completions" if ", seq-kd, " in name else f"file[gsm/{split}.jsonl]"
        assert {"model[student]"} <= set(graph[name][1]) and any(u.startswith(train) for u in graph[name][1]), name
    (_, (_, ups)), = [(n, v) for n, v in graph.items() if kind(n) == "report"]
    assert sorted(ups) == sorted(n for n in graph if kind(n) == "scores")
    if fam:
        (family, _), = [(n, v) for n, v in graph.items() if kind(n) == "family"]
        assert {n for n, (_, ups) in graph.items() if family in ups} == {
            n for n in graph if kind(n) in ("model", "file", "dir")}  # every model and task file came from it


def check_task_names(state) -> None:
    """Each node kind (and source kind) is its own Prefect task: the UI's task filter finds one kind."""
    names = task_names(state)
    assert {run.split("[")[0] for run in names} == set(names.values()) >= {
        "family", "model", "file", "dir", "sensitivity", "layer_plan", "extraction", "lora_init", "adapter",
        "scores", "report", "random_model"}
    assert all(run.split("[")[0] == task for run, task in names.items())


def check_store_search(store: str) -> None:
    """The demo's store answers what a person asks of it: the transfer adapter of seed 1, its scores,
    and the LoRA init for this student from this teacher (issue 19, item 5)."""
    import contextlib
    import io

    from pkt.artifacts.store import Store
    from pkt.flows import cli

    def main(argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0, argv
        return out.getvalue()

    records = Store(store).records()
    (line, count) = main(["store", "find", "--variant", "transfer", "--seed", "1", "--kind", "adapter", "--store",
                          store]).splitlines()
    adapter = next(r for r in records if r["key"] == line.split()[1])
    assert adapter["label"] == "adapter[student, gsm, transfer, seed=1]" and count.startswith("1 artifacts")
    assert adapter["about"]["variant"] == "transfer" and adapter["about"]["seed"] == 1
    assert adapter["about"]["student"].endswith("/student") and adapter["about"]["teacher"].endswith("/teacher")
    found = main(["store", "find", "--teacher", "teacher", "--student", "student", "--variant", "transfer",
                  "--kind", "lora_init", "--store", store])
    inits = [line.split()[1] for line in found.splitlines()[:-1]]
    init_digest = adapter["inputs"]["init"]
    # the init it trained from (and any other init of the very same bytes: at the test size the random
    # layers can be the sensitive ones, and an adapter cites its init by digest)
    found = [r for r in records if r["key"] in inits]
    assert {r["digest"] for r in found} == {init_digest}
    assert any(", sensitivity, submatrix, " in r["label"] for r in found)
    assert adapter["label"] in main(["store", "show", init_digest, "--store", store])  # its lineage down
    family = [r for r in records if r["kind"] == "family"]
    assert len(family) == 1 and family[0]["label"] == "family[size=test]"


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
    assert {v: r["n"] for v, r in nll.items()} == {v: 2 if VARIANTS[v].trains else 1 for v in ALL_VARIANTS}
    assert "diff" in nll["transfer"] and math.isfinite(nll["transfer"]["diff"])
    for metric in {r["metric"] for r in rows}:  # LaTen's whole path with nothing injected is the student
        by = {r["variant"]: r["mean"] for r in rows if r["metric"] == metric}
        assert by["laten-zero"] == by["vanilla"], metric
    for name in ("report.md", "summary.csv", "runs.csv", "report.png"):
        assert (report_dir / name).stat().st_size > 0
    text = (report_dir / "report.md").read_text()
    assert "transfer" in text and "lora" in text
    graph = task_graph(state)
    check_edges(graph)
    check_task_names(state)
    check_store_search(store)
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
