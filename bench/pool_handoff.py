"""What a node costs to hand to a process pool, Prefect's own runner vs pkt's, side by side in one run.

Each case is its own process with a temporary Prefect server: a pool of 2 processes is started and warmed
(4 nodes, so both have imported what they need), then N nodes that do nothing are submitted at once and
waited for; the figure is the wall time over N, i.e. the pool's throughput of empty nodes: what Prefect's
runner and the two processes spend per node outside the node's own work. `prefect`: Prefect's
ProcessPoolTaskRunner as a user would call it; `pkt`: pkt's runner (flows/graph.py StoppableProcesses:
Prefect's, plus the settings serialized and hydrated once and one TLS context per process,
flows/pool_costs.py); `prefect-dask` / `pkt-dask`: prefect-dask's DaskTaskRunner on a local cluster of 2
worker processes, as is / with the same costs paid once (flows/dask_runner.py). Cases alternate, --repeat
times each.

    python bench/pool_handoff.py                 # 200 nodes, 2 repeats
    python bench/pool_handoff.py --runners prefect-dask,pkt-dask
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASE = """
import sys, time
from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner


@task(persist_result=False)
def empty(i):
    return i


def runner(kind):
    if kind == "prefect":
        return ProcessPoolTaskRunner(max_workers=2)
    if kind == "prefect-dask":
        from prefect_dask import DaskTaskRunner
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from pkt.flows.graph import task_runner
    return task_runner("dask" if kind == "pkt-dask" else "processes", 2)


@flow
def handoff(n):
    [f.result() for f in [empty.submit(i) for i in range(4)]]  # both processes started and warm
    t = time.perf_counter()
    [f.result() for f in [empty.submit(i) for i in range(n)]]
    print(f"SECONDS {time.perf_counter() - t:.3f}")


if __name__ == "__main__":
    from pkt.flows.server import prefect_api
    kind, n = sys.argv[1], int(sys.argv[2])
    with prefect_api():
        handoff.with_options(task_runner=runner(kind))(n)
"""


def run_case(kind: str, n: int, home: Path, script: Path) -> float:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, str(script), kind, str(n)], env=env, capture_output=True, text=True)
    found = re.search(r"SECONDS ([\d.]+)", out.stdout + out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"{kind} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(found.group(1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runners", default="prefect,pkt",
                    help="cases, in order (default prefect,pkt; also prefect-dask,pkt-dask: a local Dask cluster of 2)")
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {kind: [] for kind in args.runners.split(",")}
    with tempfile.TemporaryDirectory(prefix="pkt-bench-handoff-") as tmp:
        script = Path(tmp) / "case.py"
        script.write_text(CASE)
        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        t0 = time.monotonic()
        for r in range(args.repeat):
            for kind in times:
                times[kind].append(run_case(kind, args.nodes, Path(tmp) / f"home-{kind}-{r}", script))
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({time.monotonic() - t0:.0f} s)")
    print(f"| runner | {args.nodes} empty nodes, s (each repeat) | ms a node (best) |")
    print("|---|---|---|")
    for kind, ts in times.items():
        print(f"| {kind} | {', '.join(f'{t:.2f}' for t in ts)} | {1e3 * min(ts) / args.nodes:.1f} |")
    for theirs, ours in (("prefect", "pkt"), ("prefect-dask", "pkt-dask")):
        if times.get(theirs) and times.get(ours):
            print(f"{ours}'s hand-off {min(times[theirs]) / min(times[ours]):.1f}x faster than {theirs}'s (best of each)")


if __name__ == "__main__":
    main()
