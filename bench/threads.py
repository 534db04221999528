"""Torch threads vs the CPUs pkt may use, and vs a busy machine.

1. Pinned: a process pinned to fewer CPUs than the machine has (taskset, a cpuset, or a cgroup quota)
   times the same torch work with torch's default thread count (every core) and with pkt's
   (pkt_core/cpus.py: affinity and quota).
2. Busy (--busy): the same small-op work (a miniature model's training step: many tiny matmuls, where
   OpenMP's threads meet at a barrier after each) on a quiet machine and beside one spinning process
   per CPU, with one thread, with every CPU's thread as OpenMP leaves them by default (spinning while
   they wait), and as pkt sets them (OMP_WAIT_POLICY=PASSIVE, pkt_core/__init__.py). A fair share of a
   machine with one competitor per CPU is half of it: busy/quiet near 2 is "in proportion to the load".

    python bench/threads.py [--cpus 1] [--repeats 5] [--busy]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
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
if sys.argv[3] == "large":  # a matmul's forward and backward
    x, w = torch.randn(256, 512), torch.randn(512, 512, requires_grad=True)
    step = lambda: (x @ w).tanh().sum().backward()
    n = 300
else:  # small: the study student's shapes (3,072 tokens a batch, hidden 32, MLP 64, vocabulary 751)
    x = torch.randn(3072, 32)
    ws = [torch.randn(32, 64, requires_grad=True), torch.randn(64, 32, requires_grad=True),
          torch.randn(32, 751, requires_grad=True)]
    step = lambda: ((x @ ws[0]).relu() @ ws[1] @ ws[2]).logsumexp(-1).sum().backward()
    n = 40
for _ in range(20):  # warm up
    step()
t0 = time.perf_counter()
for _ in range(n):
    step()
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}))
"""


def run(cpus: list[int], threads: int, work: str = "large", wait_policy: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    out = subprocess.run([sys.executable, "-c", WORK, json.dumps(cpus), str(threads), work], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout)


def median(cpus: list[int], threads: int, repeats: int, work: str = "large", wait_policy: str | None = None):
    times = sorted(run(cpus, threads, work, wait_policy)["seconds"] for _ in range(repeats))
    return times[len(times) // 2], times[0]


def pinned(args) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:args.cpus]
    code = f"import os; os.sched_setaffinity(0, {set(cpus)}); from pkt.core.cpus import available_cpus; print(available_cpus())"
    pkt_threads = int(subprocess.check_output([sys.executable, "-c", code], text=True))
    print(f"machine: {os.cpu_count()} CPUs; pinned to {cpus}; pkt's torch threads there: {pkt_threads}")
    for label, threads in (("torch default", 0), ("pkt (available_cpus)", pkt_threads)):
        mid, low = median(cpus, threads, args.repeats)
        used = run(cpus, threads)["threads"]
        print(f"{label:22s} {used} threads: median {mid:.2f} s, min {low:.2f} s over {args.repeats} runs")


def _spin() -> None:
    while True:
        pass


def busy(args) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus)
    cases = [("1 thread", 1, None), (f"{n} threads, OpenMP's default wait", n, None),
             (f"{n} threads, spinning (ACTIVE)", n, "ACTIVE"), (f"{n} threads, passive (pkt)", n, "PASSIVE")]
    quiet = {label: median(cpus, t, args.repeats, "small", p)[0] for label, t, p in cases}
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in cpus]
    for s in spinners:
        s.start()
    try:
        loaded = {label: median(cpus, t, args.repeats, "small", p)[0] for label, t, p in cases}
    finally:
        for s in spinners:
            s.kill()
    print(f"small-op training steps on {n} CPUs, quiet vs beside {n} spinning processes (median of {args.repeats}; "
          "a fair share makes busy/quiet about 2):")
    for label, *_ in cases:
        print(f"  {label:34s} quiet {quiet[label]:6.2f} s   busy {loaded[label]:7.2f} s   busy/quiet "
              f"{loaded[label] / quiet[label]:5.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=1, help="CPUs the process is pinned to (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy", action="store_true", help="also time the small-op work beside a spinning process "
                    "per CPU, by OpenMP wait policy")
    args = ap.parse_args()
    pinned(args)
    if args.busy:
        busy(args)


if __name__ == "__main__":
    main()
