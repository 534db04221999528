"""The sweep: one teacher x students x tasks x variants x seeds (x a training grid), every node
submitted once as a future, then the report over every score (paired differences, 95% intervals)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.futures import PrefectFuture

from pkt.artifacts.keys import canonical_json
from pkt.artifacts.store import Ref, Store
from pkt.core import arch, costs, evaluate, models, report
from pkt.tasks import nodes

from .config import SweepConfig, TaskSpec, parse_config
from .extract import ChainOptions, extraction_chain, init_node
from .graph import Graph, source_name, task_runner, torch_threads_per_worker
from .summary import publish
from .variants import VARIANTS, Variant

SETTING_FIELDS = ("init_scale",)  # grid keys that are not training parameters


def config_tag(cfg: SweepConfig) -> str:
    """What names a sweep's artifacts in the UI: its name, or a short digest of its config."""
    return cfg.name or hashlib.sha256(canonical_json(cfg.model_dump(mode="json")).encode()).hexdigest()[:8]


def variant_init(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, task: TaskSpec, shape: dict, tp,
                 scale: float, used: list | None = None) -> PrefectFuture:
    """The future of the LoRA init a variant with a teacher trains from; every node of its chain is
    appended to `used` (what the cost table charges the variant)."""
    used = [] if used is None else used
    draw = tp.seed if v.drawn else 0
    seeds = cfg.cross_task_seeds if v.seeds == "cross-task" else str(Path(task.dir) / "seeds.jsonl")
    name = source_name(cfg.teacher)
    if v.teacher == "untrained":
        teacher = graph.submit(nodes.RandomModel(seed=draw), {"like": teacher}, f"like={name}, seed={draw}")
        used.append(teacher)
        name = f"untrained {name} seed={draw}"
    elif v.teacher == "early":
        teacher, name = graph.source("model", cfg.early_teacher), source_name(cfg.early_teacher)
    opts = ChainOptions(k=cfg.k, sample_seed=cfg.sample_seed, selector=v.selector or cfg.selector,
                        reducer=v.reducer or cfg.reducer, max_length=cfg.max_length, dtype=cfg.dtype,
                        device=cfg.device, modules=tp.modules, draw_seed=draw)
    chain = extraction_chain(graph, teacher, seeds, shape, opts, name)
    init = init_node(graph, chain, rank=tp.rank, alpha=tp.alpha, dropout=tp.dropout, split=cfg.split, scale=scale,
                     svd=cfg.svd, transform=v.transform, transform_seed=draw)
    used += [f for k, f in chain.items() if k != "tag"] + [init]
    return init


def grid(cfg: SweepConfig) -> list[dict]:
    points = [{}]
    for name, values in cfg.train_grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def runs(cfg: SweepConfig, points: list[dict]):
    """(variant, training setting, seed) of every run; vanilla trains nothing, so it runs once (n=1).
    init_scale only varies the inits from a teacher."""
    for name in cfg.variants:
        v = VARIANTS[name]
        if not v.trains:
            yield v, {}, cfg.seeds[0]
            continue
        settings = points if v.extracted else _unique([{k: x for k, x in p.items() if k not in SETTING_FIELDS}
                                                      for p in points])
        yield from ((v, setting, seed) for setting, seed in itertools.product(settings, cfg.seeds))


def _unique(settings: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for setting in settings:
        seen.setdefault(json.dumps(setting, sort_keys=True), setting)
    return list(seen.values())


def run_sweep(graph: Graph, cfg: SweepConfig, title: str, tag: str) -> dict:
    """Submit every node of the sweep, wait, write the report; publishes on the current flow run.

    With a grid, every run is first scored on val (the selection metric only), each variant keeps
    its best setting, and only those runs are scored on test; the size controls are also scored at
    transfer's setting (the same lr and scale: matched effective size)."""
    store = graph.store
    teacher = graph.source("model", cfg.teacher)
    points = grid(cfg)
    scored = []  # (row fields, scores future, adapter future or None)
    used_by_variant: dict[str, list] = {}  # variant -> futures of every node of its runs (adapters and chains)
    for student_path in cfg.students:
        student = graph.source("model", student_path)
        shape = arch.shape_of(models.load_config(student_path))
        for task in cfg.tasks:
            train = graph.source("file", str(Path(task.dir) / "train.jsonl"))
            trained = {}  # (variant, setting json, seed) -> (adapter future or None, label)
            for v, setting, seed in runs(cfg, points):
                label = f"{source_name(student_path)}, {task.name}, {v.name}, seed={seed}" + (
                    f", {json.dumps(setting, sort_keys=True)}" if setting else "")
                adapter = _train(graph, cfg, v, teacher, student, train, task, shape, seed, setting, label,
                                 used_by_variant.setdefault(v.name, []))
                trained[v.name, json.dumps(setting, sort_keys=True), seed] = (adapter, label)
            chosen = _choose(graph, cfg, student, task, trained) if len(points) > 1 else None
            benchmarks = [task.benchmark] + [b for b in cfg.benchmarks if b != task.benchmark]
            for (variant, setting, seed), as_variant in tested(trained, chosen):
                adapter, label = trained[variant, setting, seed]
                for bench in benchmarks:
                    future = _score(graph, cfg, student, adapter, task, bench, "test", label)
                    scored.append(({"student": student_path, "task": task.name, "benchmark": bench,
                                    "variant": as_variant, "seed": seed, "setting": setting}, future, adapter))
    graph.results()  # every node finished (the first failure is raised here)
    rows, curves, seen = [], [], set()
    for fields, future, adapter in scored:
        size = nodes.init_size(store, adapter.result()) if adapter is not None else {}
        rows += [{**fields, "metric": metric, "value": value, "top_sv": size.get("top_sv"),
                  "top_sv_ratio": size.get("top_sv_ratio")}
                 for metric, value in nodes.score_summary(store, future.result()).items()]
        run = tuple(fields[k] for k in ("student", "task", "variant", "seed", "setting"))
        if adapter is not None and run not in seen:
            seen.add(run)
            base = {k: fields[k] for k in ("student", "task", "variant", "seed", "setting")}
            curves += [{**base, "step": i + 1, "loss": loss}
                       for i, loss in enumerate(nodes.train_losses(store, adapter.result()))]
    table = pd.DataFrame(rows)
    primary = evaluate.primary_metric(cfg.tasks[0].benchmark)
    # every score the sweep computed, val ones included: they chose the settings the table shows
    all_scores = [graph.futures[i] for i, kind in graph.kinds.items() if kind == "scores"]
    inputs = {"runs": nodes.table_source(store, table, "runs.csv"), "scores": all_scores}
    if curves:
        inputs["curves"] = nodes.table_source(store, pd.DataFrame(curves), "curves.csv")
    rep = graph.submit(nodes.Report(primary=primary), inputs, f"{tag}, {len(table)} rows, {primary}")
    paths = copy_report(store, rep.result(), cfg.report_dir)
    used = variant_nodes(used_by_variant)
    paths |= add_costs(paths, cost_table(store, used))
    summary = report.read_csv(paths["csv"])
    lines = report.headlines(summary, primary)
    results = graph.results()
    publish(store, title, results, tag=tag, summary=summary, paths=paths, headlines=lines)
    return {"report": {k: str(v) for k, v in paths.items()},
            "computed": sum(r["status"] == "computed" for r in results),
            "nodes": [(r["kind"], r["key"], r["status"]) for r in results],
            "table": summary.to_dict(orient="records"), "headline": lines, "variant_nodes": used}


def variant_nodes(used_by_variant: dict[str, list]) -> dict[str, list[list[str]]]:
    """variant -> [kind, key] of every distinct node its runs used (a digest cannot say it: two nodes
    of other variants may have identical bytes)."""
    return {v: sorted({(f.result()["kind"], f.result()["key"]) for f in futures}) for v, futures in
            used_by_variant.items()}


def cost_table(store: Store, used: dict[str, list]) -> pd.DataFrame:
    """Each variant's measured cost (pkt_core/costs.py) from the records of the nodes it used."""
    records = {(kind, key): store.record(kind, key) for nodes_ in used.values() for kind, key in nodes_}
    return costs.costs(records, used)


def add_costs(paths: dict[str, Path], table: pd.DataFrame) -> dict[str, Path]:
    """The cost table into the report directory (costs.csv, and its section of report.md), not into the
    store's report node: timings differ from run to run, while a stored artifact's bytes are a function
    of its key's inputs (the same sweep in two stores stores the same report)."""
    dest = paths["markdown"].with_name("costs.csv")
    tmp = dest.with_name(f".{dest.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, dest)
    report.append_costs(paths, table)
    return {"costs": dest}


def _choose(graph: Graph, cfg: SweepConfig, student: PrefectFuture, task: TaskSpec, trained: dict) -> dict[str, str]:
    """Each variant's training setting with the best mean val score over seeds (cfg.select_on,
    default the task's primary metric)."""
    metric = cfg.select_on or evaluate.primary_metric(task.benchmark)
    bench = "answer_nll" if metric == "answer_nll" else task.benchmark
    futures = {run: _score(graph, cfg, student, adapter, task, bench, "val", label)
               for run, (adapter, label) in trained.items()}
    val = [{"variant": variant, "setting": setting, "seed": seed,
            "value": nodes.score_summary(graph.store, f.result())[metric]}
           for (variant, setting, seed), f in futures.items()]
    return report.select_settings(pd.DataFrame(val), metric)


def tested(trained: dict, chosen: dict[str, str] | None):
    """((variant, setting, seed), name in the report) of every run scored on test: each variant at
    its chosen setting, and the size controls also at transfer's (named 'X@transfer-setting')."""
    for run in trained:
        variant, setting, _ = run
        if chosen is None or chosen[variant] == setting:
            yield run, variant
        elif variant in report.SIZE_CONTROLS and chosen.get(report.SUBJECT) == setting:
            yield run, variant + report.AT_SUBJECT


def _train(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
           train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
           label: str, used: list | None = None) -> PrefectFuture | None:
    """The future of one run's adapter (None for a variant that trains nothing); the adapter and its
    init's chain are appended to `used`."""
    used = [] if used is None else used
    if not v.trains:
        return None
    tp = cfg.train_params(seed, {k: x for k, x in setting.items() if k not in SETTING_FIELDS})
    init = None
    if v.extracted:
        init = variant_init(graph, cfg, v, teacher, task, shape, tp, setting.get("init_scale", cfg.init_scale), used)
    inputs = {"student": student, "train": train, **({"init": init} if init else {})}
    adapter = graph.submit(nodes.Adapter(variant=v.name, init=v.init, train=tp.as_dict(), dtype=cfg.dtype,
                                         device=cfg.device), inputs, label)
    used.append(adapter)
    return adapter


def _score(graph: Graph, cfg: SweepConfig, student: PrefectFuture, adapter, task: TaskSpec, benchmark: str, split: str,
           label: str) -> PrefectFuture:
    inputs = {"student": student, "data": graph.source("dir", task.dir, [f"{split}.jsonl", "train.jsonl"])}
    if adapter is not None:
        inputs["adapter"] = adapter
    if benchmark == "winrate":
        inputs["judge"] = graph.source("model", cfg.judge)
    spec = nodes.Scores(benchmark=benchmark, task_definition=evaluate.task_digest(benchmark), split=split,
                        num_fewshot=cfg.num_fewshot, limit=cfg.eval_limit, dtype=cfg.dtype, device=cfg.device)
    return graph.submit(spec, inputs, f"{label}, {benchmark}, {split}")


def copy_report(store: Store, ref: dict, out_dir: str) -> dict[str, Path]:
    """The report node's files, copied into out_dir (each replaced atomically: a reader never sees
    half a report file)."""
    tree = store.tree(Ref.of(ref))
    paths = {name: Path(out_dir) / f for name, f in report.REPORT_FILES.items() if (tree / f).exists()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for dest in paths.values():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(tree / dest.name, tmp)
        os.replace(tmp, dest)
    return paths


def sweep_graph(cfg: SweepConfig, title: str, tag: str) -> dict:
    with task_runner(cfg.runner, cfg.workers, cfg.dask_address) as runner:
        graph = Graph(Store(cfg.store), runner, torch_threads_per_worker(cfg.runner, cfg.workers))
        return run_sweep(graph, cfg, title, tag)


@flow(name="sweep", log_prints=True)
def sweep(config: SweepConfig) -> dict:
    """One teacher x students x tasks x variants x seeds (x a training grid), each node computed
    once, then the report: paired differences with 95% intervals."""
    cfg = parse_config(config) if isinstance(config, dict) else config
    return sweep_graph(cfg, "sweep", config_tag(cfg))


@flow(name="transfer", log_prints=True)
def transfer(teacher: str, student: str, task_dir: str, benchmark: str = "gsm",
             variants: list[str] = ("vanilla", "lora", "transfer"), seeds: list[int] = (0,), train: dict | None = None,
             store: str | None = None, report_dir: str = "pkt-report", dtype: str = "float32",
             device: str = "cpu") -> dict:
    """One teacher, one student, one task: the sweep with a single branch."""
    cfg = parse_config({"teacher": teacher, "students": [student],
                        "tasks": [{"name": Path(task_dir).name, "dir": task_dir, "benchmark": benchmark}],
                        "variants": list(variants), "seeds": list(seeds), "train": train or {}, "store": store,
                        "report_dir": report_dir, "dtype": dtype, "device": device})
    return sweep_graph(cfg, "transfer", config_tag(cfg))
