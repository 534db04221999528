"""pkt demo, extract, transfer, sweep and diagnose: each command's inputs checked, then its flow run."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path



def _report_dir(path: str, flag: str, args, inputs=(), store: str | None = None) -> None:
    """Before any work: refuse a report directory that would clobber a user's files; with --force,
    claim it for pkt (flows/outputs.py)."""
    from pkt.artifacts.store import default_root

    from .outputs import check_out_dir, claim_report_dir

    checks = {"inputs": inputs, "store": store or default_root()}
    if args.force:
        claim_report_dir(path, flag, force=True, **checks)
    else:
        check_out_dir(path, flag, **checks)



EXTRACT_FLAGS = {"teacher": "--teacher", "seeds": "--seeds", "students": "--student", "rank": "--rank",
                 "alpha": "--alpha", "k": "--k", "reducer": "--reducer", "selector": "--selector", "svd": "--svd",
                 "dtype": "--dtype", "device": "--device", "store": "--store", "max_length": "--max-length",
                 "prompt_format": "--prompt-format"}



SWEEP_FLAGS = {"teacher": "--teacher", "students": "--student", "tasks": "--task-dir", "variants": "--variants",
               "train": "--train", "dtype": "--dtype", "device": "--device", "report_dir": "--report-dir",
               "store": "--store", "laten": "--method-params", "laten.n_extract": "--laten-extract",
               "laten.n_align": "--laten-align", "prompt_format": "--prompt-format"}



MAX_COUNT = 1_000_000  # a count of seeds or batches; the sweep's size check judges the product



def _count(value: str, flag: str) -> int:
    from .config import ConfigError

    try:
        n = int(value)
    except ValueError:  # not a number, or one of more than 4300 digits
        n = 0
    if not 1 <= n <= MAX_COUNT:
        raise ConfigError(f"{flag} {value[:30]}: give a whole number of at least 1 (and at most {MAX_COUNT:,})")
    return n



def _json_arg(value: str, flag: str, example: str):
    """A JSON object given on the command line, or one sentence naming the flag."""
    from .config import ConfigError

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e.msg}); give an object, e.g. '{example}'") from None
    except ValueError as e:  # a number of more than 4300 digits
        raise ConfigError(f"{flag}: a number too long to read ({str(e).split(':')[0]}); give an object, e.g. "
                          f"'{example}'") from None
    except RecursionError:
        raise ConfigError(f"{flag}: nested too deeply to read; give an object, e.g. '{example}'") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag}: give a JSON object, e.g. '{example}'")
    return parsed



def extract_config(args):
    from .config import ExtractConfig, validate

    return validate(ExtractConfig, {
        "teacher": args.teacher, "seeds": args.seeds, "students": args.student, "rank": args.rank,
        "alpha": args.alpha, "k": args.k, "reducer": args.reducer, "selector": args.selector, "svd": args.svd,
        "dtype": args.dtype, "device": args.device, "store": args.store, "max_length": args.max_length,
        "sensitivity_layout": "per_layer" if args.per_layer_sensitivity else "single",
        "prompt_format": args.prompt_format}, "", EXTRACT_FLAGS)



def transfer_config(args):
    from .config import SweepConfig, validate

    train = _json_arg(args.train, "--train", '{"lr": 1e-3}')
    seeds = _count(args.seeds, "--seeds")
    task = {"name": Path(args.task_dir).name, "dir": args.task_dir, "benchmark": args.benchmark}
    if getattr(args, "max_gen_toks", None) is not None:
        task["max_gen_toks"] = _count(args.max_gen_toks, "--max-gen-toks")
    raw = {"teacher": args.teacher, "students": [args.student], "tasks": [task],
           "variants": [v.strip() for v in args.variants.split(",") if v.strip()], "seeds": list(range(seeds)),
           "train": train, "store": args.store, "report_dir": args.report_dir, "dtype": args.dtype,
           "device": args.device, "laten": _laten_args(args), "prompt_format": getattr(args, "prompt_format", "auto"),
           "check": False if getattr(args, "no_check", False) else None}
    return validate(SweepConfig, raw, "", SWEEP_FLAGS)



def _laten_args(args) -> dict:
    """LaTen's settings: --method-params, with --laten-extract / --laten-align over its sample counts."""
    laten = _json_arg(getattr(args, "method_params", None) or "{}", "--method-params", '{"n_extract": 8}')
    for flag, field in (("laten_extract", "n_extract"), ("laten_align", "n_align")):
        if getattr(args, flag, None) is not None:
            laten[field] = getattr(args, flag)
    return laten



# ---- commands ----------------------------------------------------------------------------------
def _seed_list(value: str, flag: str) -> list[int]:
    from .config import ConfigError

    try:
        seeds = [int(s) for s in value.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{flag} {value}: give distinct whole numbers separated by commas, e.g. {flag} 0,1")
    return seeds



PLAN_CAP = 100_000  # above this many nodes a sweep is judged by its full count: looking each up takes long


def check_sweep_size(cfg, args, check_inputs) -> None:
    """State the sweep's size before it starts: the nodes to compute, those the store holds apart
    (flows/plan.py: its keys derived and looked up, after check_inputs(cfg)), with the time their kinds
    took in this store; above --max-nodes to compute, refuse unless --yes. A sweep of more than PLAN_CAP
    nodes is judged by its full count (flows/sweep_size.py: node_counts) before its inputs are read."""
    from pkt.artifacts.store import Store

    from .config import ConfigError
    from .sweep_size import describe_size, node_counts, seconds_per_node
    from .plan import plan_sweep

    try:
        limit = int(args.max_nodes)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"--max-nodes {args.max_nodes[:30]}: give a whole number of at least 1")
    store = Store(cfg.store)
    per_node = seconds_per_node(store.records() if store.root.is_dir() else [])
    counts = node_counts(cfg)
    planned = sum(counts.values()) <= PLAN_CAP
    if planned:
        check_inputs(cfg)
        plan = plan_sweep(cfg)
        total, size = describe_size(plan.compute, per_node, plan.reused, plan.choice_pending)
    else:
        total, size = describe_size(counts, per_node)
        size += " (every node counted: too many to look up in the store one by one)"
    if total > limit and not args.yes:
        raise ConfigError(f"this sweep has {size}, above --max-nodes {limit:,}; shrink its grids, seeds or variants, "
                          "or pass --yes to run it (or a higher --max-nodes)")
    if not planned:
        check_inputs(cfg)
    print(f"pkt {args.cmd}: {size}", flush=True)



def store_option(path: str | None) -> str | None:
    """--store as the user meant it: a quoted ~ is their home; a path that is a file is refused
    before any work starts (not after Prefect's server is up)."""
    from pkt.artifacts.store import StoreError, default_root

    if path is not None:
        path = os.path.expanduser(path)
    root = Path(path) if path is not None else default_root()
    if root.exists() and not root.is_dir():
        where = "--store" if path is not None else "PKT_STORE (or the default ./.pkt/store)"
        raise StoreError(f"{where} {root}: is a file, not a directory; give the store's directory (it is created "
                         "if missing)")
    return path



def cmd_demo(args) -> int:
    from .server import import_while_starting, prefect_api

    args.store = store_option(args.store)
    if args.study:
        family_seeds = _seed_list(args.families, "--families")
        started = time.time()
        _report_dir(args.report_dir or "pkt-study", "--report-dir", args, store=args.store)
        import_while_starting("pkt.flows.study")
        with prefect_api():
            from .study import STUDY_FAMILIES, study

            out = study(store=args.store, report_dir=args.report_dir or "pkt-study", family_seeds=family_seeds,
                        n_families=min(STUDY_FAMILIES, len(family_seeds)), testbed=args.testbed)
        _print_result(out)
        print(f"study wall time {time.time() - started:.0f} s")
        return 0
    from .config import DemoConfig, validate

    cfg = validate(DemoConfig, {"size": args.size, "seeds": args.seeds, "report_dir": args.report_dir or "pkt-report",
                                "store": args.store, "runner": args.runner, "workers": args.workers}, "",
                   {"size": "--size", "seeds": "--seeds", "runner": "--runner", "workers": "--workers"})
    _report_dir(cfg.report_dir, "--report-dir", args, store=cfg.store)
    import_while_starting("pkt.flows.demo")
    with prefect_api():
        from .demo import demo

        out = demo(size=cfg.size, seeds=list(range(cfg.seeds)), store=cfg.store, report_dir=cfg.report_dir,
                   runner=cfg.runner, workers=cfg.workers)
    _print_result(out)
    from .demo import SMOKE_CAVEAT

    print("\n" + SMOKE_CAVEAT.format(seeds=cfg.seeds) + " (This caveat is also in report.md.)")
    return 0



def cmd_extract(args) -> int:
    from .input_checks import check_extract_inputs
    from .server import import_while_starting, prefect_api

    args.store = store_option(args.store)
    cfg = extract_config(args)
    check_extract_inputs(cfg)
    import_while_starting("pkt.flows.extract")
    with prefect_api():
        from .extract import extract_teacher, prompt_formats

        print(prompt_formats(cfg.prompt_format, cfg.teacher, cfg.students))
        out = extract_teacher(**cfg.model_dump())
    for kind, key, status in out.pop("_ledger"):
        print(f"{kind:12s} {key}  {status}")
    for student, v in out.items():
        print(f"layer plan for {student}: teacher layers {v['layers']}")
        print(f"fine-tune {student} from these two together (step 0 computes the student; README: "
              "'Fine-tuning from pkt extract'):")
        print(f"  base model: {v['base_path']}")
        print(f"  LoRA init:  {v['init_path']}")
        print("  (the LoRA init alone on the original student is NOT the student: its base must be the one above)")
        _print_energy_kept(v["init_path"], cfg.rank)
    return 0



def _print_energy_kept(init_path: str, rank: int) -> None:
    """Per module type, the share of the extracted pieces' squared norm that the rank-r init keeps
    (from the init's header): the rest is what fine-tuning starts without."""
    from safetensors import safe_open

    with safe_open(str(Path(init_path) / "adapter_model.safetensors"), framework="pt") as f:
        kept = json.loads((f.metadata() or {}).get("energy_kept_by_module", "{}"))
    if not kept:
        return
    print(f"  what the rank-{rank} init keeps of the extracted teacher pieces (||BA||^2 / ||W||^2, the exact "
          f"top-{rank} SVD); the rest is what fine-tuning starts without:")
    for module, v in kept.items():
        print(f"    {module:8s} {v['mean']:6.1%} (min {v['min']:.1%}, max {v['max']:.1%}, {v['pieces']} pieces)")



def cmd_transfer(args) -> int:
    from .input_checks import check_benchmark, check_sweep_inputs
    from .server import import_while_starting, prefect_api

    from pkt.core.laten import LatenError

    args.store = store_option(args.store)
    cfg = transfer_config(args)
    check_benchmark(args.benchmark, "--benchmark")

    def check_inputs(cfg):
        try:
            check_sweep_inputs(cfg)
        except LatenError as e:  # the sentence names the sweep config's fields; pkt transfer's are flags
            raise LatenError(str(e).replace("lower laten.n_extract/n_align", "lower --laten-extract/--laten-align")) \
                from None

    _report_dir(cfg.report_dir, "--report-dir", args, [cfg.teacher, *cfg.students, cfg.tasks[0].dir], cfg.store)
    check_sweep_size(cfg, args, check_inputs)  # after every refusal that needs no store: planning writes into it
    import_while_starting("pkt.flows.sweep")
    with prefect_api():
        from .sweep import transfer

        out = transfer(teacher=cfg.teacher, student=cfg.students[0], task_dir=cfg.tasks[0].dir,
                       benchmark=cfg.tasks[0].benchmark, variants=cfg.variants, seeds=cfg.seeds,
                       train=cfg.train.model_dump(mode="json"), store=cfg.store, report_dir=cfg.report_dir,
                       dtype=cfg.dtype, device=cfg.device, laten=cfg.laten.model_dump(mode="json"),
                       prompt_format=cfg.prompt_format, check=cfg.check, max_gen_toks=cfg.tasks[0].max_gen_toks)
    _print_result(out)
    return 0



def cmd_sweep(args) -> int:
    from .input_checks import check_sweep_inputs
    from .config import load_config
    from .server import import_while_starting, prefect_api

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": args.store})
    cfg = cfg.model_copy(update={"store": store_option(cfg.store)})
    if args.no_check:
        cfg = cfg.model_copy(update={"check": False})
    _report_dir(cfg.report_dir, f"{args.config}: report_dir", args,
                [cfg.teacher, *cfg.students, *(t.dir for t in cfg.tasks)], cfg.store)
    check_sweep_size(cfg, args, check_sweep_inputs)  # after every refusal that needs no store: planning writes into it
    import_while_starting("pkt.flows.sweep")
    with prefect_api():
        from .sweep import sweep

        out = sweep(cfg.model_dump(mode="json"))
    _print_result(out)
    return 0



def diagnose_config(args):
    """(sweep config of the one branch, {seed, batches, init_scale}), validated like `pkt transfer`'s."""
    from pkt.core.inputs import check_seed

    from .config import ConfigError
    from .diagnose import DEFAULT_VARIANTS

    train = _json_arg(args.train, "--train", '{"max_length": 512}')
    train.update(rank=args.rank, alpha=args.alpha or args.rank)
    try:
        extra = {"seed": int(args.seed), "init_scale": float(args.init_scale)}
    except ValueError:
        raise ConfigError(f"--seed {args.seed[:30]} / --init-scale {args.init_scale[:30]}: give numbers, e.g. --seed 0 "
                          "--init-scale 1") from None
    check_seed(extra["seed"], "--seed")
    extra["batches"] = _count(args.batches, "--batches")
    cfg = transfer_config(argparse.Namespace(
        teacher=args.teacher, student=args.student, task_dir=args.task, benchmark="gsm",
        variants=args.variants or ",".join(DEFAULT_VARIANTS), seeds="1", train=json.dumps(train), store=args.store,
        report_dir="pkt-report", dtype=args.dtype, device=args.device))
    from .variants import VARIANTS

    diagnosable = [v for v in VARIANTS.values() if v.trains and v.chain == "adapter"]
    if not any(v in {d.name for d in diagnosable} for v in cfg.variants):
        raise ConfigError(f"--variants {args.variants}: none of them trains from a LoRA init (vanilla trains nothing, "
                          f"LaTen fine-tunes nothing), so there is no init to diagnose; choose among "
                          f"{', '.join(d.name for d in diagnosable)}")
    return cfg, extra



def cmd_diagnose(args) -> int:
    import pandas as pd

    from .input_checks import check_sweep_inputs
    from .server import import_while_starting, prefect_api

    cfg, extra = diagnose_config(args)
    check_sweep_inputs(cfg)
    import_while_starting("pkt.flows.diagnose")
    with prefect_api():
        from .diagnose import diagnose_inits

        out = diagnose_inits(teacher=cfg.teacher, student=cfg.students[0], task_dir=cfg.tasks[0].dir,
                             variants=cfg.variants, seed=extra["seed"], train=cfg.train.model_dump(mode="json"),
                             init_scale=extra["init_scale"], batches=extra["batches"], store=cfg.store,
                             dtype=cfg.dtype, device=cfg.device)
    table = pd.DataFrame(out["table"])
    print("cos: cosine between the init's applied update and the student's step-0 task gradient, signed so that "
          "positive = the update points downhill (helps)")
    print("share: part of that gradient's squared norm the first LoRA step can follow (its tangent space at init)")
    print(f"gradient over {max(out['n_samples'].values(), default=0)} training samples (answer tokens only, the "
          "fine-tuning loss)\n")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        for value, fmt in (("cos", "{:+.4f}"), ("share", "{:.4f}")):
            wide = table.pivot(index="variant", columns="module", values=value)
            modules = list(dict.fromkeys(table["module"]))
            print(f"{value} per module type (total: all modules as one vector)")
            print(wide.loc[list(dict.fromkeys(table["variant"])), modules].to_string(na_rep="n/a", float_format=fmt.format))
            print()
    for v in cfg.variants:
        if v not in set(table["variant"]):
            print(f"{v}: n/a (trains nothing, so it has no init)")
    print(f"\n{out['computed']} nodes computed, {len(out['nodes']) - out['computed']} reused.")
    return 0



UNDEFINED_NOTE = ("-: undefined (a variant's difference to itself, the std and init size of a one-run variant "
                  "like vanilla, and an interval or p-value with fewer than 2 pairs)")


def _dashed(table):
    """The table as text cells: numbers to 4 decimals, an undefined (missing) cell as '-', never NaN."""
    import pandas as pd

    def cell(x):
        if x is None or (isinstance(x, float) and pd.isna(x)):
            return "-"
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    return table.map(cell)


def _print_result(out: dict) -> None:
    import pandas as pd

    table = pd.DataFrame(out["table"])
    if "student" in table:
        table["student"] = table["student"].map(lambda s: Path(str(s)).name)
    views = [["student", "task", "metric", "variant", "mean", "std", "n", "top_sv", "top_sv_ratio", "diff", "ci_low",
              "ci_high", "p_t", "p_adj", "verdict"],
             ["student", "task", "metric", "variant", "transfer_diff", "transfer_ci_low", "transfer_ci_high",
              "transfer_p_t", "transfer_p_adj", "transfer_verdict"]]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 70):
        for cols in views:  # variant - lora, then transfer - variant
            print(_dashed(table[[c for c in cols if c in table]]).to_string(index=False))
            print()
    print(UNDEFINED_NOTE)
    print()
    for line in out["headline"]:
        print(line)
    print(f"\n{out['computed']} nodes computed, {len(out['nodes']) - out['computed']} reused.")
    for name, path in out["report"].items():
        print(f"{name:9s} {Path(path).resolve()}")
    api = os.environ.get("PREFECT_API_URL", "")
    where = f"open {api.removesuffix('/api')}" if api else "run `pkt ui`, then open http://127.0.0.1:4200"
    from .server import unrecorded

    if not unrecorded():  # the server holds every task run of this command (flows/server.py checked)
        print(f"Runs, scores and reports are in the Prefect UI: {where}")
