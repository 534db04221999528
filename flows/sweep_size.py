"""The size of a sweep, stated before it starts: how many nodes of each kind its config submits, the
seconds the store recorded for each kind, and the sentence that puts the two together (`pkt sweep`'s
--max-nodes gate; flows/plan.py counts the nodes to compute)."""
from __future__ import annotations

from collections import Counter

from .config import SweepConfig
from .variants import VARIANTS


def node_counts(cfg: SweepConfig) -> dict[str, int]:
    """kind -> how many nodes of that kind the sweep submits, for the kinds that take its time:
    adapters (or LaTen updates) and their LoRA inits, scores, step-0 diagnostics. Every node is
    counted, stored ones too: computed from the config's sizes, so a sweep of millions is counted in
    microseconds, before any input is read (the gate for a sweep too large to plan node by node;
    flows/plan.py counts the nodes to compute)."""
    trained = [v for v in cfg.variants if VARIANTS[v].trains]
    selecting = any(cfg.grid_size(v) > 1 for v in trained)
    counts: Counter = Counter()
    for task in cfg.tasks:
        benchmarks = len({task.benchmark, *cfg.benchmarks})
        for name in cfg.variants:
            v = VARIANTS[name]
            if not v.trains:  # vanilla: the student scored once
                counts["scores"] += benchmarks
                continue
            points = cfg.grid_size(name)
            selection = points * len(cfg.selection_seeds) if selecting else 0
            counts["adapter" if v.chain == "adapter" else "laten_delta"] += selection + len(cfg.seeds)
            counts["scores"] += selection + len(cfg.seeds) * benchmarks
            if v.chain == "adapter":
                counts["diagnostic"] += len(cfg.seeds)
            if v.extracted:  # one init per setting, or per seed too for a control drawn from the seed
                counts["lora_init"] += selection + len(cfg.seeds) if v.drawn else points
    fresh = sum(VARIANTS[name].chain == "fresh" for name in cfg.variants)  # one pretraining per student, any task
    if fresh:
        counts["fresh_student"] = fresh
    return {kind: n * len(cfg.students) for kind, n in counts.items()}


def seconds_per_node(records: list[dict]) -> dict[str, float]:
    """kind -> the mean seconds the store's records of that kind took (its measured cost)."""
    times: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r.get("seconds"), (int, float)) and r["seconds"] >= 0:
            times.setdefault(r["kind"], []).append(float(r["seconds"]))
    return {kind: sum(x) / len(x) for kind, x in times.items()}


def describe_size(counts: dict[str, int], per_node: dict[str, float], reused: dict[str, int] | None = None,
                  bound: bool = False) -> tuple[int, str]:
    """(nodes to compute, 'N nodes to compute (a adapter, b scores, ...), M reused from the store, about T'
    in words): T is for the nodes to compute only. reused None: every node counted (none looked up);
    bound: N is an upper bound."""
    total = sum(counts.values())
    parts = ", ".join(f"{n:,} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    timed = {k: n * per_node[k] for k, n in counts.items() if k in per_node}
    untimed = sorted(set(counts) - set(timed))
    if timed:
        hours = sum(timed.values()) / 3600
        when = f"about {hours:,.1f} h of node compute from the store's recorded seconds" + (
            f" (no {', '.join(untimed)} timed there yet)" if untimed else "")
    elif counts:
        when = "time unknown: no node of these kinds recorded in the store yet"
    else:
        when = "nothing to compute"
    if reused is None:
        return total, f"{total:,} nodes ({parts}), {when}"
    held = sum(reused.values())
    return total, (f"{'at most ' if bound else ''}{total:,} nodes to compute" + (f" ({parts})" if parts else "")
                   + f", {held:,} reused from the store, {when}")

