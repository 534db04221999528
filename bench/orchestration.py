"""What pkt's orchestration costs, the old code path beside this one, in one run on this machine.

Each case is a whole `pkt demo --size test` command on a fresh Prefect home (its temporary server
included), timed end to end; its flow's own wall time comes from the flow run's log lines, and
after the command ended the server's database is read for how many task runs it recorded.

- cached: a fully cached rerun of the test demo with the threads runner (1 worker) and with
  processes (2 workers). ms per cached node, two ways: the flow's wall time / its nodes (an upper
  bound on orchestration: it includes the flow's own reading of scores and copying of the report),
  and the time the flow's thread spends in Graph.submit/source / its nodes (the new code answers a
  stored node there; the old one only hands it to the runner and pays later, in the flow's wall).
- --fresh: every node but the family computed again (`--recompute`, this code only), threads (1)
  vs processes (2 workers). The test demo's nodes are a second or less each; bench/runners.py asks the
  same of a sweep whose nodes are compute-bound (the study's training budget).
- where the time went: each cached command's timeline in phases (PHASES: the interpreter and the CLI's
  import, the command's checks, Prefect's import, the server's start, until the flow begins, the flow,
  the wait for the server's records, the server's stop, printing, exit handlers, and the rest: the
  interpreter's shutdown), from marks the command prints and the flow's log lines. With --repeat N
  each case runs N times on one Prefect home: the first creates its database (Prefect's migrations,
  seconds), the next ones find it, as a user's rerun does.

The old code is `git archive REV` of this repository (default main), imported in place of this
checkout through a PYTHONPATH shim. Timings depend on the machine's load: the load average is
printed beside them.

    python bench/orchestration.py --store /tmp/bench-store [--old-rev main] [--fresh]
                                  [--runners threads,processes] [--repeat 2] [--no-old]
"""
from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "pkt_core", "artifacts": "artifacts", "tasks": "tasks", "flows": "flows"}
# the command, with the time the flow's thread spends handing nodes and sources to the graph (old: to the
# runner; new: a key, a store lookup and a recorded task run for a stored node) summed and printed at exit
COMMAND = """
import atexit, os, sys, time
MARKS = {"command": time.time()}
import importlib.abc, importlib.util
from pkt.flows import server
spent = [0.0, 0]
def timed(fn):
    def call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1
    return call
def time_graph(graph):
    graph.Graph.submit, graph.Graph.source = timed(graph.Graph.submit), timed(graph.Graph.source)
class AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # patches pkt.flows.graph once the command imports it: imported here, its imports (torch, Prefect)
    # would move out of the command's own timeline
    def find_spec(self, name, path, target=None):
        if name != "pkt.flows.graph":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.loader, spec.loader = spec.loader, self
        return spec
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        self.loader.exec_module(module)
        time_graph(module)
sys.meta_path.insert(0, AfterImport())
def marked(owner, name, phase):  # the first entry into and the last exit from owner.name (absent in old code: skipped)
    fn = getattr(owner, name, None)
    if fn is None:
        return
    def call(*a, **kw):
        MARKS.setdefault(phase + ">", time.time())
        try:
            return fn(*a, **kw)
        finally:
            MARKS[phase + "<"] = time.time()
    setattr(owner, name, call)
marked(server, "configured_api_url", "api")
marked(server.TemporaryServer, "start", "server")
marked(server, "_wait_for_records", "records")
marked(server.TemporaryServer, "stop", "stop")
def report():
    MARKS["exit"] = time.time()
    print(f"GRAPH {spent[0]:.3f} s in {spent[1]} calls")
    print("MARKS " + " ".join(f"{k}={v:.3f}" for k, v in MARKS.items()))
atexit.register(report)
from pkt.flows.cli import main
MARKS["cli"] = time.time()
try:
    from pkt.flows import cli_run
except ImportError:  # old code: one cli module
    from pkt.flows import cli as cli_run
marked(cli_run, "_print_result", "print")
from pkt.flows import cli
if hasattr(cli, "run"):  # the `pkt` command's own way out (cli.run): main, flush, os._exit
    code = main()
    atexit.unregister(report)
    report()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
sys.exit(main())
"""

def old_checkout(rev: str, into: Path) -> Path:
    """`rev`'s code as an importable `pkt` (a folder to put first on PYTHONPATH)."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    shim = into / "shim" / "pkt"
    shim.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (shim / name).symlink_to(src / folder)
    return shim.parent


def run_demo(store: str, runner: str, workers: int, home: Path, pythonpath: str | None = None,
             extra: tuple[str, ...] = ()) -> dict:
    """One `pkt demo --size test --seeds 2` command: its wall time, its flow's, its nodes, and the task runs
    its server recorded (read from the database after the command ended)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    argv = [sys.executable, "-c", COMMAND, "demo", "--size",
            "test", "--seeds", "2", "--store", store, "--report-dir", str(home / "report"), "--runner", runner,
            "--workers", str(workers), *extra]
    t0, launched = time.monotonic(), time.time()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[3:])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    stamps = [_epoch(m, launched) for m in
              re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '[^']+' - "
                         r"(?:Beginning flow run|Finished in state)", text, re.M)]
    computed, reused = map(int, re.search(r"(\d+) nodes computed, (\d+) reused", text).groups())
    graph_s = float(re.search(r"^GRAPH ([\d.]+) s", text, re.M).group(1))
    marks = {k: float(v) for k, v in re.findall(r"(\S+)=([\d.]+)", re.search(r"^MARKS (.*)$", text, re.M).group(1))}
    marks.update(launch=launched, flow=stamps[0], flowed=stamps[-1])
    with sqlite3.connect(home / "prefect.db") as db:  # the task runs of this command's flow run (the latest)
        states = dict(db.execute("select state_name, count(*) from task_run where flow_run_id = (select id from "
                                 "flow_run order by created desc limit 1) group by state_name").fetchall())
    return {"wall": wall, "flow": stamps[-1] - stamps[0], "graph": graph_s, "phases": phases(marks, wall),
            "nodes": computed + reused, "computed": computed, "recorded": states}


def _epoch(clock: str, near: float) -> float:
    """A log line's local HH:MM:SS.fff as seconds since the epoch, on the day of `near` (or the next)."""
    day = datetime.fromtimestamp(near).date()
    t = datetime.combine(day, datetime.strptime(clock, "%H:%M:%S.%f").time()).timestamp()
    return t + 86400 if t < near - 3600 else t


# the command's timeline, one phase after another (marks: COMMAND's, the flow's log lines, the launch)
PHASES = (("python + cli import", "launch", "cli"),  # the interpreter's start and `import pkt.flows.cli`
          ("checks", "cli", "api>"),  # options, config, store and report dir (their imports: torch, pydantic ...)
          ("prefect import", "api>", "server>"),  # prefect.settings, to learn whether the user has a server
          ("server start", "server>", "server<"),  # Popen until /health answers (new code: flow imports meanwhile)
          ("until flow", "server<", "flow"),  # the flow's module imported (old code), its flow run created
          ("flow", "flow", "flowed"),  # the flow run's own log lines: Beginning ... Finished in state
          ("until wait", "flowed", "records>"),
          ("record wait", "records>", "records<"),  # logs and events flushed, every task run read back final
          ("server stop", "stop>", "stop<"),
          ("results printed", "stop<", "print<"),  # the tables, headline and report paths
          ("exit handlers", "print<", "exit"))  # Prefect's and others' atexit work


def phases(marks: dict, wall: float) -> dict:
    """Seconds of each phase of PHASES (absent marks: 0), and `rest`: the command's wall time minus them
    (the interpreter's shutdown, and the gaps between phases)."""
    out = {name: marks[b] - marks[a] if a in marks and b in marks else 0.0 for name, a, b in PHASES}
    out["rest"] = wall - sum(out.values())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a store holding the test demo (`pkt demo --size test --seeds 2`); "
                    "built here if empty")
    ap.add_argument("--old-rev", default="main", help="the old code's git revision (default main)")
    ap.add_argument("--fresh", action="store_true", help="also the compute-bound sweep, threads vs processes")
    ap.add_argument("--runners", default="threads,processes", help="the cached cases' runners (threads: 1 worker, "
                    "processes: 2), default both")
    ap.add_argument("--repeat", type=int, default=1, help="run each cached case this many times on one Prefect home "
                    "(the first on a fresh home: its database created; the next ones on the existing database, as "
                    "a user's rerun is)")
    ap.add_argument("--no-old", action="store_true", help="only this checkout's code")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pkt-bench-orch-"))
    if not (Path(args.store) / "keys" / "report").exists():
        print("building the test demo (once) ...", flush=True)
        run_demo(args.store, "threads", 1, tmp / "build")
    codes = [("new", None)]
    if not args.no_old:
        codes.insert(0, (f"old ({args.old_rev})", str(old_checkout(args.old_rev, tmp / "old"))))
    runners = [(r, {"threads": 1, "processes": 2}[r]) for r in args.runners.split(",")]
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("| code | runner | home | command s | flow s | nodes | ms/node: flow / submit | task runs recorded after |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for runner, workers in runners:
        for i in range(args.repeat):
            for name, path in codes:  # old and new in turn: a load that drifts meets both alike
                r = run_demo(args.store, runner, workers, tmp / f"{name[:3]}-{runner}", path)
                home = "fresh" if i == 0 else f"rerun {i}"
                rows.append((name, f"{runner} x{workers}", home, r))
                recorded = ", ".join(f"{n} {s}" for s, n in sorted(r["recorded"].items()))
                print(f"| {name} | {runner} x{workers} | {home} | {r['wall']:.1f} | {r['flow']:.1f} | {r['nodes']} | "
                      f"{1000 * r['flow'] / r['nodes']:.1f} / {1000 * r['graph'] / r['nodes']:.1f} | {recorded} |",
                      flush=True)
    names = [name for name, _, _ in PHASES] + ["rest"]
    print("\nwhere each command's time went, s (phases: bench/orchestration.py PHASES)")
    print(f"| code | runner | home | command | {' | '.join(names)} |")
    print("|---|---|---|---|" + "---|" * len(names))
    for name, runner, home, r in rows:
        print(f"| {name} | {runner} | {home} | {r['wall']:.1f} | "
              + " | ".join(f"{r['phases'][n]:.1f}" for n in names) + " |")
    for name, _ in codes:
        for runner, workers in runners:
            reruns = sorted(r["wall"] for n, rn, home, r in rows if n == name and rn == f"{runner} x{workers}"
                            and home != "fresh")
            if reruns:
                print(f"{name}, {runner} x{workers}: median cached rerun on an existing home "
                      f"{statistics.median(reruns):.1f} s (of {len(reruns)})")
    if args.fresh:
        from pkt.flows.graph import node_kinds

        kinds = ",".join(sorted(node_kinds() - {"family"}))
        times = {}
        for runner, workers in (("threads", 1), ("processes", 2)):
            r = run_demo(args.store, runner, workers, tmp / f"fresh-{runner}", None, ("--recompute", kinds))
            times[runner] = r["flow"]
            print(f"fresh sweep (every node but the family, {r['computed']} computed), {runner} x{workers}: flow "
                  f"{r['flow']:.1f} s, command {r['wall']:.1f} s", flush=True)
        print(f"processes x2 vs threads x1: {times['threads'] / times['processes']:.2f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
