"""Do two workers pay on a fresh sweep whose nodes are compute-bound? threads x1 vs processes x2 vs dask x2.

The sweep: the study's training budget (flows/study.py STUDY_TRAIN: LoRA rank 16, 128 optimizer steps,
adapters kept at steps 8, 32 and 128 and each scored) on `facts-teacher-only` of one study-size family
(pkt_core/mini/family.py, size "study", seed 0), variants lora and transfer, --seeds seeds each: per run
an adapter node of ~10 s and six scores nodes of ~0.1-0.5 s (one core, quiet machine), plus transfer's
teacher chain (sensitivity, layer plan, extraction, LoRA init: once) and each run's init diagnostic.
The family is built once into --store and reused; every case runs `pkt sweep` on its own copy of that
store (the family only, so every case computes the same nodes) with a fresh Prefect home and temporary
server, timed end to end (command) and by its flow run's log lines (flow).

Cases (what each worker's torch gets: flows/graph.py torch_threads_per_worker, printed), in this order:
- threads: pkt's default, one worker whose torch uses every CPU pkt may use (2 on 2 cores);
- threads1: one worker with OMP_NUM_THREADS=1, one torch thread (pkt follows the user's OMP_NUM_THREADS
  for one worker): "one thread" in the strict sense;
- processes and dask (a 2-process LocalCluster): 2 workers, one torch thread each;
- processes-prefect: processes x2 with Prefect's own 2 resolver threads instead of pkt's RESOLVER_THREADS
  (flows/graph.py): how the pool ran before pkt widened them (about one node at a time).
OMP_NUM_THREADS is removed from every case's environment but threads1's (the thread counts are what is
measured); OMP_WAIT_POLICY stays pkt's (PASSIVE) unless set. Ratios: each 2-worker case against both
one-worker cases, and the most two one-thread workers could gain over `threads` (half threads1's flow).

Per case, beside the wall times, from the Prefect database and the store's records: the computed task
runs' seconds (start to end, model loads included) and the nodes' own compute seconds (the records'),
both summed, their sum over the flow's wall (the parallelism achieved), and how much of the flow's wall
0, 1 and 2+ computed task runs were running. --py-spy DIR samples every process of each case (the pool's
and Dask's workers too) and prints where each process spent its samples.

    python bench/runners.py --store /tmp/pkt-bench-runners            # the measurement
    python bench/runners.py --store /tmp/pkt-bench-runners --quick    # a smoke check: 8 steps, 1 seed
    python bench/runners.py --store S --cases threads,processes --py-spy /tmp/spy   # some cases, sampled
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

FAMILY = {"size": "study", "seed": 0}
TASK = "facts-teacher-only"
VARIANTS = ["lora", "transfer"]
# name -> (runner, workers, OMP_NUM_THREADS, resolver threads: None = pkt's, flows/graph.py RESOLVER_THREADS)
CASES = {"threads": ("threads", 1, None, None), "threads1": ("threads", 1, "1", None),
         "processes": ("processes", 2, None, None), "dask": ("dask", 2, None, None),
         "processes-prefect": ("processes", 2, None, 2)}
CLI = "from pkt.flows.cli import run; run()"  # the `pkt` command
# Prefect's ProcessPoolTaskRunner hands each submitted task to one of max_workers resolver threads, which
# waits for the task's upstream futures before passing it to the pool: with 2 workers, two nodes whose
# upstream is still running held both threads, and every node submitted after them (ready or not)
# waited. pkt gives it RESOLVER_THREADS; the case processes-prefect sets Prefect's own width again (2).
RESOLVER_VAR = "PKT_BENCH_RESOLVER_THREADS"
NARROW_CLI = f"""
import os
from pkt.flows import graph
graph.RESOLVER_THREADS = int(os.environ["{RESOLVER_VAR}"])
{CLI}
"""
BUILD = ("import json, sys; from pkt.flows.demo import build_family; "
         "print('FAMILY ' + json.dumps(build_family(size=sys.argv[1], seed=int(sys.argv[2]), store=sys.argv[3])['root']))")


def child_env(home: Path, omp: str | None, resolver: int | None = None) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # as pkt's commands (flows/server.py)
    env.pop("PREFECT_API_URL", None)
    env.pop("OMP_NUM_THREADS", None)
    if omp:
        env["OMP_NUM_THREADS"] = omp
    if resolver:
        env[RESOLVER_VAR] = str(resolver)
    return env


def family_root(store: Path, tmp: Path) -> Path:
    """The study family's folder inside `store` (its tree), built there first if the store lacks it."""
    from pkt.artifacts.store import Store

    def find():
        for r in Store(str(store)).records():
            params = r.get("params", {})
            if r["kind"] == "family" and params.get("size") == FAMILY["size"] and \
                    params.get("recipe", {}).get("seed") == FAMILY["seed"] and "broken_record" not in r:
                return Store(str(store)).tree(r)
    root = find() if (store / "keys" / "family").exists() else None
    if root is None:
        print(f"building the {FAMILY['size']} family, seed {FAMILY['seed']}, into {store} (once; "
              "~2 min CPU) ...", flush=True)
        out = subprocess.run([sys.executable, "-c", BUILD, FAMILY["size"], str(FAMILY["seed"]), str(store)],
                             env=child_env(tmp / "build", None), capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the family build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        root = find()
    return root


def sweep_config(root: Path, seeds: int, quick: bool) -> dict:
    from pkt.core.mini.tasks import study_tasks
    from pkt.flows.study import STUDY_TRAIN

    train = {**STUDY_TRAIN, "lr": 3e-3}  # the study grid's middle lr (the rate does not change the cost)
    if quick:
        train |= {"steps": 8, "checkpoints": [8]}
    return {"name": "runners-bench", "teacher": str(root / "teacher"), "students": [str(root / "student")],
            "tasks": [t for t in study_tasks(root) if t["name"] == TASK], "variants": VARIANTS,
            "seeds": list(range(seeds)), "train": train, "benchmarks": ["answer_nll"], "max_length": 96}


def torch_threads(runner: str, workers: int, omp: str | None) -> int:
    """What pkt gives each worker's torch in this case (flows/graph.py), as a number of threads."""
    from pkt.flows.graph import torch_threads_per_worker

    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        if omp:
            os.environ["OMP_NUM_THREADS"] = omp
        n = torch_threads_per_worker(runner, workers)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    return int(omp) if n is None else n


def run_case(family_store: Path, cfg: dict, runner: str, workers: int, omp: str | None, resolver: int | None,
             at: Path, py_spy: Path | None) -> dict:
    store = at / "store"
    shutil.copytree(family_store, store, symlinks=True)  # the family only; outside the clock
    (at / "home").mkdir(parents=True)
    config = at / "config.json"
    config.write_text(json.dumps({**cfg, "runner": runner, "workers": workers, "store": str(store),
                                  "report_dir": str(at / "report")}))
    argv = [sys.executable, "-c", NARROW_CLI if resolver else CLI, "sweep", "--config", str(config)]
    if py_spy:
        argv = ["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", "20", "--nonblocking",
                "-o", str(py_spy / f"{at.name}.txt"), "--", *argv]
    profile = py_spy / f"{at.name}.txt" if py_spy else None
    t0 = time.monotonic()
    out = subprocess.run(argv, env=child_env(at / "home", omp, resolver), capture_output=True, text=True)
    wall = time.monotonic() - t0
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(f"{runner} x{workers} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    computed = int(re.search(r"(\d+) nodes computed", text).group(1))
    return {"wall": wall, "flow": flow_seconds(text), "computed": computed,
            "runs": task_runs(at / "home" / "prefect.db"), "records": node_seconds(store), "profile": profile}


def flow_seconds(text: str) -> float:
    """The flow run's own wall time, from Prefect's log lines of its start and its end in a command's output."""
    stamps = [datetime.strptime(m, "%H:%M:%S.%f") for m in
              re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '[^']+' - "
                         r"(?:Beginning flow run|Finished in state)", text, re.M)]
    return (stamps[-1] - stamps[0]).total_seconds() % 86400  # the log prints the time of day: a flow may cross midnight


def task_runs(db: Path) -> list[tuple[str, float, float]]:
    """(kind, start, end) of every computed node's task run (not the ones the flow answered itself)."""
    with sqlite3.connect(db) as con:
        rows = con.execute("select task_key, start_time, end_time from task_run where state_name = 'Completed' "
                           "and start_time is not null and end_time is not null and end_time > start_time").fetchall()
    def t(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    return [(key.removeprefix("pkt-"), t(a), t(b)) for key, a, b in rows
            if key.startswith("pkt-") and not key.startswith("pkt-source-")]


def node_seconds(store: Path) -> dict[str, list[float]]:
    """kind -> the compute seconds of each node the case computed (its store's records, the family left out)."""
    out = collections.defaultdict(list)
    for f in (store / "keys").glob("*/*.json"):
        r = json.loads(f.read_text())
        if f.parent.name != "family" and "seconds" in r:
            out[f.parent.name].append(r["seconds"])
    return dict(out)


def occupancy(runs: list[tuple[str, float, float]]) -> dict[int, float]:
    """Seconds during which exactly k computed task runs were running (k -> s), from the first start to the
    last end."""
    events = sorted([(a, 1) for _, a, _ in runs] + [(b, -1) for _, _, b in runs])
    spans, running, last = collections.defaultdict(float), 0, None
    for t, step in events:
        if last is not None:
            spans[min(running, 2)] += t - last
        running, last = running + step, t
    return dict(spans)


def py_spy_summary(path: Path, top: int = 5) -> list[str]:
    """Per sampled process (py-spy samples only threads that are not idle): its samples, their share in
    imports, in pkt's own code (pkt_core, tasks, artifacts: a node's work) and elsewhere (Prefect, Dask,
    the pool), and the frames where most of them were, each the innermost frame of pkt's or its libraries'."""
    per = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        procs = re.findall(r'process \d+:"[^"]*"', stack)  # a command line may hold a ';'
        process = procs[-1] if procs else "process ?"
        frames = [f for f in re.sub(r'process \d+:"[^"]*";?', "", stack).split(";") if f]
        if not frames:
            where = "(no Python frame)"
        elif any("_find_and_load" in f for f in frames):
            where = "(importing)"
        else:
            where = next((f for f in reversed(frames) if re.search(r"pkt|pkt_core|tasks/|artifacts/|torch|peft|"
                                                                  r"transformers|prefect|distributed", f)), frames[-1])
        where = re.sub(r" \(.*/", " (", where)
        per[process][where] += int(count)
    if not per:
        return [f"  (no py-spy samples in {path})"]
    lines = []
    for process, counts in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        name = re.sub(r'"\S*python\S* ', '"python ', process)
        lines.append(f"  {name[:120]}: {total} samples")
        lines += [f"    {100 * n / total:4.0f}%  {f[:130]}" for f, n in counts.most_common(top)]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, type=Path, help="a store holding the study family (size study, "
                    "seed 0); built here if it lacks it, then reused; the cases run on copies of it")
    ap.add_argument("--seeds", type=int, default=6, help="training seeds per variant (default 6: 12 runs of 128 steps)")
    ap.add_argument("--quick", action="store_true", help="a smoke check of every case: 8 steps, 1 seed")
    ap.add_argument("--py-spy", type=Path, help="a folder: sample each case with py-spy (all its processes) there")
    ap.add_argument("--cases", default=",".join(CASES), help=f"which cases, in order (default all: {','.join(CASES)}); "
                    "the first is the baseline of the ratios")
    ap.add_argument("--keep", action="store_true", help="keep each case's store, Prefect home and config")
    args = ap.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    tmp = Path(tempfile.mkdtemp(prefix="pkt-bench-runners-"))
    root = family_root(args.store.resolve(), tmp)
    cfg = sweep_config(root, seeds, args.quick)
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases {args.cases}: {', '.join(unknown)} unknown; choose from {', '.join(CASES)}")
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(VARIANTS)} variants x {seeds} seeds on {TASK}, {cfg['train']['steps']} steps rank "
          f"{cfg['train']['rank']}, checkpoints {cfg['train']['checkpoints']}; family {root}")
    print(f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset: pkt sets PASSIVE')}; "
          f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("| case | torch threads a worker | command s | flow s | computed | task runs s (sum) | node compute s "
          "(sum) | runs s / flow | flow s with 0 / 1 / 2+ runs running | first case's flow / this one's |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for case in cases:
        runner, workers, omp, resolver = CASES[case]
        name = f"{runner} x{workers}" + (f", OMP_NUM_THREADS={omp}" if omp else "") + \
            (f", Prefect's {resolver} resolver threads" if resolver else "")
        at = tmp / case
        r = results[case] = run_case(args.store.resolve(), cfg, runner, workers, omp, resolver, at, args.py_spy)
        r["name"] = name
        runs_s = sum(b - a for _, a, b in r["runs"])
        compute_s = sum(sum(v) for v in r["records"].values())
        occ = occupancy(r["runs"])
        base = next(iter(results.values()))["flow"]
        print(f"| {name} | {torch_threads(runner, workers, omp)} | {r['wall']:.1f} | {r['flow']:.1f} | {r['computed']} "
              f"| {runs_s:.1f} | {compute_s:.1f} | {runs_s / r['flow']:.2f} | {r['flow'] - occ.get(1, 0) - occ.get(2, 0):.1f} "
              f"/ {occ.get(1, 0):.1f} / {occ.get(2, 0):.1f} | {base / r['flow']:.2f}x |", flush=True)
        if not args.keep:
            shutil.rmtree(at / "store", ignore_errors=True)
    print("\nmean compute seconds a node, by kind (store records):")
    kinds = sorted({k for r in results.values() for k in r["records"]})
    print("| kind | " + " | ".join(r["name"] for r in results.values()) + " |")
    print("|---|" + "---|" * len(results))
    for kind in kinds:
        cells = [(f"{sum(v) / len(v):.2f} (n={len(v)})" if (v := r["records"].get(kind)) else "-")
                 for r in results.values()]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print()
    for base in [c for c in ("threads", "threads1") if c in results]:
        for case in [c for c in results if not c.startswith("threads")]:
            print(f"{results[case]['name']} vs {results[base]['name']}: flow "
                  f"{results[base]['flow'] / results[case]['flow']:.2f}x, command "
                  f"{results[base]['wall'] / results[case]['wall']:.2f}x")
    if {"threads", "threads1"} <= set(results):  # two one-thread workers at best halve the one-thread flow
        print(f"one torch thread vs pkt's default for one worker: flow "
              f"{results['threads']['flow'] / results['threads1']['flow']:.2f}x; so the most two one-thread workers "
              f"could gain over threads x1 (half the one-thread flow): "
              f"{2 * results['threads']['flow'] / results['threads1']['flow']:.2f}x")
    for r in results.values():
        if r["profile"]:
            print(f"\npy-spy, {r['name']} ({r['profile']}):")
            print("\n".join(py_spy_summary(r["profile"])))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"cases kept under {tmp}")


if __name__ == "__main__":
    main()
