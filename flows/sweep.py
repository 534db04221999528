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
from pkt.core import arch, evaluate, models, report
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
                 scale: float) -> PrefectFuture:
    """The future of the LoRA init a variant with a teacher trains from."""
    draw = tp.seed if v.drawn else 0
    seeds = cfg.cross_task_seeds if v.seeds == "cross-task" else str(Path(task.dir) / "seeds.jsonl")
    name = source_name(cfg.teacher)
    if v.teacher == "untrained":
        teacher = graph.submit(nodes.RandomModel(seed=draw), {"like": teacher}, f"like={name}, seed={draw}")
        name = f"untrained {name} seed={draw}"
    elif v.teacher == "early":
        teacher, name = graph.source("model", cfg.early_teacher), source_name(cfg.early_teacher)
    opts = ChainOptions(k=cfg.k, sample_seed=cfg.sample_seed, selector=v.selector or cfg.selector,
                        reducer=v.reducer or cfg.reducer, max_length=cfg.max_length, dtype=cfg.dtype,
                        device=cfg.device, modules=tp.modules, draw_seed=draw)
    chain = extraction_chain(graph, teacher, seeds, shape, opts, name)
    return init_node(graph, chain, rank=tp.rank, alpha=tp.alpha, dropout=tp.dropout, split=cfg.split, scale=scale,
                     svd=cfg.svd, transform=v.transform, transform_seed=draw)


def grid(cfg: SweepConfig) -> list[dict]:
    points = [{}]
    for name, values in cfg.train_grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def runs(cfg: SweepConfig, points: list[dict]):
    """(variant, training setting, seed) of every run; vanilla trains nothing, so it runs once."""
    for name in cfg.variants:
        if VARIANTS[name].trains:
            yield from ((VARIANTS[name], setting, seed) for setting, seed in itertools.product(points, cfg.seeds))
        else:
            yield VARIANTS[name], {}, cfg.seeds[0]


def run_sweep(graph: Graph, cfg: SweepConfig, title: str, tag: str) -> dict:
    """Submit every node of the sweep, wait, write the report; publishes on the current flow run."""
    store = graph.store
    teacher = graph.source("model", cfg.teacher)
    points = grid(cfg)
    splits = ["test"] + (["val"] if len(points) > 1 else [])
    scored = []  # (row fields, scores future, init future or None)
    for student_path in cfg.students:
        student = graph.source("model", student_path)
        shape = arch.shape_of(models.load_config(student_path))
        for task in cfg.tasks:
            train = graph.source("file", str(Path(task.dir) / "train.jsonl"))
            benchmarks = [task.benchmark] + [b for b in cfg.benchmarks if b != task.benchmark]
            for v, setting, seed in runs(cfg, points):
                label = f"{source_name(student_path)}, {task.name}, {v.name}, seed={seed}" + (
                    f", {json.dumps(setting, sort_keys=True)}" if setting else "")
                adapter, init = _train(graph, cfg, v, teacher, student, train, task, shape, seed, setting, label)
                for split, bench in itertools.product(splits, benchmarks):
                    future = _score(graph, cfg, student, adapter, task, bench, split, label)
                    scored.append(({"student": student_path, "task": task.name, "benchmark": bench, "variant": v.name,
                                    "seed": seed, "setting": json.dumps(setting, sort_keys=True), "split": split},
                                   future, init))
    graph.results()  # every node finished (the first failure is raised here)
    rows = [{**fields, "metric": metric, "value": value, "top_sv": _top_sv(store, init)}
            for fields, future, init in scored
            for metric, value in nodes.score_summary(store, future.result()).items()]
    primary_of = {t.name: evaluate.primary_metric(t.benchmark) for t in cfg.tasks}
    table = report.choose_settings(pd.DataFrame(rows), primary_of)
    primary = primary_of[cfg.tasks[0].name]
    rep = graph.submit(nodes.Report(primary=primary),
                       {"runs": nodes.table_source(store, table, "runs.csv"), "scores": [f for _, f, _ in scored]},
                       f"{tag}, {len(table)} rows, {primary}")
    paths = copy_report(store, rep.result(), cfg.report_dir)
    summary = report.read_csv(paths["csv"])
    lines = report.headlines(summary, primary)
    results = graph.results()
    publish(store, title, results, tag=tag, summary=summary, paths=paths, headlines=lines)
    return {"report": {k: str(v) for k, v in paths.items()},
            "computed": sum(r["status"] == "computed" for r in results),
            "nodes": [(r["kind"], r["key"], r["status"]) for r in results],
            "table": summary.to_dict(orient="records"), "headline": lines}


def _train(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
           train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
           label: str) -> tuple[PrefectFuture | None, PrefectFuture | None]:
    """Futures of one run's adapter and of the LoRA init it trains from (None where there is none)."""
    if not v.trains:
        return None, None
    tp = cfg.train_params(seed, {k: x for k, x in setting.items() if k not in SETTING_FIELDS})
    init = None
    if v.extracted:
        init = variant_init(graph, cfg, v, teacher, task, shape, tp, setting.get("init_scale", cfg.init_scale))
    inputs = {"student": student, "train": train, **({"init": init} if init else {})}
    adapter = graph.submit(nodes.Adapter(variant=v.name, init=v.init, train=tp.as_dict(), dtype=cfg.dtype,
                                         device=cfg.device), inputs, label)
    return adapter, init


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


def _top_sv(store: Store, init: PrefectFuture | None) -> float | None:
    """The init's top singular value (None without a teacher init)."""
    if init is None:
        return None
    from safetensors import safe_open

    tree = store.tree(Ref.of(init.result()))
    with safe_open(str(tree / "adapter_model.safetensors"), framework="pt") as f:
        values = json.loads((f.metadata() or {}).get("top_singular_values", "[]"))
    return values[0] if values else None


def copy_report(store: Store, ref: dict, out_dir: str) -> dict[str, Path]:
    """The report node's files, copied into out_dir (each replaced atomically: a reader never sees
    half a report file)."""
    tree = store.tree(Ref.of(ref))
    paths = {name: Path(out_dir) / f for name, f in report.REPORT_FILES.items()}
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
