"""What each method costs: seconds and peak resident memory of its nodes, from the store's records.

A variant's nodes are the ones its runs used, as the flow that built them names them (kind, key):
its chain (sensitivity or activations, layer plan, extraction, LoRA init, an untrained teacher)
and its adapters. Not a walk over record digests: two nodes of different variants can hold
identical bytes (the same layers picked by two selectors), so a digest does not say whose it is.
Records carry `seconds` and, since pkt measured them, `peak_rss_bytes` and `start_rss_bytes`
(pkt_core/memory.py says what those measure).

Shared nodes: every variant is charged the full seconds of every node it used, shared or not, so
a row is what that method costs run alone; `shared with` names the variants that use some of its
teacher-side nodes too (summing a column over variants counts those nodes more than once). A node
the store reused counts with the seconds of the run that computed it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd

# the kinds that are a run's own training (kd's distilled adapter and a fresh student's pretraining too); every
# other kind is teacher-side (seq-kd's teacher completions included: the teacher's work, shared by its runs)
TRAINING = ("adapter", "kd_adapter", "fresh_student")
COLUMNS = ["variant", "runs", "teacher_side_s", "teacher_side_by_kind", "training_s_per_run", "peak_rss_mib",
           "added_rss_mib", "shared_with"]


def costs(records: Mapping[tuple[str, str], dict | None], used: Mapping[str, Iterable]) -> pd.DataFrame:
    """One row per variant (COLUMNS). records: (kind, key) -> the store's record; used: variant ->
    (kind, key) of each node it used. runs: its adapters; teacher-side seconds: its other nodes,
    summed, and per kind; training seconds per run: mean over its adapters; peak RSS over its nodes
    and the most any of them added above its start, both in MiB. A variant that trains nothing
    (vanilla) costs 0; a node without a record counts as unmeasured (NaN)."""
    used = {v: sorted({tuple(n) for n in ids}) for v, ids in used.items()}
    side = {v: {n for n in ids if n[0] not in TRAINING} for v, ids in used.items()}
    rows = []
    for variant, ids in used.items():
        recs = {n: records.get(n) or {} for n in ids}
        train = [_seconds(r) for n, r in recs.items() if n[0] in TRAINING]
        by_kind: dict[str, float] = {}
        for n in side[variant]:
            by_kind[n[0]] = by_kind.get(n[0], 0.0) + _seconds(recs[n])
        peaks = [r["peak_rss_bytes"] for r in recs.values() if "peak_rss_bytes" in r]
        added = [r["peak_rss_bytes"] - r["start_rss_bytes"] for r in recs.values()
                 if "peak_rss_bytes" in r and "start_rss_bytes" in r]
        shared = sorted(w for w, ns in side.items() if w != variant and ns & side[variant])
        rows.append({"variant": variant, "runs": len(train), "teacher_side_s": sum(by_kind.values()),
                     "teacher_side_by_kind": ", ".join(f"{k} {s:.2f}" for k, s in sorted(by_kind.items())),
                     "training_s_per_run": sum(train) / len(train) if train else 0.0,
                     "peak_rss_mib": max(peaks) / 2**20 if peaks else float("nan"),
                     "added_rss_mib": max(added) / 2**20 if added else float("nan"),
                     "shared_with": ", ".join(shared)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _seconds(record: dict) -> float:
    s = record.get("seconds")
    return float(s) if isinstance(s, (int, float)) else float("nan")
