"""The Prefect flows: extract_teacher, sweep, transfer, build_family and demo.

Each node is a task whose result is a small ref; a node already in the store is reused (and
shown as Cached), so one teacher extraction serves every student of its shape.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pkt.artifacts.store import Ref, Store
from pkt.core import arch, evaluate, models, report
from pkt.core.mini import family
from pkt.tasks import nodes
from pkt.tasks.node import NodeResult, node_key, run_node

from .config import SweepConfig, TaskSpec, parse_config


@dataclass
class Ledger:
    """Every node a flow touched, for the summary: what was computed and what was reused."""

    store: Store
    by_key: dict[str, NodeResult] = field(default_factory=dict)

    @property
    def rows(self) -> list[NodeResult]:
        return list(self.by_key.values())

    def run(self, node_task, params: dict, inputs: dict, label: str) -> dict:
        """The node's ref; a node this flow already resolved (one teacher chain feeds many runs) is
        answered from memory, without another task run."""
        key = node_key(node_task.name, params, inputs)
        if key not in self.by_key:
            self.by_key[key] = run_node(node_task, self.store, params, inputs, label)
        return self.by_key[key].ref

    def computed(self) -> int:
        return sum(r.status == "computed" for r in self.rows)

    def markdown(self) -> str:
        lines = ["| kind | key | status | path |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.kind} | `{r.key[:16]}` | {r.status} | "
                         f"`{self.store.record_path(r.kind, r.key)}` |")
        return "\n".join(lines)


def _name(path: str) -> str:
    return Path(path).name or str(path)


# ---- the extraction chain (teacher side; nothing here depends on a student's weights) ---------
def extraction_chain(ledger: Ledger, teacher: dict, seeds: dict, shape: dict, *, k, sample_seed, selector, reducer,
                     max_length, dtype, device, modules=arch.ALL_MODULE_TYPES, seed: int = 0,
                     layout: str = "single") -> dict[str, dict]:
    sens = ledger.run(nodes.sensitivity_task,
                      {"k": k, "sample_seed": sample_seed, "max_length": max_length, "chat_template": False,
                       "dtype": dtype, "device": device, "loss": "answer_tokens", "layout": layout},
                      {"teacher": teacher, "seeds": seeds},
                      f"teacher={_name(teacher['key'])}, seeds={_name(seeds['key'])}, k={k or 'all'}")
    plan = ledger.run(nodes.layer_plan_task,
                      {"student_layers": shape["num_hidden_layers"], "selector": selector, "seed": seed},
                      {"sensitivity": sens}, f"{selector}, layers={shape['num_hidden_layers']}")
    ext = ledger.run(nodes.extraction_task,
                     {"student_shape": shape, "reducer": reducer, "modules": list(modules), "seed": seed},
                     {"teacher": teacher, "sensitivity": sens, "plan": plan},
                     f"teacher={_name(teacher['key'])}, {reducer}, hidden={shape['hidden_size']}")
    return {"sensitivity": sens, "plan": plan, "extraction": ext}


def init_node(ledger: Ledger, extraction: dict, *, rank, alpha, dropout, split, scale, transform="none",
              transform_seed=0) -> dict:
    return ledger.run(nodes.lora_init_task,
                      {"rank": rank, "alpha": alpha, "dropout": dropout, "split": split, "scale": scale,
                       "svd": "full", "transform": transform, "transform_seed": transform_seed},
                      {"extraction": extraction}, f"rank={rank}, {transform}")


@flow(name="extract-teacher", log_prints=True)
def extract_teacher(teacher: str, seeds: str, students: list[str], rank: int = 16, alpha: float = 16.0,
                    k: int | None = None, selector: str = "sensitivity", reducer: str = "submatrix",
                    store: str | None = None, dtype: str = "float32", device: str = "cpu",
                    sensitivity_layout: str = "single") -> dict:
    """Sensitivity, layer plans, extractions and LoRA inits for each student shape (computed once),
    and for each student the residual base (its weights minus the init's delta) that the init
    adapter trains on: that pair, loaded with stock peft, is the student at step 0.

    sensitivity_layout='per_layer' writes the map one decoder layer at a time (host RAM holds one
    layer of it; with device='cuda' the accumulators stay on the GPU)."""
    ledger = Ledger(Store(store))
    t_src, s_src = nodes.model_source(teacher, ledger.store), nodes.file_source(seeds)
    out = {}
    for student in students:
        shape = arch.shape_of(models.load_config(student))
        chain = extraction_chain(ledger, t_src, s_src, shape, k=k, sample_seed=0, selector=selector, reducer=reducer,
                                 max_length=2048, dtype=dtype, device=device, layout=sensitivity_layout)
        init = init_node(ledger, chain["extraction"], rank=rank, alpha=alpha, dropout=0.05, split="paper", scale=1.0)
        residual = ledger.run(nodes.residual_model_task, {"dtype": dtype},
                              {"student": nodes.model_source(student, ledger.store), "init": init},
                              f"student={_name(student)}, rank={rank}")
        layers = json.loads(ledger.store.header(chain["plan"])["layers"])
        out[student] = {**chain, "lora_init": init, "residual_model": residual, "layers": layers,
                        "init_path": str(ledger.store.tree(Ref.of(init))),
                        "base_path": str(ledger.store.tree(Ref.of(residual)))}
    _publish_summary(ledger, "extract-teacher", {s: v["layers"] for s, v in out.items()})
    out["_ledger"] = [(r.kind, r.key, r.status) for r in ledger.rows]
    return out


# ---- the sweep -------------------------------------------------------------------------------
EXTRACTED = {"transfer", "random-submatrix", "random-layers", "cross-task", "untrained-teacher", "spectrum-matched",
             "shuffled", "early-teacher"}


def variant_init(ledger: Ledger, cfg: SweepConfig, variant: str, teacher: dict, task: TaskSpec, shape: dict,
                 tp, scale: float | None = None) -> dict | None:
    """The LoRA init node a variant trains from (None for vanilla/lora/pissa: no teacher). Every
    control's random draw is seeded by the training seed (tp.seed, recorded in its node's params)."""
    if variant not in EXTRACTED:
        return None
    seeds = nodes.file_source(str(Path(task.dir) / "seeds.jsonl"))
    reducer, selector, transform, draw = cfg.reducer, cfg.selector, "none", 0
    if variant == "random-submatrix":  # the sensitive layers, random rows/columns
        reducer, draw = "random", tp.seed
    elif variant == "random-layers":  # random layers, the sensitive windows
        selector, draw = "random", tp.seed
    elif variant == "cross-task":
        seeds = nodes.file_source(cfg.cross_task_seeds)
    elif variant == "untrained-teacher":
        teacher = ledger.run(nodes.random_model_task, {"seed": tp.seed}, {"like": teacher},
                             f"like={_name(teacher['key'])}, seed={tp.seed}")
        path = str(ledger.store.tree(Ref.of(teacher)))
        teacher = {"kind": "model", "key": path, "digest": teacher["digest"]}
    elif variant == "early-teacher":
        teacher = nodes.model_source(cfg.early_teacher, ledger.store)
    elif variant in ("spectrum-matched", "shuffled"):
        transform = variant
    chain = extraction_chain(ledger, teacher, seeds, shape, k=cfg.k, sample_seed=cfg.sample_seed,
                             selector=selector, reducer=reducer, max_length=cfg.max_length, dtype=cfg.dtype,
                             device=cfg.device, modules=tp.modules, seed=draw)
    return init_node(ledger, chain["extraction"], rank=tp.rank, alpha=tp.alpha, dropout=tp.dropout, split=cfg.split,
                     scale=cfg.init_scale if scale is None else scale, transform=transform,
                     transform_seed=tp.seed if transform != "none" else 0)


def _grid(cfg: SweepConfig) -> list[dict]:
    points = [{}]
    for name, values in cfg.train_grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def _score(ledger: Ledger, cfg: SweepConfig, student: dict, adapter: dict | None, task: TaskSpec, benchmark: str,
           split: str, label: str) -> dict:
    inputs = {"student": student, "data": nodes.dir_source(task.dir, [f"{split}.jsonl", "train.jsonl"])}
    if adapter is not None:
        inputs["adapter"] = adapter
    if benchmark == "winrate":
        inputs["judge"] = nodes.model_source(cfg.judge, ledger.store)
    ref = ledger.run(nodes.scores_task,
                     {"benchmark": benchmark, "task_definition": evaluate.task_digest(benchmark), "split": split,
                      "num_fewshot": cfg.num_fewshot, "limit": cfg.eval_limit, "dtype": cfg.dtype, "device": cfg.device},
                     inputs, f"{label}, {benchmark}, {split}")
    return json.loads(ledger.store.header(ref)["summary"])


@flow(name="sweep", log_prints=True)
def sweep(config: dict) -> dict:
    """One teacher x students x tasks x variants x seeds (x a training grid), each node computed once,
    then the report: variant - lora and transfer - every other variant, with 95% intervals.

    With a grid, every run is scored on val (the selection metric only), each variant keeps its
    best setting, and only those runs are scored on test; the size controls are also scored at
    transfer's setting (same lr and scale: matched effective size)."""
    cfg = parse_config(config)
    ledger = Ledger(Store(cfg.store))
    teacher = nodes.model_source(cfg.teacher, ledger.store)
    rows, curves, grid = [], [], _grid(cfg)
    for student_path in cfg.students:
        student = nodes.model_source(student_path, ledger.store)
        shape = arch.shape_of(models.load_config(student_path))
        for task in cfg.tasks:
            train = nodes.file_source(str(Path(task.dir) / "train.jsonl"))
            runs = {}  # (variant, setting json, seed) -> (adapter ref or None, init size, label)
            for variant, setting, seed in _runs(cfg, grid):
                label = f"{_name(student_path)}, {task.name}, {variant}, seed={seed}" + (f", {setting}" if setting else "")
                adapter, size = (None, {}) if variant == "vanilla" else _train(
                    ledger, cfg, teacher, student, train, task, shape, variant, seed, setting, label)
                runs[variant, json.dumps(setting, sort_keys=True), seed] = (adapter, size, label)
            chosen = _choose(ledger, cfg, student, task, runs) if len(grid) > 1 else None
            benchmarks = [task.benchmark] + [b for b in cfg.benchmarks if b != task.benchmark]
            for (variant, setting, seed), as_variant in _tested(runs, chosen):
                adapter, size, label = runs[variant, setting, seed]
                base = {"student": student_path, "task": task.name, "variant": as_variant, "seed": seed,
                        "setting": setting}
                for bench in benchmarks:
                    summary = _score(ledger, cfg, student, adapter, task, bench, "test", label)
                    rows += [{**base, "benchmark": bench, "metric": metric, "value": value,
                              "top_sv": size.get("top_sv"), "top_sv_ratio": size.get("top_sv_ratio")}
                             for metric, value in summary.items()]
                if adapter is not None:
                    curves += [{**base, "step": i + 1, "loss": loss} for i, loss in enumerate(_losses(ledger, adapter))]
    primary = evaluate.primary_metric(cfg.tasks[0].benchmark)
    paths = _report(ledger, pd.DataFrame(rows), pd.DataFrame(curves), primary, cfg.report_dir)
    summary = report.read_csv(paths["csv"])
    lines = report.headlines(summary, primary)
    _publish_summary(ledger, "sweep", None, summary, paths, lines)
    return {"report": {k: str(v) for k, v in paths.items()}, "computed": ledger.computed(),
            "nodes": [(r.kind, r.key, r.status) for r in ledger.rows],
            "table": summary.to_dict(orient="records"),
            "headline": lines}


def _choose(ledger: Ledger, cfg: SweepConfig, student: dict, task: TaskSpec, runs: dict) -> dict[str, str]:
    """Each variant's training setting with the best mean val score (cfg.select_on, default the task's
    primary metric), over seeds."""
    metric = cfg.select_on or evaluate.primary_metric(task.benchmark)
    bench = "answer_nll" if metric == "answer_nll" else task.benchmark
    val = []
    for (variant, setting, seed), (adapter, _, label) in runs.items():
        value = _score(ledger, cfg, student, adapter, task, bench, "val", label)[metric]
        val.append({"variant": variant, "setting": setting, "seed": seed, "value": value})
    return report.select_settings(pd.DataFrame(val), metric)


def _tested(runs: dict, chosen: dict[str, str] | None):
    """((variant, setting, seed), name in the report) of every run scored on test: each variant at
    its chosen setting, and the size controls also at transfer's (named 'X@transfer-setting')."""
    for key in runs:
        variant, setting, _ = key
        if chosen is None or chosen[variant] == setting:
            yield key, variant
        elif variant in report.SIZE_CONTROLS and chosen.get(report.SUBJECT) == setting:
            yield key, variant + report.AT_SUBJECT


def _losses(ledger: Ledger, adapter: dict) -> list[float]:
    return json.loads((ledger.store.tree(Ref.of(adapter)) / "pkt_train_log.json").read_text())["losses"]


@flow(name="transfer", log_prints=True)
def transfer(teacher: str, student: str, task_dir: str, benchmark: str = "gsm",
             variants: list[str] = ("vanilla", "lora", "transfer"), seeds: list[int] = (0,), train: dict | None = None,
             store: str | None = None, report_dir: str = "pkt-report", dtype: str = "float32",
             device: str = "cpu") -> dict:
    """One teacher, one student, one task: the sweep with a single branch."""
    return sweep({"teacher": teacher, "students": [student],
                  "tasks": [{"name": Path(task_dir).name, "dir": task_dir, "benchmark": benchmark}],
                  "variants": list(variants), "seeds": list(seeds), "train": train or {}, "store": store,
                  "report_dir": report_dir, "dtype": dtype, "device": device})


def _report(ledger: Ledger, scores: pd.DataFrame, curves: pd.DataFrame, primary: str, out_dir: str) -> dict[str, Path]:
    """The report node of this runs table and its training curves (drawn once per distinct pair),
    copied into out_dir."""
    inputs = {"runs": nodes.table_source(ledger.store, scores, "runs.csv")}
    if not curves.empty:
        inputs["curves"] = nodes.table_source(ledger.store, curves, "curves.csv")
    ref = ledger.run(nodes.report_task, {"primary": primary}, inputs, f"{len(scores)} rows, {primary}")
    tree = ledger.store.tree(Ref.of(ref))
    paths = {name: Path(out_dir) / f for name, f in report.REPORT_FILES.items() if (tree / f).exists()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for dest in paths.values():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(tree / dest.name, tmp)
        os.replace(tmp, dest)  # a reader never sees half a report file
    return paths


def _runs(cfg: SweepConfig, grid: list[dict]):
    """(variant, training setting, seed) of every run; vanilla trains nothing, so it runs once (n=1).
    init_scale only varies the inits from a teacher."""
    for variant in cfg.variants:
        if variant == "vanilla":
            yield variant, {}, cfg.seeds[0]
            continue
        settings = grid if variant in EXTRACTED else _unique([{k: v for k, v in g.items() if k != "init_scale"}
                                                              for g in grid])
        yield from ((variant, setting, seed) for setting, seed in itertools.product(settings, cfg.seeds))


def _unique(settings: list[dict]) -> list[dict]:
    seen = {}
    for setting in settings:
        seen.setdefault(json.dumps(setting, sort_keys=True), setting)
    return list(seen.values())


def _train(ledger: Ledger, cfg: SweepConfig, teacher: dict, student: dict, train: dict, task: TaskSpec, shape: dict,
           variant: str, seed: int, setting: dict, label: str) -> tuple[dict, dict]:
    """The adapter node of one run, and its init's effective size at step 0 (lora_init.init_size).
    A setting holds TrainParams fields and, for the inits from a teacher, init_scale."""
    tp = cfg.train_params(seed, {k: v for k, v in setting.items() if k != "init_scale"})
    init = variant_init(ledger, cfg, variant, teacher, task, shape, tp, setting.get("init_scale", cfg.init_scale))
    inputs = {"student": student, "train": train, **({"init": init} if init else {})}
    adapter = ledger.run(nodes.adapter_task,
                         {"variant": variant, "init": "extracted" if init else variant, "train": tp.as_dict(),
                          "dtype": cfg.dtype, "device": cfg.device}, inputs, label)
    return adapter, _init_size(ledger.store, adapter)


def _init_size(store: Store, adapter: dict) -> dict:
    from safetensors import safe_open

    tree = store.tree(Ref.of(adapter))
    with safe_open(str(tree / "adapter_model.safetensors"), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("init_size", "{}"))


def _ui_table(summary: pd.DataFrame) -> list[dict]:
    """The score table as a person reads it in the UI: variant and metric first, short names, 4 decimals."""
    t = summary.assign(student=summary["student"].map(_name))
    first = ["variant", "metric", "mean", "std", "n", "diff", "ci_low", "ci_high", "p_perm", "verdict",
             "transfer_diff", "transfer_ci_low", "transfer_ci_high", "transfer_p_perm", "transfer_verdict",
             "top_sv", "top_sv_ratio", "task", "benchmark", "student"]
    t = t[[c for c in first if c in t] + [c for c in t if c not in first]]
    return json.loads(t.round(4).to_json(orient="records"))


def _publish_summary(ledger: Ledger, title: str, plans: dict | None = None, summary: pd.DataFrame | None = None,
                     paths: dict | None = None, headlines: list[str] | None = None) -> None:
    md = [f"# pkt {title}", "", f"Store: `{ledger.store.root.resolve()}`; {ledger.computed()} computed, "
          f"{len(ledger.rows) - ledger.computed()} reused.", ""]
    md += [f"- {line.strip()}" for line in headlines or []]
    for student, layers in (plans or {}).items():
        md.append(f"- layer plan for `{_name(student)}`: teacher layers {layers}")
    if summary is not None:
        md += ["", report.markdown(summary)]
        create_table_artifact(key=f"pkt-{title}-scores", table=_ui_table(summary),
                              description="pkt scores: mean, std, variant - lora and transfer - variant with 95% CI "
                                          "and sign-flip p")
    if paths:
        md += ["", *(f"- {k}: `{Path(v).resolve()}`" for k, v in paths.items())]
    md += ["", "## Nodes", "", ledger.markdown()]
    create_markdown_artifact(key=f"pkt-{title}-summary", markdown="\n".join(md), description=f"pkt {title} summary")


# ---- the miniature family and the demo ----------------------------------------------------------
@flow(name="build-family", log_prints=True)
def build_family(size: str = "demo", store: str | None = None, seed: int | None = None) -> dict:
    """Pretrain (or reuse) the miniature teacher/student family; returns paths inside the store.
    Another seed builds an independent family of the same size."""
    ledger = Ledger(Store(store))
    label = f"size={size}" + ("" if seed is None else f", seed={seed}")
    ref = ledger.run(nodes.family_task, family.recipe_params(size, seed) | {"size": size}, {}, label)
    root = ledger.store.tree(Ref.of(ref))
    stats = json.loads((root / "family_stats.json").read_text())
    for who in ("teacher", "student"):
        s = stats[who]
        print(f"{who}: {s['params']:,} params, {s['steps']} steps, held-out gsm exact match {s['gsm_em']:.1%}")
    return {"root": str(root), "status": ledger.rows[0].status, "stats": stats}


DEMO_TRAIN = {
    "demo": {"rank": 8, "alpha": 8.0, "lr": 1e-2, "epochs": 6, "batch_size": 64, "micro_batch": 64, "n_train": 512,
             "max_length": 64},
    "test": {"rank": 2, "alpha": 2.0, "lr": 1e-2, "epochs": 1, "batch_size": 16, "micro_batch": 16, "n_train": 32,
             "max_length": 64},
}
ALL_VARIANTS = ["vanilla", "lora", "transfer", "pissa", "random-submatrix", "random-layers", "cross-task",
                "untrained-teacher", "spectrum-matched", "shuffled", "early-teacher"]


@flow(name="demo", log_prints=True)
def demo(size: str = "demo", seeds: list[int] = (0, 1, 2), store: str | None = None,
         report_dir: str = "pkt-report") -> dict:
    """Build or reuse the miniature family, then sweep every variant on the GSM-like task."""
    fam = build_family(size=size, store=store)
    return sweep(demo_config(fam["root"], size, seeds, store, report_dir)) | {"family": fam}


def demo_config(family_root: str, size: str, seeds: list[int], store: str | None, report_dir: str) -> dict:
    """The demo's sweep: every variant on the GSM-like task of a built miniature family."""
    root = Path(family_root)
    return {"teacher": str(root / "teacher"), "students": [str(root / "student")],
            "tasks": [{"name": "gsm", "dir": str(root / "tasks" / "gsm"), "benchmark": "gsm"}],
            "variants": ALL_VARIANTS, "seeds": list(seeds), "early_teacher": str(root / "teacher-early"),
            "cross_task_seeds": str(root / "tasks" / "sni" / "seeds.jsonl"), "train": DEMO_TRAIN[size],
            "benchmarks": ["answer_nll"], "max_length": 64, "report_dir": report_dir,
            **({"store": store} if store else {})}
