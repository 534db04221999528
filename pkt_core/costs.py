"""What each method costs: seconds and peak resident memory of its nodes, from the store's records.

A variant's nodes are everything upstream of its runs' adapters (its chain: sensitivity or
activations, layer plan, extraction, LoRA init, an untrained teacher, and the adapters themselves),
found by following each record's input digests. Records carry `seconds` and, since pkt measured
them, `peak_rss_bytes` and `start_rss_bytes` (pkt_core/memory.py says what those measure).

Shared nodes: every variant is charged the full seconds of every node in its chain, shared or not,
so a row is what that method costs run alone; `shared with` names the variants that reuse some of
its teacher-side nodes (summing a column over variants counts those nodes more than once). A node
the store reused counts with the seconds of the run that computed it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd

TRAINING = "adapter"  # the kind that is the run's own training; every other kind is teacher-side
COLUMNS = ["variant", "runs", "teacher_side_s", "teacher_side_by_kind", "training_s_per_run", "peak_rss_mib",
           "added_rss_mib", "shared_with"]


def chains(records: Iterable[dict], roots: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """variant -> digests of every node upstream of (and including) its root digests."""
    by_digest = {r["digest"]: r for r in records}
    out = {}
    for variant, digests in roots.items():
        seen: set[str] = set()
        todo = [d for d in digests if d in by_digest]
        while todo:
            d = todo.pop()
            if d in seen:
                continue
            seen.add(d)
            for x in by_digest[d].get("inputs", {}).values():
                todo += [y for y in (x if isinstance(x, list) else [x]) if y in by_digest and y not in seen]
        out[variant] = seen
    return out


def costs(records: Iterable[dict], roots: Mapping[str, Iterable[str]]) -> pd.DataFrame:
    """One row per variant (COLUMNS): runs (root nodes), teacher-side seconds (distinct nodes, summed)
    and per kind, training seconds per run (mean over its adapters), peak RSS over its nodes and the
    most any of them added above its start, both in MiB; a variant with no roots (vanilla) costs 0."""
    records, roots = list(records), {v: list(ds) for v, ds in roots.items()}
    by_digest = {r["digest"]: r for r in records}
    nodes = chains(records, roots)
    teacher_side = {v: {d for d in ds if by_digest[d]["kind"] != TRAINING} for v, ds in nodes.items()}
    rows = []
    for variant, digests in nodes.items():
        recs = [by_digest[d] for d in digests]
        side = [r for r in recs if r["kind"] != TRAINING]
        train = [r for r in recs if r["kind"] == TRAINING]
        by_kind: dict[str, float] = {}
        for r in side:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + _seconds(r)
        peaks = [r["peak_rss_bytes"] for r in recs if "peak_rss_bytes" in r]
        added = [r["peak_rss_bytes"] - r["start_rss_bytes"] for r in recs
                 if "peak_rss_bytes" in r and "start_rss_bytes" in r]
        shared = sorted(w for w, ds in teacher_side.items() if w != variant and ds & teacher_side[variant])
        rows.append({"variant": variant, "runs": len(roots[variant]),
                     "teacher_side_s": sum(_seconds(r) for r in side),
                     "teacher_side_by_kind": ", ".join(f"{k} {s:.2f}" for k, s in sorted(by_kind.items())),
                     "training_s_per_run": sum(_seconds(r) for r in train) / len(train) if train else 0.0,
                     "peak_rss_mib": max(peaks) / 2**20 if peaks else float("nan"),
                     "added_rss_mib": max(added) / 2**20 if added else float("nan"),
                     "shared_with": ", ".join(shared)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _seconds(record: dict) -> float:
    s = record.get("seconds")
    return float(s) if isinstance(s, (int, float)) else float("nan")
