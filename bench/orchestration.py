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

The old code is `git archive REV` of this repository (default main), imported in place of this
checkout through a PYTHONPATH shim. Timings depend on the machine's load: the load average is
printed beside them.

    python bench/orchestration.py --store /tmp/bench-store [--old-rev main] [--fresh]
"""
from __future__ import annotations

import argparse
import os
import re
import sqlite3
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
import atexit, sys, time
from pkt.flows import graph
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
graph.Graph.submit, graph.Graph.source = timed(graph.Graph.submit), timed(graph.Graph.source)
atexit.register(lambda: print(f"GRAPH {spent[0]:.3f} s in {spent[1]} calls"))
from pkt.flows.cli import main
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
    t0 = time.monotonic()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[3:])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    stamps = [datetime.strptime(m, "%H:%M:%S.%f") for m in
              re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '[^']+' - "
                         r"(?:Beginning flow run|Finished in state)", text, re.M)]
    computed, reused = map(int, re.search(r"(\d+) nodes computed, (\d+) reused", text).groups())
    graph_s = float(re.search(r"^GRAPH ([\d.]+) s", text, re.M).group(1))
    with sqlite3.connect(home / "prefect.db") as db:
        states = dict(db.execute("select state_name, count(*) from task_run group by state_name").fetchall())
    return {"wall": wall, "flow": (stamps[-1] - stamps[0]).total_seconds(), "graph": graph_s,
            "nodes": computed + reused, "computed": computed, "recorded": states}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a store holding the test demo (`pkt demo --size test --seeds 2`); "
                    "built here if empty")
    ap.add_argument("--old-rev", default="main", help="the old code's git revision (default main)")
    ap.add_argument("--fresh", action="store_true", help="also the compute-bound sweep, threads vs processes")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pkt-bench-orch-"))
    if not (Path(args.store) / "keys" / "report").exists():
        print("building the test demo (once) ...", flush=True)
        run_demo(args.store, "threads", 1, tmp / "build")
    old = old_checkout(args.old_rev, tmp / "old")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("| code | runner | command s | flow s | nodes | ms/node: flow / submit | task runs recorded after |")
    print("|---|---|---|---|---|---|---|")
    for name, path in ((f"old ({args.old_rev})", str(old)), ("new", None)):
        for runner, workers in (("threads", 1), ("processes", 2)):
            r = run_demo(args.store, runner, workers, tmp / f"{name[:3]}-{runner}", path)
            recorded = ", ".join(f"{n} {s}" for s, n in sorted(r["recorded"].items()))
            print(f"| {name} | {runner} x{workers} | {r['wall']:.1f} | {r['flow']:.1f} | {r['nodes']} | "
                  f"{1000 * r['flow'] / r['nodes']:.1f} / {1000 * r['graph'] / r['nodes']:.1f} | {recorded} |",
                  flush=True)
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
