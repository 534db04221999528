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
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pkt.core import stop
from pkt.core.stop import Stopped

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pkt.core.progress import library_bars_off_terminal  # noqa: E402  (before any library is imported)

library_bars_off_terminal()


INPUT_LIMIT = "PKT_MAX_INPUT_MB"  # pkt_core/inputs.py reads it


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


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="write the report into a non-empty directory pkt did not write (replacing its report files)")


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


def _recompute_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recompute", default=None, metavar="KIND[,KIND]|all",
                   help="compute the nodes of these kinds (e.g. adapter,scores), or all, and every node below them, "
                        "even where the store holds them (the old bytes stay until `pkt store gc`); Prefect's "
                        "PREFECT_TASKS_REFRESH_CACHE=true means all")
def _max_input_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-input-mb", default=None, help="largest input file (seeds, task files, config, runs table) "
                   "and line pkt reads, in MiB (default: 512 MiB a file, 1 MiB a line)")


def _sweep_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-nodes", default="50000", help="refuse a sweep with more nodes to compute than this "
                   "(default 50000), stating the count and the time it would take")
    p.add_argument("--yes", action="store_true", help="run a sweep above --max-nodes anyway")


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
    _force_arg(p)
    _max_input_arg(p)
    p.add_argument("--runner", default="threads", help="task runner: threads (default, one worker), processes, "
                   "or dask (a LocalCluster)")
    p.add_argument("--workers", default="1", help="parallel workers for processes or dask (default 1)")
    p.add_argument("--study", action="store_true",
                   help="the study instead of the smoke-size demo (flows/study.py): every variant, a grid of 6 "
                        "settings each chosen on val by 2 selection seeds, 6 fresh test seeds, 8 independently built "
                        "families, the declared primary endpoint first")
    p.add_argument("--families", default=",".join(map(str, range(16))),
                   help="with --study: candidate family seeds, in order (default 0-15); the first 8 that pass every "
                        "quality gate are swept, the others are listed as left out")
    p.add_argument("--testbed", type=int, choices=(1, 2), default=None,
                   help="with --study: the testbed version (default 1, the families of docs/study; 2: names in "
                        "shared syllables, which do not pass the study's gates yet)")
    _store_arg(p)
    _recompute_arg(p)

    p = sub.add_parser("extract", help="teacher sensitivity, layer plan and LoRA init for a student's shape")
    p.add_argument("--teacher", required=True, help="teacher model directory or hub id")
    p.add_argument("--seeds", required=True, help="seed samples, chat jsonl")
    p.add_argument("--student", required=True, action="append", help="student model (repeat for several)")
    p.add_argument("--rank", default="16")
    p.add_argument("--alpha", default="16.0")
    p.add_argument("--k", default=None, help="seed samples to draw (default: all in the file)")
    p.add_argument("--reducer", default="submatrix", help="submatrix (default), rowcol, random, weight-selection "
                   "(evenly spaced, no data) or subcloning (activation magnitude)")
    p.add_argument("--selector", default="sensitivity", help="layer selector: sensitivity (default), first, last, "
                   "random, evenly-spaced or block-influence")
    p.add_argument("--svd", default="auto", help="LoRA-init SVD: auto (default: the exact top-r SVD through the "
                   "float64 Gram matrix, = gram), full (LAPACK's full SVD), or lowrank (randomized: faster, not the "
                   "top-r directions on flat spectra)")
    p.add_argument("--max-length", default="2048", help="token cutoff of each seed sample (default 2048)")
    p.add_argument("--per-layer-sensitivity", action="store_true",
                   help="write the sensitivity map one decoder layer at a time (big teachers: host RAM holds "
                        "one layer of it)")
    _max_input_arg(p)
    _prompt_format_arg(p)
    _device_args(p)
    _store_arg(p)
    _recompute_arg(p)

    p = sub.add_parser("transfer", help="one teacher, one student, one task: variants x seeds, with report")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--task-dir", required=True, help="directory with train/seeds/val/test.jsonl")
    p.add_argument("--benchmark", default="gsm", help="gsm | mmlu | sni | an lm-eval task name")
    p.add_argument("--variants", default="vanilla,lora,transfer")
    p.add_argument("--seeds", default="1", help="training seeds per variant (default 1)")
    p.add_argument("--train", default="{}", help='TrainParams overrides as JSON, e.g. \'{"lr": 1e-3}\'')
    p.add_argument("--laten-extract", default=None, help="LaTen's extract samples (laten.n_extract; default 20), "
                   "drawn from train.jsonl")
    p.add_argument("--laten-align", default=None, help="LaTen's align samples (laten.n_align; default 80), drawn "
                   "from train.jsonl")
    p.add_argument("--method-params", default="{}", help='LaTen settings as JSON (the sweep config\'s laten '
                   'field), e.g. \'{"n_extract": 8, "n_align": 16}\'')
    p.add_argument("--report-dir", default="pkt-report")
    _prompt_format_arg(p)
    p.add_argument("--no-check", action="store_true", help="score even when the student's answers to a few val "
                   "items look broken (empty, identical, refusals, no answer in any)")
    _force_arg(p)
    _max_input_arg(p)
    _sweep_size_args(p)
    _device_args(p)
    _store_arg(p)
    _recompute_arg(p)

    p = sub.add_parser("sweep", help="run a sweep config (YAML or TOML)")
    p.add_argument("--config", required=True)
    p.add_argument("--no-check", action="store_true", help="as the config's check: false (score even broken-looking "
                   "answers)")
    _force_arg(p)
    _max_input_arg(p)
    _sweep_size_args(p)
    _allow_bin_arg(p)
    _store_arg(p)
    _recompute_arg(p)

    p = sub.add_parser("report", help="rebuild the report (markdown, CSV, PNG) from a runs.csv")
    p.add_argument("--runs", required=True, help="runs.csv written by a sweep")
    p.add_argument("--out", default="pkt-report")
    _force_arg(p)
    p.add_argument("--metric", default="exact_match/strict-match", help="metric for the headline sentences")
    _max_input_arg(p)

    p = sub.add_parser("export", help="merge a stored adapter into its student and write an HF model dir")
    p.add_argument("--student", required=True)
    p.add_argument("--adapter", required=True, help="adapter key (or prefix) in the store, or an adapter folder")
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (never the student's or the adapter's own directory)")
    _allow_bin_arg(p)
    _store_arg(p)

    p = sub.add_parser("store", help="inspect and maintain the artifact store")
    ssub = p.add_subparsers(dest="store_cmd", required=True, parser_class=Parser)
    _store_arg(ssub.add_parser("verify", help="re-hash every blob; exit 1 on any mismatch"))
    sp = ssub.add_parser("ls", help="list artifacts with their labels (teacher, student, task, variant, seed)")
    sp.add_argument("text", nargs="?", default=None, help="only artifacts whose kind, key, label or source paths "
                    "hold this text")
    sp.add_argument("--kind", default=None, help="only this kind (lora_init, adapter, scores, ...)")
    _store_arg(sp)
    sp = ssub.add_parser("show", help="show one artifact's record, and its lineage up to the sources and down to "
                         "what was built from it")
    sp.add_argument("key", help="key or digest (records cite their inputs by digest), a unique prefix, or a "
                    "folder or file path pkt printed")
    _store_arg(sp)
    sp = ssub.add_parser("find", help="artifacts by what they are about, e.g. the LoRA init for a student from "
                         "a teacher: find --teacher T --student S --kind lora_init")
    for name in ("teacher", "student", "task", "variant"):
        sp.add_argument(f"--{name}", default=None, help=f"the {name}: its path, or its folder's name")
    sp.add_argument("--seed", default=None, help="the training seed")
    sp.add_argument("--role", default=None, help='what the teacher model was: "teacher" or "untrained teacher"')
    sp.add_argument("--kind", default=None, help="only this kind (lora_init, adapter, scores, ...)")
    _store_arg(sp)
    sp = ssub.add_parser("gc", help="remove blobs that no record references")
    sp.add_argument("--dry-run", action="store_true")
    _store_arg(sp)

    p = sub.add_parser("ui", help="start the Prefect server and UI on 127.0.0.1:4200")
    p.add_argument("--port", default="4200", help="1-65535 (default 4200)")

    p = sub.add_parser("deploy", help="register prefect.yaml's deployments for this checkout with the Prefect "
                       "server at PREFECT_API_URL, and print how to start a worker")
    p.add_argument("--name", action="append", help="deploy only this one (repeatable; default: all)")
    p.add_argument("--checkout", default=".", help="the pkt checkout holding prefect.yaml (default: here)")
    p.add_argument("--size", default=None, help="run demo and nightly on this family size, demo or test (default: "
                   "demo's is prefect.yaml's, nightly's the family the store holds)")
    p.add_argument("--notify", default=None, help="a webhook URL (Slack, Teams, ntfy, ...) that a failed or crashed "
                   "run of these deployments posts to (a Prefect automation)")
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
    _max_input_arg(p)
    _device_args(p)
    _store_arg(p)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    allow_bin = os.environ.get("PKT_ALLOW_BIN")  # the environment carries it to worker processes;
    if getattr(args, "allow_bin", False):        # restored below, so it never outlives this command
        os.environ["PKT_ALLOW_BIN"] = "1"
    recompute = os.environ.get("PKT_RECOMPUTE")  # flows/graph.py reads it; restored below too
    max_input = os.environ.get(INPUT_LIMIT)  # the same for --max-input-mb
    if getattr(args, "max_input_mb", None) is not None:
        os.environ[INPUT_LIMIT] = args.max_input_mb
    stop.clear()  # a stop asked of an earlier command in this process is not asked of this one
    _SIGNALS.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    quiet = _quiet_user_tracebacks()
    try:
        if args.cmd in PREFECT_COMMANDS:
            from .server import startup_timeout

            startup_timeout()  # a bad value breaks Prefect's own settings at import: refuse it first
            check_prefect_home_space()
        if getattr(args, "recompute", None):
            from .graph import recompute_value

            os.environ["PKT_RECOMPUTE"] = recompute_value(args.recompute)
        return COMMANDS[args.cmd](args) or 0
    except (KeyboardInterrupt, Stopped):
        print(f"pkt {args.cmd}: interrupted; nothing half-done was stored, a rerun resumes", file=sys.stderr)
        return 130
    except Terminated:
        print(f"pkt {args.cmd}: stopped (SIGTERM); nothing half-done was stored, a rerun resumes", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:
        from pkt.core.errors import UserError

        if not isinstance(e, (UserError, OSError)):
            raise
        print(f"pkt {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    finally:
        quiet()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if allow_bin is None:
            os.environ.pop("PKT_ALLOW_BIN", None)
        else:
            os.environ["PKT_ALLOW_BIN"] = allow_bin
        os.environ.pop("PKT_RECOMPUTE", None)
        if recompute is not None:
            os.environ["PKT_RECOMPUTE"] = recompute
        if max_input is None:
            os.environ.pop(INPUT_LIMIT, None)
        else:
            os.environ[INPUT_LIMIT] = max_input


PREFECT_HOME_MIN_FREE = 64 * 2**20  # Prefect's SQLite database, its logs and pkt's server log


def check_prefect_home_space() -> None:
    """A PREFECT_HOME on a full disk is said to be full before a server starts there (Prefect's
    temporary server would exit with a log it could not write)."""
    import shutil

    from pkt.core.errors import UserError

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    where = next((p for p in (home, *home.parents) if p.exists()), None)
    if where is None:
        return
    free = shutil.disk_usage(where).free
    if free < PREFECT_HOME_MIN_FREE:
        raise UserError(f"PREFECT_HOME {home}: its disk has {free / 2**20:.1f} MiB free, below the "
                        f"{PREFECT_HOME_MIN_FREE // 2**20} MiB Prefect's database and logs need; free some space there, "
                        "or point PREFECT_HOME at a disk with room")


_SIGNALS: list[int] = []  # the stop signals this command received


def _on_signal(signum, frame):
    """Ctrl-C or SIGTERM: ask every running node to stop (they run in worker threads, where no
    KeyboardInterrupt arrives, and check the flag in their loops), then unwind the main thread so
    that the flow ends and the temporary Prefect server stops. A second signal while that unwinds
    is not raised again: a KeyboardInterrupt inside the cleanup would leave the interpreter exiting
    with torch's threads still running (SIGABRT, "terminate called without an active exception")."""
    _SIGNALS.append(signum)
    if len(_SIGNALS) == 2:
        print("pkt: already stopping; the running nodes end within a step, then pkt exits (a third Ctrl-C exits "
              "at once)", file=sys.stderr, flush=True)
        return
    if len(_SIGNALS) > 2:  # the user insists: leave now, past every cleanup (nothing half-done is recorded)
        print("pkt: exiting at once; a rerun resumes", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    stop.request(f"stopped by {signal.Signals(signum).name}")
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt


class _NoUserTracebacks(logging.Filter):
    """A pkt error raised inside a flow is logged by Prefect as one line, without its traceback:
    the CLI prints the sentence that says what to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pkt.core.errors import UserError

        if stop.requested() and record.getMessage().startswith("Crash detected!"):
            return False  # Ctrl-C or SIGTERM, as Prefect's engines report it once per run: pkt says it once
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
def _prompt_format_arg(p) -> None:
    p.add_argument("--prompt-format", default="auto", help="auto (default: each model's own chat template when its "
                   "tokenizer has one, else the paper's <|user|>/<|assistant|> layout), chat or paper")


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
    raw = {"teacher": args.teacher, "students": [args.student],
           "tasks": [{"name": Path(args.task_dir).name, "dir": args.task_dir, "benchmark": args.benchmark}],
           "variants": [v.strip() for v in args.variants.split(",") if v.strip()], "seeds": list(range(seeds)),
           "train": train, "store": args.store, "report_dir": args.report_dir, "dtype": args.dtype,
           "device": args.device, "laten": _laten_args(args), "prompt_format": getattr(args, "prompt_format", "auto"),
           "check": not getattr(args, "no_check", False)}
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


def check_sweep_size(cfg, args) -> None:
    """State the sweep's size before it starts (flows/config.py: node_counts), with the time its kinds
    took in this store; above --max-nodes, refuse unless --yes."""
    from pkt.artifacts.store import Store

    from .config import ConfigError, describe_size, node_counts, seconds_per_node

    try:
        limit = int(args.max_nodes)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"--max-nodes {args.max_nodes[:30]}: give a whole number of at least 1")
    store = Store(cfg.store)
    total, size = describe_size(node_counts(cfg), seconds_per_node(store.records() if store.root.is_dir() else []))
    if total > limit and not args.yes:
        raise ConfigError(f"this sweep has {size}, above --max-nodes {limit:,}; shrink its grids, seeds or variants, "
                          "or pass --yes to run it (or a higher --max-nodes)")
    print(f"pkt {args.cmd}: {size} (every node counted; those the store holds are reused)", flush=True)


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
    from .server import prefect_api

    args.store = store_option(args.store)
    if args.study:
        family_seeds = _seed_list(args.families, "--families")
        started = time.time()
        _report_dir(args.report_dir or "pkt-study", "--report-dir", args, store=args.store)
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
    with prefect_api():
        from .demo import demo

        out = demo(size=cfg.size, seeds=list(range(cfg.seeds)), store=cfg.store, report_dir=cfg.report_dir,
                   runner=cfg.runner, workers=cfg.workers)
    _print_result(out)
    from .demo import SMOKE_CAVEAT

    print("\n" + SMOKE_CAVEAT.format(seeds=cfg.seeds) + " (This caveat is also in report.md.)")
    return 0


def cmd_extract(args) -> int:
    from .config import check_extract_inputs
    from .server import prefect_api

    args.store = store_option(args.store)
    cfg = extract_config(args)
    check_extract_inputs(cfg)
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
    from .config import check_benchmark, check_sweep_inputs
    from .server import prefect_api

    from pkt.core.laten import LatenError

    args.store = store_option(args.store)
    cfg = transfer_config(args)
    check_sweep_size(cfg, args)
    check_benchmark(args.benchmark, "--benchmark")
    try:
        check_sweep_inputs(cfg)
    except LatenError as e:  # the sentence names the sweep config's fields; pkt transfer's are flags
        raise LatenError(str(e).replace("lower laten.n_extract/n_align", "lower --laten-extract/--laten-align")) \
            from None
    _report_dir(cfg.report_dir, "--report-dir", args, [cfg.teacher, *cfg.students, cfg.tasks[0].dir], cfg.store)
    with prefect_api():
        from .sweep import transfer

        out = transfer(teacher=cfg.teacher, student=cfg.students[0], task_dir=cfg.tasks[0].dir,
                       benchmark=cfg.tasks[0].benchmark, variants=cfg.variants, seeds=cfg.seeds,
                       train=cfg.train.model_dump(mode="json"), store=cfg.store, report_dir=cfg.report_dir,
                       dtype=cfg.dtype, device=cfg.device, laten=cfg.laten.model_dump(mode="json"),
                       prompt_format=cfg.prompt_format, check=cfg.check)
    _print_result(out)
    return 0


def cmd_sweep(args) -> int:
    from .config import check_sweep_inputs, load_config
    from .server import prefect_api

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": args.store})
    cfg = cfg.model_copy(update={"store": store_option(cfg.store)})
    if args.no_check:
        cfg = cfg.model_copy(update={"check": False})
    check_sweep_size(cfg, args)
    check_sweep_inputs(cfg)
    _report_dir(cfg.report_dir, f"{args.config}: report_dir", args,
                [cfg.teacher, *cfg.students, *(t.dir for t in cfg.tasks)], cfg.store)
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


def cmd_report(args) -> int:
    from pkt.core import inputs, report
    from pkt.core.data import DataError

    path = Path(args.runs)
    inputs.check_regular(path, "the runs.csv a sweep wrote (in its report directory)")
    runs = _read_runs(path)
    missing = {"student", "task", "benchmark", "metric", "variant", "seed", "value"} - set(runs.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; give the runs.csv a sweep wrote")
    if runs.empty:
        raise DataError(f"{path}: no rows, only the header; give the runs.csv of a sweep that ran")
    _check_run_cells(runs, path)
    from .outputs import check_out_dir, write_files

    check_out_dir(args.out, "--out", force=args.force)
    # the report directory's other tables and its protocol (endpoint, grids, caveat), when beside it
    extra = {name: report.read_csv(table) for name in ("curves", "selection", "items")
             if (table := _beside(path, name)) is not None}
    protocol = _read_protocol(path.with_name("protocol.json"))
    # written into a temp directory, moved in only once whole: a failure leaves --out as it was
    paths = write_files(args.out, lambda tmp: report.write_report(runs, tmp, args.metric, extra.pop("curves", None),
                                                                  protocol=protocol, **extra), "--out", force=args.force)
    print(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        print(f"{name:9s} {Path(path).resolve()}")
    return 0


RUN_KEYS = ("student", "task", "benchmark", "metric", "variant")  # what pairs and labels a run


def _check_run_cells(runs, path: Path) -> None:
    """Every run names its student, task, benchmark, metric and variant: an empty cell would drop the
    run from its comparison without a word."""
    for col in RUN_KEYS:
        empty = runs[col].isna() | (runs[col].astype(str).str.strip() == "")
        if empty.any():
            from pkt.core.data import DataError

            line = int(empty.to_numpy().nonzero()[0][0]) + 2
            raise DataError(f"{path} line {line}: {col} is empty; every run needs its {col} (drop that row, or rerun "
                            "its sweep)")


def _read_protocol(path: Path) -> dict | None:
    """protocol.json beside runs.csv (a report directory's), or None; bounded like every input."""
    from pkt.core import inputs
    from pkt.core.data import DataError

    if not path.exists():
        return None
    try:
        protocol = json.loads(inputs.read_text(path, "the protocol.json a sweep wrote beside runs.csv"))
    except (ValueError, RecursionError) as e:
        if isinstance(e, inputs.InputError):
            raise
        raise DataError(f"{path}: not readable JSON ({str(e).splitlines()[0][:80]}); delete it or rerun the sweep "
                        "that wrote it") from None
    if not isinstance(protocol, dict):
        raise DataError(f"{path}: not a JSON object; delete it or rerun the sweep that wrote it")
    return protocol


def _beside(runs: Path, name: str) -> Path | None:
    """The report directory's table `name` beside its runs.csv: name.csv, or name.csv.gz (how
    docs/study/ keeps the per-item scores)."""
    return next((p for p in (runs.with_name(f"{name}.csv"), runs.with_name(f"{name}.csv.gz")) if p.is_file()), None)


def _read_runs(path: Path):
    """A runs.csv as a table, or one sentence naming the file (and line) that is not one: text that is
    not UTF-8 CSV, or a value or seed cell that is empty or not a number (the statistics would pair
    and count a missing value as if it were a run)."""
    import numpy as np
    import pandas as pd

    from pkt.core import inputs, report
    from pkt.core.data import DataError

    with inputs.open_input(path, "the runs.csv a sweep wrote") as f:
        if b"\0" in f.read(65536):
            raise DataError(f"{path}: a binary file, not a CSV table; give the runs.csv a sweep wrote")
    try:
        runs = report.read_csv(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; give the runs.csv a sweep wrote") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable CSV table ({first}); give the runs.csv a sweep wrote") from None
    for col in ("value", "seed"):
        if col not in runs:
            continue
        numbers = pd.to_numeric(runs[col], errors="coerce")
        bad = numbers.isna() | ~np.isfinite(numbers.fillna(0).astype(float))  # inf, and 1e400 read as inf
        if col == "seed":  # a whole number a seed can be (pkt_core/inputs.py)
            bad |= numbers.map(lambda x: bool(np.isfinite(x)) and not (x == round(x) and 0 <= x < inputs.SEED_LIMIT))
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            cell = runs[col].iloc[i]
            kind = "whole number from 0 to 2^63 - 1" if col == "seed" else "number"
            what = ("is empty" if pd.isna(cell) else
                    f"is {str(cell)[:30]!r}, not a {'finite ' if pd.notna(numbers.iloc[i]) else ''}{kind}")
            raise DataError(f"{path} line {i + 2}: {col} {what}; every run needs a numeric {col} (drop that row, "
                            "or rerun its sweep)")
        runs[col] = numbers.astype(int) if col == "seed" else numbers
    return runs


def cmd_export(args) -> int:
    from peft import PeftModel

    from pkt.artifacts.store import Ref, Store
    from pkt.core import models, preflight

    from .outputs import check_out_dir, write_dir

    preflight.check_model_files(args.student)
    store = Store(args.store)
    if not args.adapter.strip():
        raise models.ModelNotFound("--adapter is empty; give an adapter key (`pkt store ls --kind adapter` lists "
                                   "them) or an adapter folder")
    if Path(args.adapter).is_dir():
        folder = Path(args.adapter)
    else:
        rec = store.find(args.adapter)
        if rec is None or rec["kind"] != "adapter":
            raise models.ModelNotFound(f"no adapter with key {args.adapter!r} in {store.root}; see `pkt store ls`")
        folder = store.tree(Ref.of(rec))
    _check_adapter_folder(folder)
    out = check_out_dir(args.out, "--out", force=args.force, inputs=[args.student, folder], store=store.root,
                        replaces=True)
    try:
        model = PeftModel.from_pretrained(models.load_model(args.student), str(folder)).merge_and_unload()
    except RuntimeError as e:  # torch's "size mismatch for <name>: copying a param with shape ..."
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise preflight.ShapeMismatch(f"adapter {folder} does not fit student {args.student} ({mismatch.rstrip('.')}); "
                                      "give the adapter trained for this student, or the student it was trained "
                                      "for") from None

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(args.student).save_pretrained(tmp)

    def check(tmp: Path) -> None:
        if not (tmp / "config.json").is_file() or not models.weight_files(tmp):
            raise OSError(f"--out {args.out}: the merged model was not written (no config.json or *.safetensors); "
                          "nothing was changed there")

    write_dir(out, fill, check)
    print(f"merged model written to {out.resolve()}")
    return 0


def _check_adapter_folder(folder: Path) -> None:
    """A peft adapter folder pkt may load: adapter_config.json and safetensors weights, or pickled
    adapter_model.bin only with --allow-bin (peft would torch.load it)."""
    from pkt.core.models import ModelNotFound, PickledWeights

    if not (folder / "adapter_config.json").is_file():
        raise ModelNotFound(f"{folder}: no adapter_config.json; give a peft adapter folder or an adapter key from "
                            "`pkt store ls`")
    if (folder / "adapter_model.safetensors").is_file():
        return
    if not (folder / "adapter_model.bin").is_file():
        raise ModelNotFound(f"{folder}: no adapter_model.safetensors; give a peft adapter folder with its weights")
    if os.environ.get("PKT_ALLOW_BIN") != "1":
        raise PickledWeights(f"{folder}: the adapter's weights are pickled (adapter_model.bin), which can run code "
                             "when loaded; convert them to safetensors, or pass --allow-bin to load them with "
                             "weights_only=True")


def cmd_store(args) -> int:
    from pkt.artifacts.store import Store

    store = Store(args.store)
    store.require_store()  # a typo in --store is an error, not an empty store
    try:
        code = {"ls": _store_ls, "show": _store_show, "verify": _store_verify, "gc": _store_gc,
                "find": _store_find}[args.store_cmd](store, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `pkt store ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit stays quiet
        return 0
    return code


def _check_kind(store, kind: str | None) -> None:
    from pkt.artifacts.store import StoreError

    kinds = sorted({r["kind"] for r in store.records()})
    if kind is not None and kind not in kinds:
        raise StoreError(f"--kind {kind}: no artifact of that kind in {store.root}; kinds there: "
                         f"{', '.join(kinds) or 'none'}")


LS_HEADER = f"{'KIND':14s} {'KEY':64s}  LABEL  CREATED  SECONDS"


def _ls_line(r: dict) -> str:
    from pkt.artifacts import catalog

    if "broken_record" in r:
        return f"{r['kind']:14s} {r['key']}  UNUSABLE: record {r['problem']}"
    return f"{r['kind']:14s} {r['key']}  {catalog.label_of(r)}  {r.get('created', '?')}  {r.get('seconds', '?')}s"


def _store_ls(store, args) -> int:
    from pkt.artifacts import catalog

    _check_kind(store, args.kind)
    shown = [r for r in store.records() if (args.kind is None or r["kind"] == args.kind)
             and (args.text is None or args.text.lower() in catalog.text_of(r).lower())]
    print(LS_HEADER)
    for r in shown:
        print(_ls_line(r))
    if args.text is not None or args.kind is not None:
        print(f"{len(shown)} artifacts match")
    return 0


def _store_find(store, args) -> int:
    from pkt.artifacts import catalog

    wanted = {name: getattr(args, name) for name in catalog.FIELDS if getattr(args, name) is not None}
    _check_kind(store, args.kind)
    lineage = catalog.Lineage(store.records())
    found = [r for r in lineage.records if (args.kind is None or r["kind"] == args.kind) and lineage.matches(r, wanted)]
    for r in found:
        print(_ls_line(r))
    print(f"{len(found)} artifacts match" + (f"; `pkt store show KEY` prints one's record and lineage" if found else
                                             "; `pkt store ls` lists every artifact with its label"))
    return 0 if found else 1


def _print_lineage(store, rec: dict) -> None:
    from pkt.artifacts import catalog

    lineage = catalog.Lineage(store.records())

    def up(r: dict, depth: int, seen: set) -> None:
        for name, digest, made in lineage.inputs(r):
            pad = "  " * depth
            if made is None:
                where = (r.get("sources") or {}).get(name) if isinstance(r.get("sources"), dict) else None
                print(f"{pad}{name}: source {where or '(path not recorded)'}  digest {digest[:12]}")
            else:
                again = made["key"] in seen  # a node many paths lead to is expanded once
                print(f"{pad}{name}: {made['kind']} {made['key'][:12]}  {catalog.label_of(made)}"
                      + ("  (its inputs are shown above)" if again else ""))
                if not again:
                    seen.add(made["key"])
                    up(made, depth + 1, seen)

    def down(r: dict, depth: int, seen: set) -> None:
        for reader in sorted(lineage.readers_of(r), key=lambda x: (x["kind"], catalog.label_of(x))):
            again = reader["key"] in seen
            print(f"{'  ' * depth}{reader['kind']} {reader['key'][:12]}  {catalog.label_of(reader)}"
                  + ("  (what was made from it is shown above)" if again else ""))
            if not again:
                seen.add(reader["key"])
                down(reader, depth + 1, seen)

    print(f"label: {catalog.label_of(rec)}")
    about = catalog.about_of(rec)
    if about:
        print("about: " + ", ".join(f"{k}={v}" for k, v in about.items()))
    print("lineage up (what it was made from):")
    up(rec, 1, {rec["key"]})
    print("lineage down (what was made from it):")
    down(rec, 1, {rec["key"]})


def _store_show(store, args) -> int:
    from pkt.artifacts.store import StoreError

    hits = store.matching(_digest_in_path(args.key) or args.key)
    if not hits:
        print(f"no artifact whose key or digest starts with {args.key!r} in {store.root}; `pkt store ls` lists "
              "them", file=sys.stderr)
        return 1
    if len({(r["kind"], r["key"]) for r in hits}) > 1 and len({r["digest"] for r in hits}) > 1:
        raise StoreError(f"{args.key!r} starts {len(hits)} artifacts' keys or digests; give more characters")
    for rec in hits:  # one artifact, or several records of the very same bytes
        code = _show_one(store, rec)
        if code:
            return code
    return 0


def _digest_in_path(text: str) -> str | None:
    """The digest a path pkt printed is named by (trees/<digest>/..., blobs/sha256/ab/<digest>, or a
    read-only store's tree in the user's cache), or None if text is no such path."""
    if "/" not in text and not os.path.exists(text):
        return None
    digests = [part for part in Path(text).parts if re.fullmatch(r"[0-9a-f]{64}", part)]
    return digests[-1] if digests else None


def _show_one(store, rec: dict) -> int:
    from pkt.artifacts.store import Ref, StoreError

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
    _print_lineage(store, rec)
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
    from pkt.core.inputs import check_port

    args.port = check_port(args.port)
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

    deploy(Path(args.checkout), args.name, size=args.size, notify=args.notify)
    return 0


PREFECT_COMMANDS = ("demo", "extract", "transfer", "sweep", "ui", "deploy")
COMMANDS = {"demo": cmd_demo, "report": cmd_report, "extract": cmd_extract, "transfer": cmd_transfer, "sweep": cmd_sweep,
            "export": cmd_export, "store": cmd_store, "ui": cmd_ui, "deploy": cmd_deploy}
COMMANDS["diagnose"] = cmd_diagnose

if __name__ == "__main__":
    sys.exit(main())
