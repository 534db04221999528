"""The pkt command line. Every command runs a Prefect flow (no server needed) or reads the store.

Each command validates all of its inputs first (options, config, data files, model configs,
headers and tokenizers) and refuses with one sentence before any work starts; only then does a
flow command start its Prefect API (flows/server.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (the Prefect server's stop) runs."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store root (default: $PKT_STORE or ./.pkt/store)")


def _allow_bin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-bin", action="store_true",
                   help="also load pickled *.bin checkpoints (with torch weights_only=True); off by default")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (device_map over GPUs)")
    _allow_bin_arg(p)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="pkt", description="Parametric knowledge transfer between causal LMs (Seeking Neural Nuggets) "
                "as a Prefect pipeline of content-addressed artifacts.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    p = sub.add_parser("demo", help="build or reuse the miniature family and run the demo sweep")
    p.add_argument("--size", default="demo", help="family size: demo (default) or test (builds in seconds)")
    p.add_argument("--seeds", default="3", help="training seeds per variant (default 3)")
    p.add_argument("--report-dir", default=None, help="default: pkt-report (pkt-study with --study)")
    p.add_argument("--runner", default="threads", help="task runner: threads (default, one worker), processes, "
                   "or dask (a LocalCluster)")
    p.add_argument("--workers", default="1", help="parallel workers for processes or dask (default 1)")
    p.add_argument("--study", action="store_true",
                   help="the study instead of the smoke-size demo: every variant x 5 seeds x 2 lr x 3 init "
                        "scales, two independently built families, GSM-like and MMLU-like tasks")
    p.add_argument("--families", default="0,1", help="with --study: the family seeds to build and sweep")
    _store_arg(p)

    p = sub.add_parser("extract", help="teacher sensitivity, layer plan and LoRA init for a student's shape")
    p.add_argument("--teacher", required=True, help="teacher model directory or hub id")
    p.add_argument("--seeds", required=True, help="seed samples, chat jsonl")
    p.add_argument("--student", required=True, action="append", help="student model (repeat for several)")
    p.add_argument("--rank", default="16")
    p.add_argument("--alpha", default="16.0")
    p.add_argument("--k", default=None, help="seed samples to draw (default: all in the file)")
    p.add_argument("--reducer", default="submatrix", help="submatrix (default), rowcol or random")
    p.add_argument("--svd", default="auto", help="LoRA-init SVD: auto (default: randomized torch.svd_lowrank for "
                   "large pieces, full SVD for small ones), full, or lowrank")
    p.add_argument("--per-layer-sensitivity", action="store_true",
                   help="write the sensitivity map one decoder layer at a time (big teachers: host RAM holds "
                        "one layer of it)")
    _device_args(p)
    _store_arg(p)

    p = sub.add_parser("transfer", help="one teacher, one student, one task: variants x seeds, with report")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--task-dir", required=True, help="directory with train/seeds/val/test.jsonl")
    p.add_argument("--benchmark", default="gsm", help="gsm | mmlu | sni | an lm-eval task name")
    p.add_argument("--variants", default="vanilla,lora,transfer")
    p.add_argument("--seeds", default="1", help="training seeds per variant (default 1)")
    p.add_argument("--train", default="{}", help='TrainParams overrides as JSON, e.g. \'{"lr": 1e-3}\'')
    p.add_argument("--report-dir", default="pkt-report")
    _device_args(p)
    _store_arg(p)

    p = sub.add_parser("sweep", help="run a sweep config (YAML or TOML)")
    p.add_argument("--config", required=True)
    _allow_bin_arg(p)
    _store_arg(p)

    p = sub.add_parser("report", help="rebuild the report (markdown, CSV, PNG) from a runs.csv")
    p.add_argument("--runs", required=True, help="runs.csv written by a sweep")
    p.add_argument("--out", default="pkt-report")
    p.add_argument("--metric", default="exact_match/strict-match", help="metric for the headline sentences")

    p = sub.add_parser("export", help="merge a stored adapter into its student and write an HF model dir")
    p.add_argument("--student", required=True)
    p.add_argument("--adapter", required=True, help="adapter key (or prefix) in the store, or an adapter folder")
    p.add_argument("--out", required=True)
    _allow_bin_arg(p)
    _store_arg(p)

    p = sub.add_parser("store", help="inspect and maintain the artifact store")
    ssub = p.add_subparsers(dest="store_cmd", required=True, parser_class=Parser)
    for name, text in [("ls", "list artifacts"), ("verify", "re-hash every blob; exit 1 on any mismatch")]:
        _store_arg(ssub.add_parser(name, help=text))
    sp = ssub.add_parser("show", help="show one artifact's record")
    sp.add_argument("key", help="key or unique prefix")
    _store_arg(sp)
    sp = ssub.add_parser("gc", help="remove blobs that no record references")
    sp.add_argument("--dry-run", action="store_true")
    _store_arg(sp)

    p = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1:4200")
    p.add_argument("--port", type=int, default=4200)

    p = sub.add_parser("deploy", help="register prefect.yaml's deployments for this checkout with the Prefect "
                       "server at PREFECT_API_URL, and print how to start a worker")
    p.add_argument("--name", action="append", help="deploy only this one (repeatable; default: all)")
    p.add_argument("--checkout", default=".", help="the pkt checkout holding prefect.yaml (default: here)")
    _diagnose_parser(sub)
    return ap


def _diagnose_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="before any training: does each init point downhill for the student, and "
                       "how much of its task gradient can the first LoRA step follow")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--task", required=True, help="task directory with train/seeds/test.jsonl")
    p.add_argument("--variants", default=None, help="default: lora, pissa, transfer and the controls that need no "
                   "extra input")
    p.add_argument("--rank", default="16")
    p.add_argument("--alpha", default=None, help="LoRA alpha (default: the rank, as in the paper)")
    p.add_argument("--init-scale", default="1.0", help="scale of the teacher-derived inits (cos and share do not "
                   "depend on it)")
    p.add_argument("--seed", default="0", help="the draw of random controls and of LoRA's A (default 0)")
    p.add_argument("--batches", default="4", help="effective batches of training data the gradient is taken over "
                   "(default 4)")
    p.add_argument("--train", default="{}", help='TrainParams overrides as JSON (modules, batch_size, max_length, ...)')
    _device_args(p)
    _store_arg(p)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "allow_bin", False):
        os.environ["PKT_ALLOW_BIN"] = "1"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    quiet = _quiet_user_tracebacks()
    try:
        return COMMANDS[args.cmd](args) or 0
    except KeyboardInterrupt:
        print(f"pkt {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"pkt {args.cmd}: stopped (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:
        from pkt.core.errors import UserError

        if not isinstance(e, (UserError, OSError)):
            raise
        print(f"pkt {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    finally:
        quiet()
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum, frame):
    raise Terminated()


class _NoUserTracebacks(logging.Filter):
    """A pkt error raised inside a flow is logged by Prefect as one line, without its traceback:
    the CLI prints the sentence that says what to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pkt.core.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_tracebacks():
    f = _NoUserTracebacks()
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in loggers:
        lg.addFilter(f)
    return lambda: [lg.removeFilter(f) for lg in loggers]


# ---- validation before any work ------------------------------------------------------------------
EXTRACT_FLAGS = {"teacher": "--teacher", "seeds": "--seeds", "students": "--student", "rank": "--rank",
                 "alpha": "--alpha", "k": "--k", "reducer": "--reducer", "svd": "--svd", "dtype": "--dtype",
                 "device": "--device", "store": "--store"}
SWEEP_FLAGS = {"teacher": "--teacher", "students": "--student", "tasks": "--task-dir", "variants": "--variants",
               "train": "--train", "dtype": "--dtype", "device": "--device", "report_dir": "--report-dir",
               "store": "--store"}


def _count(value: str, flag: str) -> int:
    from .config import ConfigError

    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{flag} {value}: give a whole number of at least 1")
    return n


def extract_config(args):
    from .config import ExtractConfig, validate

    return validate(ExtractConfig, {
        "teacher": args.teacher, "seeds": args.seeds, "students": args.student, "rank": args.rank,
        "alpha": args.alpha, "k": args.k, "reducer": args.reducer, "svd": args.svd, "dtype": args.dtype,
        "device": args.device, "store": args.store,
        "sensitivity_layout": "per_layer" if args.per_layer_sensitivity else "single"}, "", EXTRACT_FLAGS)


def transfer_config(args):
    from .config import ConfigError, SweepConfig, validate

    try:
        train = json.loads(args.train)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--train: not valid JSON ({e.msg}); give an object, e.g. '{{\"lr\": 1e-3}}'") from None
    seeds = _count(args.seeds, "--seeds")
    raw = {"teacher": args.teacher, "students": [args.student],
           "tasks": [{"name": Path(args.task_dir).name, "dir": args.task_dir, "benchmark": args.benchmark}],
           "variants": [v.strip() for v in args.variants.split(",") if v.strip()], "seeds": list(range(seeds)),
           "train": train, "store": args.store, "report_dir": args.report_dir, "dtype": args.dtype,
           "device": args.device}
    return validate(SweepConfig, raw, "", SWEEP_FLAGS)


# ---- commands ----------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .server import prefect_api

    if args.study:
        started = time.time()
        with prefect_api():
            from .study import study

            out = study(store=args.store, report_dir=args.report_dir or "pkt-study",
                        family_seeds=[int(s) for s in args.families.split(",")])
        _print_result(out)
        print(f"study wall time {time.time() - started:.0f} s")
        return 0
    from .config import DemoConfig, validate

    cfg = validate(DemoConfig, {"size": args.size, "seeds": args.seeds, "report_dir": args.report_dir or "pkt-report",
                                "store": args.store, "runner": args.runner, "workers": args.workers}, "",
                   {"size": "--size", "seeds": "--seeds", "runner": "--runner", "workers": "--workers"})
    with prefect_api():
        from .demo import demo

        out = demo(size=cfg.size, seeds=list(range(cfg.seeds)), store=cfg.store, report_dir=cfg.report_dir,
                   runner=cfg.runner, workers=cfg.workers)
    _print_result(out)
    print("\nThis is a smoke-size study (one small family, one task, one learning rate and init scale, "
          f"{cfg.seeds} seeds): it shows the pipeline works, not whether transfer helps. For that, run "
          "`pkt demo --study`.")
    return 0


def cmd_extract(args) -> int:
    from .config import check_extract_inputs
    from .server import prefect_api

    cfg = extract_config(args)
    check_extract_inputs(cfg)
    with prefect_api():
        from .extract import extract_teacher

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
    return 0


def cmd_transfer(args) -> int:
    from .config import check_sweep_inputs
    from .server import prefect_api

    cfg = transfer_config(args)
    check_sweep_inputs(cfg)
    with prefect_api():
        from .sweep import transfer

        out = transfer(teacher=cfg.teacher, student=cfg.students[0], task_dir=cfg.tasks[0].dir,
                       benchmark=cfg.tasks[0].benchmark, variants=cfg.variants, seeds=cfg.seeds,
                       train=cfg.train.model_dump(mode="json"), store=cfg.store, report_dir=cfg.report_dir,
                       dtype=cfg.dtype, device=cfg.device)
    _print_result(out)
    return 0


def cmd_sweep(args) -> int:
    from .config import check_sweep_inputs, load_config
    from .server import prefect_api

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": args.store})
    check_sweep_inputs(cfg)
    with prefect_api():
        from .sweep import sweep

        out = sweep(cfg.model_dump(mode="json"))
    _print_result(out)
    return 0


def diagnose_config(args):
    """(sweep config of the one branch, {seed, batches, init_scale}), validated like `pkt transfer`'s."""
    from .config import ConfigError
    from .diagnose import DEFAULT_VARIANTS

    try:
        train = json.loads(args.train)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--train: not valid JSON ({e.msg}); give an object, e.g. '{{\"max_length\": 512}}'") from None
    if not isinstance(train, dict):
        raise ConfigError("--train: give a JSON object, e.g. '{\"max_length\": 512}'")
    train.update(rank=args.rank, alpha=args.alpha or args.rank)
    try:
        extra = {"seed": int(args.seed), "init_scale": float(args.init_scale)}
    except ValueError:
        raise ConfigError(f"--seed {args.seed} / --init-scale {args.init_scale}: give numbers, e.g. --seed 0 "
                          "--init-scale 1") from None
    extra["batches"] = _count(args.batches, "--batches")
    cfg = transfer_config(argparse.Namespace(
        teacher=args.teacher, student=args.student, task_dir=args.task, benchmark="gsm",
        variants=args.variants or ",".join(DEFAULT_VARIANTS), seeds="1", train=json.dumps(train), store=args.store,
        report_dir="pkt-report", dtype=args.dtype, device=args.device))
    return cfg, extra


def cmd_diagnose(args) -> int:
    import pandas as pd

    from .config import check_sweep_inputs
    from .server import prefect_api

    cfg, extra = diagnose_config(args)
    check_sweep_inputs(cfg)
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


def _print_result(out: dict) -> None:
    import pandas as pd

    table = pd.DataFrame(out["table"])
    views = [["task", "metric", "variant", "mean", "std", "n", "top_sv", "top_sv_ratio", "diff", "ci_low", "ci_high",
              "p_perm", "verdict"],
             ["task", "metric", "variant", "transfer_diff", "transfer_ci_low", "transfer_ci_high", "transfer_p_perm",
              "transfer_verdict"]]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 70,
                           "display.float_format", "{:.4f}".format):
        for cols in views:  # variant - lora, then transfer - variant
            print(table[[c for c in cols if c in table]].to_string(index=False))
            print()
    print()
    for line in out["headline"]:
        print(line)
    print(f"\n{out['computed']} nodes computed, {len(out['nodes']) - out['computed']} reused.")
    for name, path in out["report"].items():
        print(f"{name:9s} {Path(path).resolve()}")
    api = os.environ.get("PREFECT_API_URL", "")
    where = f"open {api.removesuffix('/api')}" if api else "run `pkt ui`, then open http://127.0.0.1:4200"
    print(f"Runs, scores and reports are in the Prefect UI: {where}")


def cmd_report(args) -> int:
    from pkt.core import report
    from pkt.core.data import DataError

    path = Path(args.runs)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; give the runs.csv a "
                        "sweep wrote (in its report directory)")
    runs = report.read_csv(path)
    missing = {"student", "task", "benchmark", "metric", "variant", "seed", "value"} - set(runs.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; give the runs.csv a sweep wrote")
    if runs.empty:
        raise DataError(f"{path}: no rows, only the header; give the runs.csv of a sweep that ran")
    paths = report.write_report(runs, args.out, args.metric)
    print(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        print(f"{name:9s} {Path(path).resolve()}")
    return 0


def cmd_export(args) -> int:
    from peft import PeftModel

    from pkt.artifacts.store import Ref, Store
    from pkt.core import models, preflight

    preflight.check_model_files(args.student)
    store = Store(args.store)
    if Path(args.adapter).is_dir():
        folder = Path(args.adapter)
    else:
        rec = store.find(args.adapter)
        if rec is None or rec["kind"] != "adapter":
            raise models.ModelNotFound(f"no adapter with key {args.adapter!r} in {store.root}; see `pkt store ls`")
        folder = store.tree(Ref.of(rec))
    model = PeftModel.from_pretrained(models.load_model(args.student), str(folder)).merge_and_unload()
    model.save_pretrained(args.out, safe_serialization=True)
    models.load_tokenizer(args.student).save_pretrained(args.out)
    print(f"merged model written to {Path(args.out).resolve()}")
    return 0


def cmd_store(args) -> int:
    from pkt.artifacts.store import Store

    store = Store(args.store)
    store.require_store()  # a typo in --store is an error, not an empty store
    return {"ls": _store_ls, "show": _store_show, "verify": _store_verify, "gc": _store_gc}[args.store_cmd](store, args)


def _store_ls(store, args) -> int:
    for r in store.records():
        if "broken_record" in r:
            print(f"{r['kind']:12s} {r['key']}  UNUSABLE: record {r['problem']}")
        else:
            print(f"{r['kind']:12s} {r['key']}  {r.get('created', '?')}  {r.get('seconds', '?')}s")
    return 0


def _store_show(store, args) -> int:
    from pkt.artifacts.store import Ref, StoreError

    rec = store.find(args.key)
    if rec is None:
        print(f"no artifact with key prefix {args.key!r} in {store.root}", file=sys.stderr)
        return 1
    print(json.dumps(rec, indent=1))
    if "broken_record" in rec:
        return 1
    ref = Ref.of(rec)
    try:
        store.verify_ref(ref)
    except StoreError as e:
        print(f"problem: {e}; the next run that needs it recomputes it")
        return 1
    if rec["layout"] == "safetensors":
        print("header:", json.dumps(store.header(ref), indent=1)[:2000])
    print(f"path: {store.path(ref)}")
    return 0


def _store_verify(store, args) -> int:
    problems = store.verify()
    for p in problems:
        print(p)
    print(f"{len(store.records())} artifacts checked, {len(problems)} problems")
    return 1 if problems else 0


def _store_gc(store, args) -> int:
    doomed = store.gc(dry_run=args.dry_run)
    for p in doomed:
        print(("would remove " if args.dry_run else "removed ") + str(p))
    print(f"{len(doomed)} unreferenced entries {'found' if args.dry_run else 'removed'}")
    return 0


def ui_command(port: int) -> list[str]:
    """The Prefect of pkt's own interpreter: works from any venv, on PATH or not."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def cmd_ui(args) -> int:
    print(f"Prefect UI on http://127.0.0.1:{args.port} (bound to 127.0.0.1 only; see README before exposing it)")
    print(f"point runs at it with: export PREFECT_API_URL=http://127.0.0.1:{args.port}/api", flush=True)
    # the UI's browser code calls the API at PREFECT_UI_API_URL, which defaults to port 4200
    env = {**os.environ, "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL")
           or f"http://127.0.0.1:{args.port}/api"}
    server = subprocess.Popen(ui_command(args.port), env=env)
    try:
        return server.wait()
    finally:
        if server.poll() is None:  # pkt was stopped (SIGTERM, Ctrl-C): so is its server
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()


def cmd_deploy(args) -> int:
    from .deploy import deploy

    deploy(Path(args.checkout), args.name)
    return 0


COMMANDS = {"demo": cmd_demo, "report": cmd_report, "extract": cmd_extract, "transfer": cmd_transfer, "sweep": cmd_sweep,
            "export": cmd_export, "store": cmd_store, "ui": cmd_ui, "deploy": cmd_deploy}
COMMANDS["diagnose"] = cmd_diagnose

if __name__ == "__main__":
    sys.exit(main())
