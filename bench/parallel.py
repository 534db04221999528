"""Scale-out pays: the demo's sweep, serial vs on a 2-worker Dask LocalCluster, side by side.

Prints, measured in one run (each on a fresh store, the miniature family built before the clock):
  - the sweep on Prefect's ThreadPoolTaskRunner with one worker (serial; torch uses every core)
  - the same sweep with runner dask on a distributed.LocalCluster of 2 worker processes, 1 torch
    thread each (the cluster's start-up is inside the clock)
  - the ratio, how many of pkt's nodes the Dask scheduler ran, and whether both runs stored the
    same bytes (every node's digest; torch's thread count differs between the two, so equal bytes
    are not guaranteed)

    python bench/parallel.py [--size test|demo] [--seeds 3] [--workers 2]

--size test takes a few minutes on 2 CPU cores; --size demo about 15.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="test", choices=["demo", "test"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from pkt.artifacts.store import Store
    from pkt.flows.demo import build_family, demo_config
    from pkt.flows.sweep import sweep

    work = Path(tempfile.mkdtemp(prefix="pkt-bench-parallel-"))
    root = build_family(size=args.size, store=str(work / "family"))["root"]  # also warms Prefect's server
    seconds, digests = {}, {}
    for name in ("serial", f"dask x{args.workers}"):
        store = work / name.replace(" ", "-")
        cfg = demo_config(root, args.size, list(range(args.seeds)), str(store), str(work / f"report-{name}"))
        t0 = time.perf_counter()
        if name == "serial":
            out = sweep(cfg)
        else:
            import dask
            from distributed import Client, LocalCluster

            dask.config.set({"distributed.admin.low-level-log-length": 1_000_000})  # keep every transition
            with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                out = sweep({**cfg, "runner": "dask", "workers": args.workers,
                             "dask_address": cluster.scheduler_address})
                log = client.run_on_scheduler(lambda dask_scheduler: [(str(t[0]), t[2])
                                                                      for t in dask_scheduler.transition_log])
            ran = {key for key, finish in log if finish == "memory" and key.startswith("run_node-")}
            print(f"the Dask scheduler ran {len(ran)} of the sweep's {len(out['nodes'])} nodes", flush=True)
        seconds[name] = time.perf_counter() - t0
        digests[name] = {(k, key, Store(store).record(k, key)["digest"]) for k, key, _ in out["nodes"]}
        print(f"{name}: {seconds[name]:.1f} s, {out['computed']} nodes computed", flush=True)
    serial, parallel = seconds.values()
    print(f"\nsweep ({args.size} family, {args.seeds} seeds, {len(next(iter(digests.values())))} nodes) on "
          f"{os.cpu_count()} cores: serial {serial:.1f} s, dask x{args.workers} {parallel:.1f} s, "
          f"ratio parallel/serial {parallel / serial:.2f}")
    a, b = digests.values()
    print(f"same bytes in both stores: {a == b}")


if __name__ == "__main__":
    main()
