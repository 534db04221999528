"""The transferability diagnostic as nodes: for every run of a sweep (with_diagnostics joins its totals
into the runs table as diag_cos, diag_share), or alone for one teacher/student/task (`pkt diagnose`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.futures import PrefectFuture

from pkt.artifacts.store import Store
from pkt.core import arch, diagnose, models
from pkt.tasks import train as train_nodes

from .config import SETTING_FIELDS, SweepConfig, parse_config
from .extract import chat_template, variant_init
from .graph import Graph, source_name, task_runner
from .names import run_name
from .summary import publish
from .variants import VARIANTS, Variant

BATCHES = 4  # G over the first 4 effective batches of training data: a steadier estimate than one step's
RUN = ["student", "task", "variant", "seed", "setting"]
DEFAULT_VARIANTS = ["lora", "pissa", "transfer", "random-submatrix", "random-layers", "untrained-teacher",
                    "spectrum-matched", "shuffled"]


def diagnostic_node(graph: Graph, v: Variant, student: PrefectFuture, train: PrefectFuture, tp,
                    init: PrefectFuture | None, dtype: str, device: str, label: str,
                    batches: int = BATCHES, chat_template: bool = False) -> PrefectFuture | None:
    """The future of the diagnostic of the init a run trains from (None: the variant trains nothing)."""
    if not v.trains:
        return None
    spec = train_nodes.Diagnostic(variant=v.name, init=v.init, rank=tp.rank, alpha=tp.alpha, modules=tuple(tp.modules),
                                  seed=tp.seed if v.init in ("lora", "added") else 0, batches=batches,
                                  batch_size=tp.batch_size,
                                  n_train=tp.n_train, max_length=tp.max_length, micro_batch=tp.micro_batch, dtype=dtype,
                                  device=device, chat_template=chat_template)
    inputs = {"student": student, "train": train, **({"init": init} if init is not None else {})}
    return graph.submit(spec, inputs, label)


def submit_diagnostics(graph: Graph, cfg: SweepConfig, runs: pd.DataFrame,
                       batches: int = BATCHES) -> dict[tuple, PrefectFuture]:
    """A diagnostic node for each distinct run (student, task, variant, seed, setting) of a runs table that
    trains. Each run's init is the sweep's own node (the graph answers it with the future it already has)."""
    teacher = graph.source("model", cfg.teacher)
    tasks = {t.name: t for t in cfg.tasks}
    futures = {}
    for run in runs[RUN].drop_duplicates().itertuples(index=False, name=None):
        student, task_name, variant, seed, setting = run
        v = VARIANTS[str(variant)]
        if not v.trains or v.chain != "adapter":  # LaTen's update has no LoRA step to diagnose
            continue
        point = json.loads(setting) if isinstance(setting, str) and setting else {}
        tp = cfg.train_params(int(seed), {k: x for k, x in point.items() if k not in SETTING_FIELDS})
        task = tasks[task_name]
        init = None
        if v.extracted:
            shape = arch.shape_of(models.load_config(student))
            init = variant_init(graph, cfg, v, teacher, task, shape, tp, point.get("init_scale", cfg.init_scale))
        label = f"{source_name(student)}, {task_name}, {v.name}, seed={seed}" + (f", {setting}" if point else "")
        futures[run] = diagnostic_node(graph, v, graph.source("model", student),
                                       graph.source("file", str(Path(task.dir) / "train.jsonl")), tp, init,
                                       cfg.dtype, cfg.device, label, batches,
                                       chat_template(cfg.prompt_format, student))
    return futures


def with_diagnostics(graph: Graph, runs: pd.DataFrame, futures: dict[tuple, PrefectFuture]) -> pd.DataFrame:
    """The runs table with each run's diagnostic totals (futures: submit_diagnostics') as columns diag_cos and
    diag_share (empty for a run that trains nothing; diag_cos also for lora, whose init carries no update)."""
    totals = {run: train_nodes.diagnosis(graph.store, f.result()).totals for run, f in futures.items()}
    keys = list(runs[RUN].itertuples(index=False, name=None))
    cols = {f"diag_{name}": [totals.get(k, {}).get(name, math.nan) for k in keys] for name in ("cos", "share")}
    return runs.assign(**cols)


def per_module(store: Store, refs: dict[str, dict]) -> pd.DataFrame:
    """variant, module (type, or 'total'), cos, share: each variant's diagnostic per module type."""
    parts = [diagnose.by_module(train_nodes.diagnosis(store, ref).modules).assign(variant=variant)
             for variant, ref in refs.items()]
    return pd.concat(parts, ignore_index=True)[["variant", "module", "cos", "share"]]


@flow(name="diagnose", log_prints=True, flow_run_name=run_name("diagnose", "student", "task_dir"))
def diagnose_inits(teacher: str, student: str, task_dir: str, variants: list[str] = tuple(DEFAULT_VARIANTS),
                   seed: int = 0, train: dict | None = None, init_scale: float = 1.0, batches: int = BATCHES,
                   store: str | None = None, dtype: str = "float32", device: str = "cpu") -> dict:
    """Before any training: each variant's init against the student's step-0 task gradient on the task's
    training data, per module type and in total. Builds the teacher chain up to the inits (shared with
    sweeps through the store) and one diagnostic node per variant; trains and scores nothing."""
    cfg = parse_config({"teacher": teacher, "students": [student],
                        "tasks": [{"name": Path(task_dir).name, "dir": task_dir}], "variants": list(variants),
                        "seeds": [seed], "train": train or {}, "init_scale": init_scale, "store": store,
                        "dtype": dtype, "device": device})
    runs = pd.DataFrame([{"student": student, "task": Path(task_dir).name, "variant": v, "seed": seed, "setting": ""}
                         for v in cfg.variants])
    st = Store(cfg.store)
    with task_runner() as runner:
        graph = Graph(st, runner)
        futures = submit_diagnostics(graph, cfg, runs, batches)
        refs = {run[2]: f.result() for run, f in futures.items()}
        results = graph.results()
    table = per_module(st, refs)
    lines = [f"{v}: cos {t['cos']:+.4f}, share {t['share']:.4f}" for v, t in
             ((v, train_nodes.diagnosis(st, ref).totals) for v, ref in refs.items())]
    publish(st, "diagnose", results, tag=Path(task_dir).name, notes=lines)
    return {"table": table.to_dict(orient="records"), "totals": lines,
            "computed": sum(r["status"] == "computed" for r in results),
            "nodes": [(r["kind"], r["key"], r["status"]) for r in results],
            "n_samples": {v: train_nodes.diagnosis(st, ref).n_samples for v, ref in refs.items()}}
