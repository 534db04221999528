"""The sweep: one teacher x students x tasks x variants x seeds (x a training grid), every node
submitted once as a future, then the report over every score (paired differences, 95% intervals)."""
from __future__ import annotations

import hashlib
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
from .laten import laten_chain
from .outputs import check_out_dir, claim_report_dir
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


def selection_runs(cfg: SweepConfig):
    """(variant, setting, seed) of every run that chooses a setting: each trained variant's grid x
    the selection seeds, scored on val only (none when no variant has more than one setting)."""
    trained = [VARIANTS[name] for name in cfg.variants if VARIANTS[name].trains]
    if all(len(cfg.grid_points(v.name)) == 1 for v in trained):
        return
    for v in trained:
        yield from ((v, setting, seed) for setting in cfg.grid_points(v.name) for seed in cfg.selection_seeds)


def chosen_runs(cfg: SweepConfig, chosen: dict[str, dict]):
    """(variant, setting, seed) of every run scored on test: each variant at its chosen setting (its only
    one without a grid) over the test seeds, fresh ones; vanilla trains nothing, so it runs once (n=1)."""
    for name in cfg.variants:
        v = VARIANTS[name]
        if not v.trains:
            yield v, {}, cfg.seeds[0]
            continue
        setting = chosen.get(name, cfg.grid_points(name)[0])
        yield from ((v, setting, seed) for seed in cfg.seeds)


def item_metrics(cfg: SweepConfig) -> set[str]:
    """The metrics whose per-item scores go in items.csv (for the bootstrap): the endpoint's, or
    without one each task's primary metric."""
    if cfg.endpoint:
        return {cfg.endpoint.metric}
    return {evaluate.primary_metric(t.benchmark) for t in cfg.tasks}


def run_sweep(graph: Graph, cfg: SweepConfig, title: str, tag: str, protocol: dict | None = None) -> dict:
    """Submit every node of the sweep, wait, write the report; publishes on the current flow run.

    With a grid, the selection runs (every setting x the selection seeds) are scored on val, each
    variant keeps its best setting, and fresh test seeds are trained at that setting and scored on
    test: no run that chose a setting is scored on test. protocol: what the report states beside the
    data (scale caveat, family gates), see report.write_report."""
    store = graph.store
    check_out_dir(cfg.report_dir, "report_dir")  # before any work: the report must not land on a user's files
    teacher = graph.source("model", cfg.teacher)
    groups = []  # (student path, student future, shape, task, train data future)
    for student_path in cfg.students:
        student = graph.source("model", student_path)
        shape = arch.shape_of(models.load_config(student_path))
        for task in cfg.tasks:
            train = graph.source("file", str(Path(task.dir) / "train.jsonl"))
            groups.append((student_path, student, shape, task, train))
    # every group's selection runs first, so that the workers have them all before any choice waits
    made: dict[str, list] = {}  # variant -> the futures of its runs' results (adapters, LaTen updates)
    val = [_submit_selection(graph, cfg, teacher, group, made) for group in groups]
    scored, selection = [], []  # (row fields, scores future, adapter future or None); val rows
    for (path, student, shape, task, train), val_scores in zip(groups, val):
        metric = _select_metric(cfg, task)
        rows = [{"student": path, "task": task.name, "variant": v.name, "setting": setting, "seed": seed,
                 "metric": metric, "value": nodes.score_summary(store, f.result())[metric]}
                for (v, setting, seed), f in val_scores.items()]
        selection += rows
        chosen = ({v: json.loads(x) for v, x in report.select_settings(pd.DataFrame(rows), metric).items()}
                  if rows else {})
        benchmarks = [task.benchmark] + [b for b in cfg.benchmarks if b != task.benchmark]
        for v, setting, seed in chosen_runs(cfg, chosen):
            label = _label(path, task, v, setting, seed)
            adapter = CHAINS[v.chain](graph, cfg, v, teacher, student, _data(graph, v, task, train, "test"), task,
                                      shape, seed, setting, label)
            made.setdefault(v.name, []).extend([adapter] if adapter is not None else [])
            scored_model = teacher if v.model == "teacher" else student
            for bench in benchmarks:
                future = _score(graph, cfg, scored_model, adapter, task, bench, "test", label, v.name)
                scored.append(({"student": path, "task": task.name, "benchmark": bench, "variant": v.name,
                                "seed": seed, "setting": _setting(setting)}, future, adapter))
    graph.results()  # every node finished (the first failure is raised here)
    rows, curves, items = _collect(store, scored, item_metrics(cfg))
    table = pd.DataFrame(rows)
    from .diagnose import with_diagnostics  # here, not at the top: diagnose builds inits with this module

    table = with_diagnostics(graph, cfg, table)  # each run's step-0 init diagnostic: diag_cos, diag_share
    primary = cfg.endpoint.metric if cfg.endpoint else evaluate.primary_metric(cfg.tasks[0].benchmark)
    # every score the sweep computed, val ones included: they chose the settings the table shows
    all_scores = [graph.futures[i] for i, kind in graph.kinds.items() if kind == "scores"]
    inputs = {"runs": nodes.table_source(store, table, "runs.csv"), "scores": all_scores}
    for name, extra in (("curves", curves), ("selection", selection), ("items", items)):
        if extra:
            inputs[name] = nodes.table_source(store, pd.DataFrame(extra), f"{name}.csv")
    spec = nodes.Report(primary=primary, protocol=report_protocol(cfg, protocol))
    rep = graph.submit(spec, inputs, f"{tag}, {len(table)} rows, {primary}")
    paths = copy_report(store, rep.result(), cfg.report_dir)
    used = variant_nodes(graph, made)
    paths |= add_costs(paths, cost_table(store, used))
    summary = report.read_csv(paths["csv"])
    lines = report.headlines(summary, primary)
    results = graph.results()
    publish(store, title, results, tag=tag, summary=summary, paths=paths, headlines=lines)
    return {"report": {k: str(v) for k, v in paths.items()},
            "computed": sum(r["status"] == "computed" for r in results),
            "nodes": [(r["kind"], r["key"], r["status"]) for r in results],
            "table": summary.to_dict(orient="records"), "headline": lines, "variant_nodes": used}


def variant_nodes(graph: Graph, made: dict[str, list]) -> dict[str, list[tuple[str, str]]]:
    """variant -> (kind, key) of every distinct node its runs took (their results and all upstream of them,
    from the graph's edges; a digest cannot say it: two nodes of other variants may have identical bytes)."""
    refs = {v: [node.result() for f in futures for node in graph.lineage(f)] for v, futures in made.items()}
    return {v: sorted({(r["kind"], r["key"]) for r in rs}) for v, rs in refs.items()}


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


def _submit_selection(graph: Graph, cfg: SweepConfig, teacher: PrefectFuture, group: tuple, made: dict) -> dict:
    """(variant, setting, seed) -> the future of its val score on the selection metric."""
    path, student, shape, task, train = group
    out = {}
    for v, setting, seed in selection_runs(cfg):
        label = _label(path, task, v, setting, seed)
        adapter = CHAINS[v.chain](graph, cfg, v, teacher, student, _data(graph, v, task, train, "val"), task, shape,
                                  seed, setting, label)
        made.setdefault(v.name, []).extend([adapter] if adapter is not None else [])
        out[v, _setting(setting), seed] = _score(graph, cfg, student, adapter, task, _selection_benchmark(cfg, task),
                                                 "val", label, v.name)
    return out


def _data(graph: Graph, v: Variant, task: TaskSpec, train: PrefectFuture, split: str) -> PrefectFuture:
    """A run's training data: the task's train.jsonl, or for a variant trained on what it is scored on
    (the oracle) that split's own file."""
    return graph.source("file", str(Path(task.dir) / f"{split}.jsonl")) if v.data == "scored" else train


def _collect(store: Store, scored: list, keep_items: set[str]) -> tuple[list, list, list]:
    """The runs table (one row per run x metric, with the init's size, the test-set size and the
    optimizer steps), the training curves, and the per-item scores of the metrics in keep_items."""
    rows, curves, items, seen = [], [], [], set()
    for fields, future, adapter in scored:
        adapter = adapter if adapter is not None and adapter.result()["kind"] == "adapter" else None  # not LaTen's
        size = nodes.init_size(store, adapter.result()) if adapter is not None else {}
        losses = nodes.train_losses(store, adapter.result()) if adapter is not None else []
        per_item = store.tensors(future.result())
        n_items = len(per_item["doc_id"])
        summary = nodes.score_summary(store, future.result())
        rows += [{**fields, "metric": metric, "value": value, "top_sv": size.get("top_sv"),
                  "top_sv_ratio": size.get("top_sv_ratio"), "n_items": n_items, "steps": len(losses)}
                 for metric, value in summary.items()]
        for metric in keep_items & summary.keys():
            name = metric.split("/")[0]  # "exact_match/strict-match" is stored per item as "exact_match"
            if name in per_item:
                items += [{**fields, "metric": metric, "item": int(i), "value": x}
                          for i, x in zip(per_item["doc_id"].tolist(), per_item[name].tolist())]
        run = tuple(fields[k] for k in ("student", "task", "variant", "seed", "setting"))
        if adapter is not None and run not in seen:
            seen.add(run)
            base = {k: fields[k] for k in ("student", "task", "variant", "seed", "setting")}
            curves += [{**base, "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    return rows, curves, items


def report_protocol(cfg: SweepConfig, extra: dict | None = None) -> dict:
    """What the report states about how the table was made: the endpoint, every variant's grid, the
    selection and test seeds and the selection metric (plus the flow's caveat and family gates)."""
    return {"endpoint": cfg.endpoint.model_dump(mode="json") if cfg.endpoint else None,
            "grids": {v: cfg.grid_points(v) for v in cfg.variants if VARIANTS[v].trains},
            "selection_seeds": list(cfg.selection_seeds), "test_seeds": list(cfg.seeds),
            "select_on": cfg.select_on, **(extra or {})}


def _setting(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True)


def _label(student_path: str, task: TaskSpec, v: Variant, setting: dict, seed: int) -> str:
    return f"{source_name(student_path)}, {task.name}, {v.name}, seed={seed}" + (
        f", {_setting(setting)}" if setting else "")


def _select_metric(cfg: SweepConfig, task: TaskSpec) -> str:
    """The val metric that chooses the settings (cfg.select_on, default the task's primary metric)."""
    return cfg.select_on or evaluate.primary_metric(task.benchmark)


def _selection_benchmark(cfg: SweepConfig, task: TaskSpec) -> str:
    return "answer_nll" if _select_metric(cfg, task) == "answer_nll" else task.benchmark


def _train(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
           train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
           label: str) -> PrefectFuture | None:
    """The future of one run's adapter (None for a variant that trains nothing)."""
    if not v.trains:
        return None
    tp = cfg.train_params(seed, {k: x for k, x in setting.items() if k not in SETTING_FIELDS})
    init = None
    if v.extracted:
        init = variant_init(graph, cfg, v, teacher, task, shape, tp, setting.get("init_scale", cfg.init_scale))
    inputs = {"student": student, "train": train, **({"init": init} if init else {})}
    return graph.submit(nodes.Adapter(variant=v.name, init=v.init, train=tp.as_dict(), dtype=cfg.dtype,
                                      device=cfg.device), inputs, label)


CHAINS = {"adapter": _train, "laten": laten_chain}  # Variant.chain -> the nodes of one run
SCORED_AS = {"adapter": "adapter", "laten": "delta"}  # Variant.chain -> the Scores input its result is


def _score(graph: Graph, cfg: SweepConfig, student: PrefectFuture, adapter, task: TaskSpec, benchmark: str, split: str,
           label: str, variant: str = "") -> PrefectFuture:
    inputs = {"student": student, "data": graph.source("dir", task.dir, nodes.score_data_files(split))}
    if adapter is not None:
        inputs[SCORED_AS[VARIANTS[variant].chain if variant else "adapter"]] = adapter
    if benchmark == "winrate":
        inputs["judge"] = graph.source("model", cfg.judge)
    spec = nodes.Scores(benchmark=benchmark, task_definition=evaluate.task_digest(benchmark), split=split,
                        num_fewshot=cfg.num_fewshot, limit=cfg.eval_limit, dtype=cfg.dtype, device=cfg.device)
    return graph.submit(spec, inputs, f"{label}, {benchmark}, {split}")


def copy_report(store: Store, ref: dict, out_dir: str) -> dict[str, Path]:
    """The report node's files, copied into out_dir (each replaced atomically: a reader never sees
    half a report file). A directory holding a user's files is refused (flows/outputs.py)."""
    claim_report_dir(out_dir)
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
