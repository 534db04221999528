"""The study: every variant over 5 training seeds, a grid of 2 learning rates x 3 init scales
(each variant at its best setting on val), on eight independently built miniature families (two
depth ratios) and the tasks of pkt.core.mini.tasks.study_tasks (teacher-only facts, shared facts,
addition). `pkt demo --study` runs it; a re-run computes nothing.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow

from pkt.artifacts.store import Ref, Store
from pkt.core import report
from pkt.core.mini import tasks
from pkt.tasks import nodes

from .config import parse_config
from .demo import ALL_VARIANTS, family_node, family_stats
from .graph import Graph, task_runner, torch_threads_per_worker
from .summary import publish
from .sweep import copy_report, run_sweep

STUDY_TRAIN = {"rank": 4, "alpha": 8.0, "epochs": 2, "batch_size": 32, "micro_batch": 32, "n_train": 256,
               "max_length": 96}
STUDY_GRID = {"lr": [3e-3, 1e-2], "init_scale": [0.5, 1.0, 2.0]}
STUDY_SEEDS = [0, 1, 2, 3, 4]
FAMILY_SEEDS = list(range(8))  # seed s: depths family.STUDY_DEPTHS[s % 2] (6->2, 8->2 layers)
PRIMARY = "exact_match/strict-match"


def study_config(family_root: str, seeds: list[int], store: str | None, report_dir: str) -> dict:
    """The sweep of one family: its study tasks, every variant, the grid, val selection
    on the answer NLL (exact match at this size is mostly 0 on val: it cannot rank settings)."""
    root = Path(family_root)
    return {"teacher": str(root / "teacher"), "students": [str(root / "student")],
            "tasks": tasks.study_tasks(root),
            "variants": ALL_VARIANTS, "seeds": list(seeds), "early_teacher": str(root / "teacher-early"),
            "cross_task_seeds": str(root / "tasks" / "sni" / "seeds.jsonl"), "train": STUDY_TRAIN,
            "train_grid": STUDY_GRID, "select_on": "answer_nll", "benchmarks": ["answer_nll"], "max_length": 96,
            "report_dir": report_dir, **({"store": store} if store else {})}


@flow(name="study", log_prints=True)
def study(store: str | None = None, report_dir: str = "pkt-study", family_seeds: list[int] = FAMILY_SEEDS,
          seeds: list[int] = STUDY_SEEDS, workers: int = 2) -> dict:
    """One sweep per family (each with its report under report_dir/family-<seed>), then one report
    over both, the families told apart as family-<seed>-student. Runs on a local process pool."""
    st = Store(store)
    runs, curves, families = [], [], {}
    with task_runner("processes", workers) as runner:
        graph = Graph(st, runner, torch_threads_per_worker("processes", workers))
        for fseed in family_seeds:
            fam = family_node(graph, "study", fseed)
            cfg = parse_config(study_config(str(st.tree(Ref.of(fam))), seeds, store,
                                            str(Path(report_dir) / f"family-{fseed}")))
            out = run_sweep(graph, cfg, "study", f"family-{fseed}")
            name = f"family-{fseed}-student"
            runs.append(report.read_csv(out["report"]["runs"]).assign(student=name))
            if "curves" in out["report"]:
                curves.append(report.read_csv(out["report"]["curves"]).assign(student=name))
            families[fseed] = family_stats(st, fam)
        table = pd.concat(runs, ignore_index=True)
        inputs = {"runs": nodes.table_source(st, table, "runs.csv"),
                  "scores": [graph.futures[i] for i, kind in graph.kinds.items() if kind == "scores"]}
        if curves:
            inputs["curves"] = nodes.table_source(st, pd.concat(curves, ignore_index=True), "curves.csv")
        rep = graph.submit(nodes.Report(primary=PRIMARY), inputs, f"study, {len(table)} rows")
        paths = copy_report(st, rep.result(), report_dir)
        results = graph.results()
    summary = report.read_csv(paths["csv"])
    lines = report.headlines(summary, PRIMARY) + ["knowledge vs size:"] + [
        "  " + line for m in (PRIMARY, "acc", "answer_nll") for line in report.knowledge_vs_size(summary, m)]
    publish(st, "study", results, tag="all", summary=summary, paths=paths, headlines=lines)
    return {"report": {k: str(v) for k, v in paths.items()},
            "computed": sum(r["status"] == "computed" for r in results),
            "nodes": [(r["kind"], r["key"], r["status"]) for r in results], "table": summary.to_dict(orient="records"),
            "headline": lines, "families": families}
