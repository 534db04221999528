"""Torch threads vs the CPUs pkt may use. A process pinned to fewer CPUs than the machine has (taskset,
a cpuset, or a cgroup quota: what a busy or shared machine leaves it) times the same torch work with
torch's default thread count (every core) and with pkt's (pkt_core/cpus.py: affinity and quota).

    python bench/threads.py [--cpus 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORK = """
import json, os, sys, time, torch
os.sched_setaffinity(0, set(json.loads(sys.argv[1])))
threads = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
x, w = torch.randn(256, 512), torch.randn(512, 512, requires_grad=True)
for _ in range(20):  # warm up
    (x @ w).tanh().sum().backward()
t0 = time.perf_counter()
for _ in range(300):  # a training step's shape of work: matmul forward and backward
    (x @ w).tanh().sum().backward()
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}))
"""


def run(cpus: list[int], threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", WORK, json.dumps(cpus), str(threads)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=1, help="CPUs the process is pinned to (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pinned = sorted(os.sched_getaffinity(0))[:args.cpus]
    code = f"import os; os.sched_setaffinity(0, {set(pinned)}); from pkt.core.cpus import available_cpus; print(available_cpus())"
    pkt_threads = int(subprocess.check_output([sys.executable, "-c", code], text=True))
    print(f"machine: {os.cpu_count()} CPUs; pinned to {pinned}; pkt's torch threads there: {pkt_threads}")
    for label, threads in (("torch default", 0), ("pkt (available_cpus)", pkt_threads)):
        times = sorted(run(pinned, threads)["seconds"] for _ in range(args.repeats))
        used = run(pinned, threads)["threads"]
        print(f"{label:22s} {used} threads: median {times[len(times) // 2]:.2f} s, min {times[0]:.2f} s "
              f"over {args.repeats} runs")


if __name__ == "__main__":
    main()
