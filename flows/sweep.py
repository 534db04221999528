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
from pkt.artifacts.model_id import GENERATION_FILES
from pkt.artifacts.store import Ref, Store
from pkt.core import arch, costs, distill, evaluate, laten, models, report
from pkt.tasks import scores as score_nodes
from pkt.tasks import train as train_nodes

from .config import SETTING_FIELDS, SweepConfig, TaskSpec, parse_config
from .diagnose import submit_diagnostics, with_diagnostics
from .extract import chat_template, prompt_formats, variant_init
from .fresh import curve_rows, fresh_chain
from .graph import (Graph, NotComputed, source_name, task_runner, timeouts_from_env,
                    torch_threads_per_worker)
from .laten import laten_chain
from .names import run_name
from .outputs import check_out_dir, claim_report_dir
from .summary import lead_metric, publish
from .variants import VARIANTS, Variant

def config_tag(cfg: SweepConfig) -> str:
    """What names a sweep's artifacts in the UI: its name, or a short digest of its config."""
    return cfg.name or hashlib.sha256(canonical_json(cfg.model_dump(mode="json")).encode()).hexdigest()[:8]


def _config_name(config) -> str:
    """The config's tag for the run's name; a config that does not validate is named by the error the run reports."""
    try:
        return config_tag(parse_config(config) if isinstance(config, dict) else config)
    except Exception:
        return "invalid"


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
    sweep = Sweep(graph, cfg)
    sweep.submit_selection()
    sweep.submit_tests()
    graph.results()  # every node finished (the first failure is raised here)
    return sweep.report(title, tag, protocol)


class Sweep:
    """One sweep submitted in stages: its selection runs, then (once their val scores are in) its test
    runs, then its report. run_sweep runs the stages in a row; the study runs each stage for every family
    before the next, so that the workers never idle while one family's choice or report waits."""

    def __init__(self, graph: Graph, cfg: SweepConfig):
        check_out_dir(cfg.report_dir, "report_dir")  # before any work: the report must not land on a user's files
        print(prompt_formats(cfg.prompt_format, cfg.teacher, cfg.students))
        if cfg.check is not False:
            check_answers(cfg)
        self.graph, self.cfg = graph, cfg
        self.ids: set[str] = set()  # the graph's nodes this sweep submitted: its report reads their scores
        self.made: dict[str, list] = {}  # variant -> the futures of its runs' results (adapters, LaTen updates)

    def _tracked(self, stage, *args):
        before = set(self.graph.kinds)
        out = stage(*args)
        self.ids |= set(self.graph.kinds) - before
        return out

    def submit_selection(self) -> None:
        self.teacher, self.groups, self.val = self._tracked(submit_selection, self.graph, self.cfg, self.made)

    def submit_tests(self) -> None:
        """The test runs, and each run's step-0 diagnostic beside them (submitted at report time, the
        diagnostics of a study ran a family at a time, each family's report waiting for its own)."""
        self.runs = self._tracked(submit_tests, self.graph, self.cfg, self.teacher, self.groups, self.val, self.made)
        runs = pd.DataFrame([fields for fields, _, _ in self.runs[0]])
        self.diagnostics = {} if runs.empty else self._tracked(submit_diagnostics, self.graph, self.cfg, runs)

    def scores(self) -> list[PrefectFuture]:
        """Every score the sweep computed, val ones included: they chose the settings the table shows."""
        return [self.graph.futures[i] for i, kind in self.graph.kinds.items() if kind == "scores" and i in self.ids]

    def report(self, title: str, tag: str, protocol: dict | None = None) -> dict:
        """Collect the finished runs, write the report into cfg.report_dir, publish it on the flow run."""
        self.submit_report(tag, protocol)
        return self.finish_report(title, tag)

    def submit_report(self, tag: str, protocol: dict | None = None) -> None:
        """The report node over the finished runs, submitted and not waited for: a study submits every
        family's report before it waits for any (waited for one at a time, they left a worker idle)."""
        graph, cfg, store = self.graph, self.cfg, self.graph.store
        scored, selection, dosed, inert, matched = self.runs
        rows, curves, items = _collect(store, scored, item_metrics(cfg), inert)
        pretraining = [row for (student, variant), ref in sorted(_fresh_students(scored).items())
                       for row in curve_rows(store, student, variant, ref)]  # the fresh students' probe loss by step
        matched = sv_matched(_collect(store, matched, set())[0], rows)
        dose = _collect(store, dosed, set())[0]
        if dose:  # the dose-response: every checkpoint's rows and the final one's (steps = the run's own)
            dose += [{**r, "checkpoint": r["steps"]} for r in rows if r["variant"] in {d["variant"] for d in dose}]
        table = pd.DataFrame(rows)
        table = with_diagnostics(graph, table, self.diagnostics)  # each run's step-0 diagnostic: diag_cos, diag_share
        primary = cfg.endpoint.metric if cfg.endpoint else evaluate.primary_metric(cfg.tasks[0].benchmark)
        inputs = {"runs": score_nodes.table_source(store, table, "runs.csv"), "scores": self.scores()}
        for name, extra in (("curves", curves), ("selection", selection), ("items", items), ("dose", dose),
                            ("matched", matched), ("pretraining", pretraining)):
            if extra:
                inputs[name] = score_nodes.table_source(store, pd.DataFrame(extra), f"{name}.csv")
        spec = score_nodes.Report(primary=primary, protocol=report_protocol(cfg, protocol))
        self.primary = primary
        self.report_node = graph.submit(spec, inputs, f"{tag}, {len(table)} rows, {primary}")

    def finish_report(self, title: str, tag: str) -> dict:
        """Wait for the submitted report, copy it into cfg.report_dir with the costs, publish it."""
        graph, cfg, store, primary = self.graph, self.cfg, self.graph.store, self.primary
        paths = copy_report(store, self.report_node.result(), cfg.report_dir)
        used = variant_nodes(graph, self.made)
        paths |= add_costs(paths, cost_table(store, used))
        summary = report.read_csv(paths["csv"])
        shown, why = lead_metric(summary, primary)  # a metric that moves first (the test family's exact match is 0)
        summary = summary.sort_values("metric", key=lambda m: m != shown, kind="stable")
        lines = why + report.headlines(summary, shown)
        results = graph.results()
        publish(store, title, results, tag=tag, summary=summary, paths=paths, headlines=lines)
        return {"report": {k: str(v) for k, v in paths.items()},
                "computed": sum(r["status"] == "computed" for r in results),
                "nodes": [(r["kind"], r["key"], r["status"]) for r in results],
                "table": summary.to_dict(orient="records"), "headline": lines, "variant_nodes": used}


def submit_runs(graph: Graph, cfg: SweepConfig) -> tuple:
    """Submit every run of the sweep: (scored, selection, dosed, inert, matched), what Sweep.report collects.
    A plan (flows/plan.py) submits the same nodes, keys only."""
    made: dict[str, list] = {}
    return submit_tests(graph, cfg, *submit_selection(graph, cfg, made), made)


def submit_selection(graph: Graph, cfg: SweepConfig, made: dict) -> tuple:
    """Every group's selection runs, scored on val: (teacher, groups, val), what submit_tests continues from."""
    teacher = graph.source("model", cfg.teacher)
    groups = []  # (student path, student future, shape, task, train data future)
    for student_path in cfg.students:
        student = graph.source("model", student_path)
        shape = arch.shape_of(models.load_config(student_path))
        for task in cfg.tasks:
            train = graph.source("file", str(Path(task.dir) / "train.jsonl"))
            groups.append((student_path, student, shape, task, train))
    # every group's selection runs first, so that the workers have them all before any choice waits
    return teacher, groups, [_submit_selection(graph, cfg, teacher, group, made) for group in groups]


def submit_tests(graph: Graph, cfg: SweepConfig, teacher: PrefectFuture, groups: list, val: list, made: dict) -> tuple:
    """Each variant's test runs at its chosen setting (a choice waits for its group's val scores), their
    scores and checkpoints, the endpoint's matched controls: (scored, selection, dosed, inert, matched)."""
    scored, selection = [], []  # (row fields, scores future, adapter future or None); val rows
    dosed, inert = [], {}  # scored's rows at the runs' earlier checkpoints; LaTen runs' (own, student's) val NLL
    matched = []  # the endpoint's controls at the subject's chosen setting (Endpoint.at_subject_setting)
    for (path, student, shape, task, train), val_scores in zip(groups, val):
        try:
            rows, chosen = _choose(graph.store, cfg, path, task, val_scores)
        except NotComputed:  # a plan (flows/plan.py): the choice waits for val scores still to compute
            rows, chosen = [], graph.unchosen()
        selection += rows
        benchmarks = [task.benchmark] + [b for b in cfg.benchmarks if b != task.benchmark]
        for v, setting, seed in chosen_runs(cfg, chosen):
            label = _label(path, task, v, setting, seed)
            adapter = CHAINS[v.chain](graph, cfg, v, teacher, student, _data(graph, v, task, train, "test"), task,
                                      shape, seed, setting, label)
            made.setdefault(v.name, []).extend([adapter] if adapter is not None else [])
            scored_path = cfg.teacher if v.model == "teacher" else path  # the teacher row scores the teacher
            kept = _checkpoints(graph, cfg, v, adapter, setting, seed, label)
            for bench in benchmarks:
                fields = {"student": path, "task": task.name, "benchmark": bench, "variant": v.name, "seed": seed,
                          "setting": _setting(setting)}
                future = _score(graph, cfg, scored_path, adapter, task, bench, "test", label, v.name)
                scored.append((fields, future, adapter))
                dosed += [({**fields, "checkpoint": step}, _score(graph, cfg, scored_path, ckpt, task, bench, "test",
                                                                  f"{label}, step {step}", v.name), ckpt)
                          for step, ckpt in kept.items()]
            if v.chain == "laten" and (Path(task.dir) / "val.jsonl").exists():  # is the update inert? its val
                # answer NLL against the untouched student's
                untouched = _label(path, task, VARIANTS["vanilla"], {}, cfg.seeds[0])
                inert[path, task.name, v.name, seed, _setting(setting)] = tuple(
                    _score(graph, cfg, path, a, task, "answer_nll", "val", f"{name}, inert check", n)
                    for a, name, n in ((adapter, label, v.name), (None, untouched, "")))
        at_subject = _at_subject_setting(graph, cfg, teacher, (path, student, shape, task, train), chosen)
        for fields, _, adapter in at_subject:
            made.setdefault(fields["variant"], []).append(adapter)
        matched += at_subject
    return scored, selection, dosed, inert, matched


def _choose(store: Store, cfg: SweepConfig, path: str, task: TaskSpec, val_scores: dict) -> tuple[list, dict]:
    """(the val rows, variant -> its chosen setting) of one student and task's selection runs."""
    metric = _select_metric(cfg, task)
    rows = [{"student": path, "task": task.name, "variant": v.name, "setting": setting, "seed": seed,
             "metric": metric, "value": score_nodes.score_summary(store, f.result())[metric]}
            for (v, setting, seed), f in val_scores.items()]
    chosen = ({v: json.loads(x) for v, x in report.select_settings(pd.DataFrame(rows), metric).items()}
              if rows else {})
    return rows, chosen


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
        out[v, _setting(setting), seed] = _score(graph, cfg, path, adapter, task, _selection_benchmark(cfg, task),
                                                 "val", label, v.name)
    return out


def _data(graph: Graph, v: Variant, task: TaskSpec, train: PrefectFuture, split: str) -> PrefectFuture:
    """A run's training data: the task's train.jsonl, or for a variant trained on what it is scored on
    (the oracle) that split's own file."""
    return graph.source("file", str(Path(task.dir) / f"{split}.jsonl")) if v.data == "scored" else train


def _collect(store: Store, scored: list, keep_items: set[str], inert: dict | None = None) -> tuple[list, list, list]:
    """The runs table (one row per run x metric, with the init's size, the test-set size, the optimizer
    steps, the variant's route, and for a LaTen update its size per module and whether it is inert), the
    training curves, and the per-item scores of the metrics in keep_items."""
    rows, curves, items, seen = [], [], [], set()
    for fields, future, adapter in scored:
        result = adapter.result() if adapter is not None else None
        trained = result is not None and result["kind"] in train_nodes.ADAPTER_KINDS  # not LaTen's update
        size = train_nodes.init_size(store, result) if trained else {}
        losses = train_nodes.train_losses(store, result) if trained else []
        per_item = store.tensors(future.result())
        n_items = len(per_item["doc_id"])
        summary = score_nodes.score_summary(store, future.result())
        run = tuple(fields[k] for k in ("student", "task", "variant", "seed", "setting"))
        laten_run = result is not None and result["kind"] == "laten_delta"
        extra = _laten_fields(store, fields["student"], result, (inert or {}).get(run)) if laten_run else {}
        rows += [{**fields, "metric": metric, "value": value, "top_sv": size.get("top_sv"),
                  "top_sv_ratio": size.get("top_sv_ratio"), "n_items": n_items, "steps": len(losses),
                  "route": VARIANTS[fields["variant"]].route, **extra}
                 for metric, value in summary.items()]
        for metric in keep_items & summary.keys():
            name = metric.split("/")[0]  # "exact_match/strict-match" is stored per item as "exact_match"
            if name in per_item:
                items += [{**fields, "metric": metric, "item": int(i), "value": x}
                          for i, x in zip(per_item["doc_id"].tolist(), per_item[name].tolist())]
        if trained and run not in seen:
            seen.add(run)
            base = {k: fields[k] for k in ("student", "task", "variant", "seed", "setting")}
            curves += [{**base, "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    return rows, curves, items


def _fresh_students(scored: list) -> dict[tuple[str, str], dict]:
    """(student, variant) -> the ref of each fresh student the scored runs read."""
    return {(fields["student"], fields["variant"]): adapter.result() for fields, _, adapter in scored
            if adapter is not None and adapter.result()["kind"] == "fresh_student"}


SV_TOLERANCE = 0.10  # a control at the subject's setting is size-matched when its top singular value is within 10%


def _at_subject_setting(graph: Graph, cfg: SweepConfig, teacher: PrefectFuture, group: tuple,
                        chosen: dict[str, dict]) -> list:
    """The secondary contrast's runs: each endpoint control trained at its subject's chosen setting (the
    same lr and init scale, so size-matched by construction), over the test seeds, scored on test."""
    path, student, shape, task, train = group
    e = cfg.endpoint
    if not e or not e.at_subject_setting or (e.tasks and task.name not in e.tasks):
        return []
    out = []
    for c in e.comparisons:
        v = VARIANTS[c.control]
        setting = chosen.get(c.subject, cfg.grid_points(c.subject)[0])
        if not v.extracted or c.subject == "lora":
            continue  # only an init from the teacher has the subject's scale to share
        for seed in cfg.seeds:
            label = _label(path, task, v, setting, seed) + f", at {c.subject}'s setting"
            adapter = CHAINS[v.chain](graph, cfg, v, teacher, student, train, task, shape, seed, setting, label)
            fields = {"student": path, "task": task.name, "benchmark": task.benchmark, "variant": v.name,
                      "seed": seed, "setting": _setting(setting), "at_setting_of": c.subject}
            out.append((fields, _score(graph, cfg, path, adapter, task, task.benchmark, "test", label, v.name),
                        adapter))
    return out


def sv_matched(matched: list[dict], rows: list[dict]) -> list[dict]:
    """matched rows with sv_ratio (their init's top singular value over the subject's run of the same seed)
    and sv_matched (within SV_TOLERANCE): the check that the secondary contrast compares equal sizes."""
    key = ("student", "task", "seed", "metric")
    subject = {(r["variant"], *(r[k] for k in key)): r.get("top_sv") for r in rows}
    out = []
    for r in matched:
        own, theirs = r.get("top_sv"), subject.get((r["at_setting_of"], *(r[k] for k in key)))
        ratio = own / theirs if own is not None and theirs else None
        out.append({**r, "sv_ratio": ratio, "sv_matched": ratio is not None and abs(ratio - 1) <= SV_TOLERANCE})
    return out


INERT_NOTE = "not evaluated: inert at this width"


def _laten_fields(store: Store, student: str, delta: dict, val: tuple | None) -> dict:
    """A LaTen run's update size (||delta|| / ||W|| per module type, as JSON) and, from its val answer NLL
    against the untouched student's, whether it is inert (|change| < laten.INERT_NLL nats)."""
    size = laten.update_size(store.tensors(delta), models.LazyWeights.from_model_dir(student))
    out = {"update_size": json.dumps(size, sort_keys=True), "update_size_max": max(size.values(), default=0.0)}
    moved = json.loads(store.header(delta).get("translator", "null"))  # a translator trained until val moved
    if moved:
        out |= {"translator_steps": moved["steps"], "translator_moved_at": moved["moved_at"]}
    if val is not None:
        own, base = (score_nodes.score_summary(store, f.result())["answer_nll"] for f in val)
        out |= {"val_nll_moved": own - base, "inert": abs(own - base) < laten.INERT_NLL}
        out["note"] = INERT_NOTE if out["inert"] else ""
    return out


def _checkpoints(graph: Graph, cfg: SweepConfig, v: Variant, adapter, setting: dict, seed: int,
                 label: str) -> dict[int, PrefectFuture]:
    """step -> the future of each earlier checkpoint of a trained run (the final one is the adapter itself)."""
    if adapter is None or SCORED_AS[v.chain] != "adapter":
        return {}
    tp = cfg.train_params(seed, {k: x for k, x in setting.items() if k not in SETTING_FIELDS})
    return {step: graph.submit(train_nodes.AdapterCheckpoint(step=step), {"adapter": adapter}, f"{label}, step {step}")
            for step in sorted(tp.checkpoints) if step != tp.steps}


def report_protocol(cfg: SweepConfig, extra: dict | None = None) -> dict:
    """What the report states about how the table was made: the endpoint, every variant's grid, the
    selection and test seeds and the selection metric (plus the flow's caveat and family gates); with a
    LaTen variant trained until_moved, its rule (laten: until_moved, max_steps), which its grid's step 0 stands for."""
    moved = cfg.laten.until_moved is not None and any(VARIANTS[v].chain == "laten" for v in cfg.variants)
    rule = laten.LatenParams(until_moved=cfg.laten.until_moved, max_steps=cfg.laten.max_steps)
    return {"endpoint": cfg.endpoint.model_dump(mode="json") if cfg.endpoint else None,
            **({"laten": {"until_moved": cfg.laten.until_moved, "max_steps": rule.step_budget(cfg.laten.n_extract)}}
               if moved else {}),
            "grids": {v: cfg.grid_points(v) for v in cfg.variants if VARIANTS[v].trains},
            "selection_seeds": list(cfg.selection_seeds), "test_seeds": list(cfg.seeds),
            "select_on": cfg.select_on, "prompt_format": prompt_formats(cfg.prompt_format, cfg.teacher, cfg.students),
            **(extra or {})}


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
    return graph.submit(train_nodes.Adapter(variant=v.name, init=v.init, train=tp.as_dict(), dtype=cfg.dtype,
                                            device=cfg.device, chat_template=student_template(graph, cfg, student)),
                        inputs, label)


def student_template(graph: Graph, cfg: SweepConfig, student: PrefectFuture) -> bool:
    """Whether a student's samples go in its own chat template (chat_template() of its model source)."""
    return chat_template(cfg.prompt_format, graph.path_of(student))


def check_answers(cfg: SweepConfig) -> None:
    """Before any node: each student's greedy answers to a few val items of each generated benchmark, in
    the prompt format it will be scored in; stops with one sentence when they look broken."""
    checked = [task for task in cfg.tasks if task.benchmark in evaluate.CHECKED]
    for student in cfg.students if checked else []:
        fmt = "chat" if chat_template(cfg.prompt_format, student) else "paper"
        if fmt == "paper" and cfg.check is None:  # a base model in the paper's layout (the miniature family's
            continue  # test size answers nothing by design): its empty answers are a measurement, not a format bug
        model, tok = models.load_model(student, dtype=cfg.dtype, device=cfg.device), models.load_tokenizer(student)
        for task in checked:
            evaluate.check_answers(model, tok, task.benchmark, task.dir, prompt_format=fmt,
                                   max_gen_toks=task.max_gen_toks, who=source_name(student))


def _distill(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
             train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
             label: str) -> PrefectFuture:
    """The future of one data-route run's adapter: kd (a kd_adapter node) or seq-kd (the teacher's completions
    of the task's prompts, then an adapter trained on them). Both read prompts only (pkt_core/distill.py)."""
    tp = cfg.train_params(seed, {k: x for k, x in setting.items() if k not in SETTING_FIELDS})
    prompts = graph.source("dir", task.dir, [distill.prompt_file(task.dir)])
    templated = student_template(graph, cfg, student)  # the data route renders as the other arms do (data.render)
    if v.chain == "kd":
        return graph.submit(train_nodes.KdAdapter(variant=v.name, train=tp.as_dict(), dtype=cfg.dtype,
                                                  device=cfg.device, chat_template=templated),
                            {"student": student, "teacher": teacher, "prompts": prompts}, label)
    completions = graph.submit(
        train_nodes.TeacherCompletions(max_new_tokens=cfg.completion_tokens, dtype=cfg.dtype, device=cfg.device,
                                       chat_template=chat_template(cfg.prompt_format, cfg.teacher)),
        {"teacher": teacher, "prompts": prompts}, f"{source_name(cfg.teacher)}, {task.name} prompts")
    return graph.submit(train_nodes.Adapter(variant=v.name, init="lora", train=tp.as_dict(), dtype=cfg.dtype,
                                            device=cfg.device, chat_template=templated),
                        {"student": student, "train": completions}, label)


CHAINS = {"adapter": _train, "laten": laten_chain, "kd": _distill, "seq-kd": _distill,  # Variant.chain -> its nodes
          "fresh": fresh_chain}
SCORED_AS = {"adapter": "adapter", "laten": "delta", "kd": "adapter", "seq-kd": "adapter",  # -> the Scores input
             "fresh": "student"}  # a fresh student replaces the student it is scored as


def _score(graph: Graph, cfg: SweepConfig, student: str, adapter, task: TaskSpec, benchmark: str, split: str,
           label: str, variant: str = "") -> PrefectFuture:
    # a score generates: its student source covers the generation defaults too (model_id.GENERATION_FILES)
    inputs = {"student": graph.source("model", student, list(GENERATION_FILES)),
              "data": graph.source("dir", task.dir, score_nodes.score_data_files(split))}
    if adapter is not None:
        inputs[SCORED_AS[VARIANTS[variant].chain if variant else "adapter"]] = adapter
    if benchmark == "winrate":
        inputs["judge"] = graph.source("model", cfg.judge, list(GENERATION_FILES))
    spec = score_nodes.Scores(benchmark=benchmark, task_definition=evaluate.task_digest(benchmark), split=split,
                              num_fewshot=cfg.num_fewshot, limit=cfg.eval_limit, dtype=cfg.dtype, device=cfg.device,
                              chat_template=chat_template(cfg.prompt_format, student),
                              max_gen_toks=task.max_gen_toks if benchmark == task.benchmark else None)
    return graph.submit(spec, inputs, f"{label}, {benchmark}, {split}")


def copy_report(store: Store, ref: dict, out_dir: str) -> dict[str, Path]:
    """The report node's files, copied into out_dir (each replaced atomically: a reader never sees
    half a report file). A directory holding a user's files is refused (flows/outputs.py)."""
    claim_report_dir(out_dir)
    tree = store.tree(Ref.of(ref))
    files = {**report.REPORT_FILES, **score_nodes.BESIDE_REPORT}
    paths = {name: Path(out_dir) / f for name, f in files.items() if (tree / f).exists()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for dest in paths.values():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(tree / dest.name, tmp)
        os.replace(tmp, dest)
    return paths


def sweep_graph(cfg: SweepConfig, title: str, tag: str) -> dict:
    with task_runner(cfg.runner, cfg.workers, cfg.dask_address) as runner:
        graph = Graph(Store(cfg.store), runner, torch_threads_per_worker(cfg.runner, cfg.workers),
                      timeouts={**cfg.timeouts, **timeouts_from_env()})  # --timeout wins per kind
        return run_sweep(graph, cfg, title, tag)


@flow(name="sweep", log_prints=True, flow_run_name=run_name("sweep", extra=lambda p: {"config": _config_name(p["config"])}))
def sweep(config: SweepConfig) -> dict:
    """One teacher x students x tasks x variants x seeds (x a training grid), each node computed
    once, then the report: paired differences with 95% intervals."""
    cfg = parse_config(config) if isinstance(config, dict) else config
    return sweep_graph(cfg, "sweep", config_tag(cfg))


@flow(name="transfer", log_prints=True, flow_run_name=run_name("transfer", "student", "task_dir"))
def transfer(teacher: str, student: str, task_dir: str, benchmark: str = "gsm",
             variants: list[str] = ("vanilla", "lora", "transfer"), seeds: list[int] = (0,), train: dict | None = None,
             store: str | None = None, report_dir: str = "pkt-report", dtype: str = "float32",
             device: str = "cpu", laten: dict | None = None, prompt_format: str = "auto",
             check: bool | None = None, max_gen_toks: int | None = None) -> dict:
    """One teacher, one student, one task: the sweep with a single branch (laten: LaTen's settings;
    max_gen_toks: the generation budget, None: the benchmark's own)."""
    task = {"name": Path(task_dir).name, "dir": task_dir, "benchmark": benchmark}
    cfg = parse_config({"teacher": teacher, "students": [student],
                        "tasks": [{**task, **({"max_gen_toks": max_gen_toks} if max_gen_toks else {})}],
                        "variants": list(variants), "seeds": list(seeds), "train": train or {}, "store": store,
                        "report_dir": report_dir, "dtype": dtype, "device": device, "laten": laten or {},
                        "prompt_format": prompt_format, "check": check})
    return sweep_graph(cfg, "transfer", config_tag(cfg))
