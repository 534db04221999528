"""How much of a fresh study's wall time is orchestration? Old code vs this checkout, side by side.

The study flow (flows/study.py) on a reduced cut, computed from scratch but for its families: --families
study-size families (seeds 0, 1, 3, 4, ...: the docs/study families that pass the gates), variants vanilla,
lora, transfer, its two endpoint controls (spectrum-matched, shuffled) and oracle, lr x 3 on one selection
seed, 2 test seeds, the study's training budget (rank 16, 128 steps, checkpoints 8/32/128), no twin families,
processes x2 (the study's runner). Each case runs on its own copy of a store holding only the families, with
a fresh Prefect home and temporary server.

Per case: the flow's wall time (its log lines), the nodes' own compute seconds (the store's records, summed),
and the orchestration share = 1 - compute / (workers x flow wall): the time the two workers were not
computing a node (the flow's submission and choices, waits on a family's selection or report, the pool's
start and hand-offs). Also the seconds with 0, 1 and 2+ computed task runs running (Prefect's database).
Old = --old-rev (default ac01f7c: families swept one after another, each waiting for its own report).

    python bench/study_share.py --store /tmp/pkt-bench-share                 # 2 families (built once, ~5 min)
    python bench/study_share.py --store /tmp/pkt-bench-share --families 4
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestration import old_checkout  # noqa: E402
from runners import BUILD, child_env, flow_seconds, node_seconds, occupancy, task_runs  # noqa: E402

PASSING = [0, 1, 3, 4, 9, 12, 14]  # docs/study: the candidate seeds whose families pass the gates
STUDY = {"n_twins": 0, "seeds": [0, 1], "selection_seeds": [100],
         "variants": ["vanilla", "lora", "transfer", "spectrum-matched", "shuffled", "oracle"],
         "runner": "processes", "workers": 2}
CODE = """
import json, sys
from pkt.flows.server import prefect_api
with prefect_api():
    from pkt.flows.study import study
    out = study(**json.loads(sys.argv[1]))
print("COMPUTED", out["computed"])
"""


def build_families(store: Path, tmp: Path, seeds: list[int]) -> None:
    """The study-size families of `seeds` into `store`, those it lacks."""
    from pkt.core.mini import family

    wanted = {seed: json.loads(json.dumps(family.recipe_params("study", seed))) for seed in seeds}  # as stored (lists)
    have = set()  # the seeds whose family this code's key names (its builder's version included)
    for f in (store / "keys" / "family").glob("*.json") if store.exists() else []:
        recipe = json.loads(f.read_text()).get("params", {}).get("recipe")
        have |= {seed for seed, want in wanted.items() if recipe == want}
    for seed in seeds:
        if seed not in have:
            print(f"building study family {seed} into {store} (~2-3 min) ...", flush=True)
            out = subprocess.run([sys.executable, "-c", BUILD, "study", str(seed), str(store)],
                                 env=child_env(tmp / f"build{seed}", None), capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the family build failed:\n{out.stderr[-3000:]}")


def run_case(families: Path, at: Path, pythonpath: str | None, seeds: list[int]) -> dict:
    store = at / "store"
    shutil.copytree(families, store, symlinks=True)  # the families only; outside the clock
    env = child_env(at / "home", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = {**STUDY, "family_seeds": seeds, "n_families": len(seeds), "store": str(store),
            "report_dir": str(at / "report")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CODE, json.dumps(args)], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(f"{at.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    flow = flow_seconds(text)
    compute = sum(sum(v) for v in node_seconds(store).values())
    spans = occupancy(task_runs(at / "home" / "prefect.db"))
    return {"command": wall, "flow": flow, "computed": int(re.search(r"COMPUTED (\d+)", text).group(1)),
            "compute": compute, "share": 1 - compute / (STUDY["workers"] * flow), "spans": spans}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, type=Path, help="a store for the 2 families (built there once)")
    ap.add_argument("--families", type=int, default=2, help="how many families (default 2)")
    ap.add_argument("--old-rev", default="ac01f7c", help="the old code's git revision (default ac01f7c)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pkt-bench-share-") as tmp:
        tmp = Path(tmp)
        seeds = PASSING[:args.families]
        build_families(args.store, tmp, seeds)
        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        old = str(old_checkout(args.old_rev, tmp / "oldsrc"))
        rows = {f"old ({args.old_rev})": run_case(args.store, tmp / "old", old, seeds),
                "new (this checkout)": run_case(args.store, tmp / "new", None, seeds)}
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| code | command s | flow s | computed | node compute s (sum) | orchestration share | "
          "flow s with 0 / 1 / 2+ runs running |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        spans = " / ".join(f"{r['spans'].get(k, 0.0):.1f}" for k in (0, 1, 2))
        print(f"| {name} | {r['command']:.1f} | {r['flow']:.1f} | {r['computed']} | {r['compute']:.1f} | "
              f"{100 * r['share']:.0f}% | {spans} |")


if __name__ == "__main__":
    main()
