"""The miniature family and the demo: the main job on the embedded defaults."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import flow

from pkt.artifacts.store import Ref, Store
from pkt.core.mini import family, gates
from pkt.tasks import family as family_nodes

from .config import parse_config
from .graph import Graph, task_runner, torch_threads_per_worker
from .names import run_name
from .summary import publish
from .sweep import run_sweep
from .variants import VARIANTS

Size = Literal["demo", "test", "study"]

DEMO_TRAIN = {
    "demo": {"rank": 8, "alpha": 8.0, "lr": 1e-2, "epochs": 6, "batch_size": 64, "micro_batch": 64, "n_train": 512,
             "max_length": 64},
    "test": {"rank": 2, "alpha": 2.0, "lr": 1e-2, "epochs": 1, "batch_size": 16, "micro_batch": 16, "n_train": 32,
             "max_length": 64},
}
DEMO_LATEN = {  # LaTen's translator steps (extract samples) and align pool at each size; the authors': 20, 80, 15
    "demo": {"n_extract": 8, "n_align": 32, "align_per_step": 7},
    "test": {"n_extract": 2, "n_align": 4, "align_per_step": 2},
}
ALL_VARIANTS = list(VARIANTS)
SMOKE_CAVEAT = ("This is a smoke-size run (one small family, one task, one learning rate and init scale, {seeds} "
                "seeds): it shows the pipeline works, not whether transfer helps. For that, run `pkt demo --study`.")


def family_future(graph: Graph, size: str, seed: int | None = None, testbed: int | None = None, twin: bool = False):
    """The future of the family's build (or reuse from the store); another seed is an independent family.
    testbed and twin: family.recipe's (None: the size's testbed)."""
    spec = family_nodes.Family(size=size, recipe=family.recipe_params(size, seed, testbed, twin))
    return graph.submit(spec, {}, f"size={size}" + ("" if seed is None else f", seed={seed}")
                        + ("" if testbed is None else f", testbed={testbed}") + (", twin" if twin else ""))


def family_node(graph: Graph, size: str, seed: int | None = None, future=None, **recipe) -> dict:
    """The family's ref, once built (`future`: its family_future, when already submitted; recipe:
    family_future's testbed and twin)."""
    future = future or family_future(graph, size, seed, **recipe)
    ref = future.result()
    graph.provides(graph.store.tree(Ref.of(ref)), future)  # its models and task files link to it in the graph
    return ref


def built_size(store: Store) -> str | None:
    """The size of the miniature family the store holds, demo or test (the latest built, where it holds
    both); None when it holds neither."""
    built = [r for r in store.records() if r["kind"] == "family" and "broken_record" not in r
             and r.get("params", {}).get("size") in ("demo", "test")]
    return max(built, key=lambda r: r.get("created", ""))["params"]["size"] if built else None


def family_stats(store: Store, ref: dict) -> dict:
    return json.loads((store.tree(Ref.of(ref)) / "family_stats.json").read_text())


def _stats_lines(stats: dict) -> list[str]:
    return [f"{who}: {stats[who]['params']:,} params, {stats[who]['steps']} steps" for who in ("teacher", "student")
            ] + gates.gate_lines(stats)


@flow(name="build-family", log_prints=True, flow_run_name=run_name("build-family", "size", "seed"))
def build_family(size: Size = "demo", store: str | None = None, seed: int | None = None) -> dict:
    """Pretrain (or reuse) the miniature teacher/student family; returns paths inside the store."""
    st = Store(store)
    with task_runner() as runner:
        graph = Graph(st, runner)
        ref = family_node(graph, size, seed)
    stats = family_stats(st, ref)
    for line in _stats_lines(stats):
        print(line)
    publish(st, "build-family", [ref], tag=size, notes=_stats_lines(stats))
    return {"root": str(st.tree(Ref.of(ref))), "status": ref["status"], "stats": stats}


@flow(name="demo", log_prints=True, flow_run_name=run_name("demo", "size"))
def demo(size: Size = "demo", seeds: list[int] = (0, 1, 2), store: str | None = None,
         report_dir: str = "pkt-report", runner: Literal["threads", "processes", "dask"] = "threads",
         workers: int = 1) -> dict:
    """Build or reuse the miniature family, then sweep every variant on the GSM-like task; publishes
    the family, the scores and the report on this run."""
    st = Store(store)
    with task_runner(runner, workers) as task_runner_:
        graph = Graph(st, task_runner_, torch_threads_per_worker(runner, workers))
        fam = family_node(graph, size)
        root = st.tree(Ref.of(fam))
        cfg = parse_config(demo_config(str(root), size, list(seeds), store, report_dir))
        stats = family_stats(st, fam)
        out = run_sweep(graph, cfg, "demo", size, {"scale": SMOKE_CAVEAT.format(seeds=len(seeds)),
                                                   "families": {f"{size} family": stats}})
    return out | {"family": {"root": str(root), "status": fam["status"], "stats": stats}}


def demo_config(family_root: str, size: str, seeds: list[int], store: str | None, report_dir: str) -> dict:
    """The demo's sweep: every variant on the GSM-like task of a built miniature family."""
    root = Path(family_root)
    return {"teacher": str(root / "teacher"), "students": [str(root / "student")],
            "tasks": [{"name": "gsm", "dir": str(root / "tasks" / "gsm"), "benchmark": "gsm"}],
            "variants": ALL_VARIANTS, "seeds": list(seeds), "early_teacher": str(root / "teacher-early"),
            "cross_task_seeds": str(root / "tasks" / "sni" / "seeds.jsonl"), "train": DEMO_TRAIN[size],
            "benchmarks": ["answer_nll"], "max_length": 64, "report_dir": report_dir, "laten": DEMO_LATEN[size],
            "family": {"size": size}, **({"store": store} if store else {})}


VariantName = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]  (the UI's form offers the choices)


@flow(name="family-sweep", log_prints=True, flow_run_name=run_name(
    "family-sweep", extra=lambda p: {"size": p.get("size") or built_size(Store(p.get("store"))) or "demo"}))
def family_sweep(size: Literal["demo", "test"] | None = None, variants: list[VariantName] = ("vanilla", "lora", "transfer"),
                 seeds: list[int] = (0, 1, 2), store: str | None = None,
                 report_dir: str = "pkt-report-nightly") -> dict:
    """A sweep over the miniature family that `pkt demo` builds (reused from the store, built here if
    it is missing): teacher, student and GSM-like task exist as soon as the family does, so this is
    what the shipped nightly schedule runs. A rerun computes only what the store lacks.
    size: default, the family the store holds (`pkt demo --size test` built the test one), else demo."""
    st = Store(store)
    size = size or built_size(st) or "demo"
    print(f"family-sweep on the {size} family")
    with task_runner() as runner:
        graph = Graph(st, runner)
        fam = family_node(graph, size)
        root = st.tree(Ref.of(fam))
        cfg = parse_config({**demo_config(str(root), size, list(seeds), store, report_dir), "variants": list(variants)})
        return run_sweep(graph, cfg, "family-sweep", f"{size}-nightly")
