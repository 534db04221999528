"""The pkt command line. Every command runs a Prefect flow (no server needed) or reads the store."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, OSError)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store root (default: $PKT_STORE or ./.pkt/store)")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (device_map over GPUs)")
    p.add_argument("--allow-bin", action="store_true",
                   help="also load pickled *.bin checkpoints (with torch weights_only=True); off by default")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pkt", description="Parametric knowledge transfer between causal LMs "
                                 "(Seeking Neural Nuggets) as a Prefect pipeline of content-addressed artifacts.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="build or reuse the miniature family and run the demo sweep")
    p.add_argument("--size", default="demo", choices=["demo", "test"], help="family size (test: seconds)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per variant (default 3)")
    p.add_argument("--report-dir", default=None, help="default: pkt-report (pkt-study with --study)")
    p.add_argument("--study", action="store_true",
                   help="the study instead of the smoke-size demo: every variant x 5 seeds x 2 lr x 3 init "
                        "scales, two independently built families, GSM-like and MMLU-like tasks")
    p.add_argument("--families", default="0,1", help="with --study: the family seeds to build and sweep")
    _store_arg(p)

    p = sub.add_parser("extract", help="teacher sensitivity, layer plan and LoRA init for a student's shape")
    p.add_argument("--teacher", required=True, help="teacher model directory or hub id")
    p.add_argument("--seeds", required=True, help="seed samples, chat jsonl")
    p.add_argument("--student", required=True, action="append", help="student model (repeat for several)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--k", type=int, default=None, help="seed samples to draw (default: all in the file)")
    p.add_argument("--reducer", default="submatrix", choices=["submatrix", "rowcol", "random"])
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
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--train", default="{}", help='TrainParams overrides as JSON, e.g. \'{"lr": 1e-3}\'')
    p.add_argument("--report-dir", default="pkt-report")
    _device_args(p)
    _store_arg(p)

    p = sub.add_parser("sweep", help="run a sweep config (YAML or TOML)")
    p.add_argument("--config", required=True)
    _store_arg(p)

    p = sub.add_parser("report", help="rebuild the report (markdown, CSV, PNG) from a runs.csv")
    p.add_argument("--runs", required=True, help="runs.csv written by a sweep")
    p.add_argument("--out", default="pkt-report")
    p.add_argument("--metric", default="exact_match/strict-match", help="metric for the headline sentences")

    p = sub.add_parser("export", help="merge a stored adapter into its student and write an HF model dir")
    p.add_argument("--student", required=True)
    p.add_argument("--adapter", required=True, help="adapter key (or prefix) in the store, or an adapter folder")
    p.add_argument("--out", required=True)
    _store_arg(p)

    p = sub.add_parser("store", help="inspect and maintain the artifact store")
    ssub = p.add_subparsers(dest="store_cmd", required=True)
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "allow_bin", False):
        os.environ["PKT_ALLOW_BIN"] = "1"
    try:
        return COMMANDS[args.cmd](args) or 0
    except Exception as e:
        from pkt.artifacts.store import StoreError

        if not isinstance(e, (*USER_ERRORS, StoreError)):
            raise
        print(f"pkt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def cmd_demo(args) -> int:
    if args.study:
        from .study import study

        started = time.time()
        out = study(store=args.store, report_dir=args.report_dir or "pkt-study",
                    family_seeds=[int(s) for s in args.families.split(",")])
        _print_result(out)
        print(f"study wall time {time.time() - started:.0f} s")
        return 0
    from .demo import demo

    out = demo(size=args.size, seeds=list(range(args.seeds)), store=args.store,
               report_dir=args.report_dir or "pkt-report")
    _print_result(out)
    print("\nThis is a smoke-size study (one small family, one task, one learning rate and init scale, "
          f"{args.seeds} seeds): it shows the pipeline works, not whether transfer helps. For that, run "
          "`pkt demo --study`.")
    return 0


def _check_inputs(models_: list[str], jsonl: list[str]) -> None:
    """Fail before any flow starts (and before anything is written) on missing or malformed input."""
    from pkt.core.data import read_jsonl
    from pkt.core.models import check_source

    for m in models_:
        check_source(m)
    for f in jsonl:
        read_jsonl(f)


def cmd_extract(args) -> int:
    from .extract import extract_teacher

    _check_inputs([args.teacher, *args.student], [args.seeds])
    out = extract_teacher(teacher=args.teacher, seeds=args.seeds, students=args.student, rank=args.rank,
                          alpha=args.alpha, k=args.k, reducer=args.reducer, store=args.store, dtype=args.dtype,
                          device=args.device,
                          sensitivity_layout="per_layer" if args.per_layer_sensitivity else "single")
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
    from .sweep import transfer

    _check_inputs([args.teacher, args.student], [str(Path(args.task_dir) / f) for f in ("train.jsonl", "seeds.jsonl")])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    _print_result(transfer(teacher=args.teacher, student=args.student, task_dir=args.task_dir,
                           benchmark=args.benchmark, variants=variants, seeds=list(range(args.seeds)),
                           train=json.loads(args.train), store=args.store, report_dir=args.report_dir,
                           dtype=args.dtype, device=args.device))
    return 0


def cmd_sweep(args) -> int:
    from .config import load_config
    from .sweep import sweep

    cfg = load_config(args.config)
    raw = cfg.model_dump()
    if args.store:
        raw["store"] = args.store
    _print_result(sweep(raw))
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
    print("Runs, scores and reports are in the Prefect UI: run `pkt ui`, then open http://127.0.0.1:4200")


def cmd_report(args) -> int:
    from pkt.core import report

    runs = report.read_csv(args.runs)
    missing = {"student", "task", "benchmark", "metric", "variant", "seed", "value"} - set(runs.columns)
    if missing:
        raise ValueError(f"{args.runs}: missing columns {sorted(missing)}; give the runs.csv a sweep wrote")
    paths = report.write_report(runs, args.out, args.metric)
    print(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        print(f"{name:9s} {Path(path).resolve()}")
    return 0


def cmd_export(args) -> int:
    from peft import PeftModel

    from pkt.artifacts.store import Ref, Store
    from pkt.core import models

    store = Store(args.store)
    if Path(args.adapter).is_dir():
        folder = Path(args.adapter)
    else:
        rec = store.find(args.adapter)
        if rec is None or rec["kind"] != "adapter":
            raise ValueError(f"no adapter with key {args.adapter!r} in {store.root}; see `pkt store ls`")
        folder = store.tree(Ref.of(rec))
    model = PeftModel.from_pretrained(models.load_model(args.student), str(folder)).merge_and_unload()
    model.save_pretrained(args.out, safe_serialization=True)
    models.load_tokenizer(args.student).save_pretrained(args.out)
    print(f"merged model written to {Path(args.out).resolve()}")
    return 0


def cmd_store(args) -> int:
    from pkt.artifacts.store import Ref, Store

    store = Store(args.store)
    if args.store_cmd == "ls":
        for r in store.records():
            print(f"{r['kind']:12s} {r['key']}  {r.get('created', '?')}  {r.get('seconds', '?')}s")
        return 0
    if args.store_cmd == "show":
        rec = store.find(args.key)
        if rec is None:
            print(f"no artifact with key prefix {args.key!r} in {store.root}", file=sys.stderr)
            return 1
        print(json.dumps(rec, indent=1))
        if rec.get("layout") != "tree":
            print("header:", json.dumps(store.header(Ref.of(rec)), indent=1)[:2000])
        print(f"path: {store.path(Ref.of(rec))}")
        return 0
    if args.store_cmd == "verify":
        problems = store.verify()
        for p in problems:
            print(p)
        print(f"{len(store.records())} artifacts checked, {len(problems)} problems")
        return 1 if problems else 0
    if args.store_cmd == "gc":
        doomed = store.gc(dry_run=args.dry_run)
        for p in doomed:
            print(("would remove " if args.dry_run else "removed ") + str(p))
        print(f"{len(doomed)} unreferenced entries {'found' if args.dry_run else 'removed'}")
        return 0
    return 1


def cmd_ui(args) -> int:
    prefect = shutil.which("prefect") or "prefect"
    print(f"Prefect UI on http://127.0.0.1:{args.port} (bound to 127.0.0.1 only; see README before exposing it)")
    print(f"point runs at it with: export PREFECT_API_URL=http://127.0.0.1:{args.port}/api")
    return subprocess.call([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)])


COMMANDS = {"demo": cmd_demo, "report": cmd_report, "extract": cmd_extract, "transfer": cmd_transfer, "sweep": cmd_sweep,
            "export": cmd_export, "store": cmd_store, "ui": cmd_ui}

if __name__ == "__main__":
    sys.exit(main())
