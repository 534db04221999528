"""The pkt command line. Every command runs a Prefect flow (no server needed) or reads the store.

Each command validates all of its inputs first (options, config, data files, model configs,
headers and tokenizers) and refuses with one sentence before any work starts; only then does a
flow command start its Prefect API (flows/server.py).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
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


def _recompute_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recompute", default=None, metavar="KIND[,KIND]|all",
                   help="compute the nodes of these kinds (e.g. adapter,scores), or all, and every node below them, "
                        "even where the store holds them (the old bytes stay until `pkt store gc`); Prefect's "
                        "PREFECT_TASKS_REFRESH_CACHE=true means all")
    _timeout_arg(p)


def _timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", default=None, metavar="KIND=SECONDS[,KIND=SECONDS]",
                   help="stop any node of this kind that runs longer (e.g. adapter=600,sensitivity=1800): it stops "
                        "within one step, stores nothing, its task run ends TimedOut and pkt exits 2 naming it; "
                        "also $PKT_TIMEOUT, and a sweep config's timeouts: {KIND: SECONDS} (this flag wins)")


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
                   help="the study instead of the smoke-size demo (flows/study.py, its declared cut): the positive "
                        "controls, the data route and the parametric arms on the teacher-only facts, 3 learning rates "
                        "chosen on val by a selection seed, 4 fresh test seeds, 8 independently built families and 4 "
                        "twin families, the declared primary endpoint first")
    p.add_argument("--families", default=",".join(map(str, range(16))),
                   help="with --study: candidate family seeds, in order (default 0-15); the first 8 that pass every "
                        "quality gate are swept, the others are listed as left out")
    p.add_argument("--testbed", type=int, choices=(1, 2, 3), default=None,
                   help="with --study: the testbed version (default 1, the families of docs/study; 2: names in "
                        "shared syllables, which do not pass the study's gates yet; 3: v1 with every name also "
                        "said, without its number, in both corpora)")
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
    p.add_argument("--max-gen-toks", default=None, help="new tokens a generated answer may take (the task's "
                   "max_gen_toks; default: the benchmark's own, 512 for gsm: a worked solution)")
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
    timeout = os.environ.get("PKT_TIMEOUT")  # the same for --timeout
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
        given = getattr(args, "timeout", None)
        if given is not None or (timeout and hasattr(args, "timeout")):  # checked before any work
            from .graph import timeout_value

            os.environ["PKT_TIMEOUT"] = ",".join(f"{k}={v!r}" for k, v in timeout_value(
                timeout if given is None else given, "PKT_TIMEOUT" if given is None else "--timeout").items())
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
        for sig, handler in previous.items():  # stopped by a signal: one more exits now (_late_signal)
            signal.signal(sig, _late_signal if _SIGNALS else handler)
        if allow_bin is None:
            os.environ.pop("PKT_ALLOW_BIN", None)
        else:
            os.environ["PKT_ALLOW_BIN"] = allow_bin
        os.environ.pop("PKT_RECOMPUTE", None)
        if recompute is not None:
            os.environ["PKT_RECOMPUTE"] = recompute
        os.environ.pop("PKT_TIMEOUT", None)
        if timeout is not None:
            os.environ["PKT_TIMEOUT"] = timeout
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


def _late_signal(signum, frame):
    """A signal after pkt said it stopped, while the interpreter shuts down (joining threads, running
    atexit): exit now, as the earlier signal asked, instead of raising KeyboardInterrupt inside that
    teardown (a traceback, or with torch's threads still up SIGABRT: "terminate called without an
    active exception"). Nothing is half-stored; a killed process's temp area is gc's to reap."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + _SIGNALS[0] if _SIGNALS else 128 + signum)


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


# one module per command group; the names tests and callers use stay importable from here
from .cli_report import cmd_export, cmd_report  # noqa: E402 (after the library bars are off)
from .cli_run import (UNDEFINED_NOTE, _print_result, cmd_demo, cmd_diagnose, cmd_extract, cmd_sweep, cmd_transfer,  # noqa: E402,F401
                      transfer_config)
from .cli_server import cmd_deploy, cmd_ui  # noqa: E402
from .cli_store import cmd_store  # noqa: E402

PREFECT_COMMANDS = ("demo", "extract", "transfer", "sweep", "ui", "deploy")
COMMANDS = {"demo": cmd_demo, "report": cmd_report, "extract": cmd_extract, "transfer": cmd_transfer, "sweep": cmd_sweep,
            "export": cmd_export, "store": cmd_store, "ui": cmd_ui, "deploy": cmd_deploy}
COMMANDS["diagnose"] = cmd_diagnose

def run() -> None:
    """The `pkt` command: main(), then out at once. Everything of the command is done by then (outputs
    written atomically, the flow's records waited for, logs and events sent, its server and workers
    stopped); what the interpreter's shutdown would add is ~1.5 s of module teardown on every command."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
