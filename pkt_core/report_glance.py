"""The report's first screen: every arm on the declared endpoint in one table (its mean, its move from
the untrained student and that move's share of the teacher - student gap, each with an interval
corrected over the table's rows), and a sentence per positive control: could this testbed register
transfer, and what did transfer do beside the arms that could?

Arms are variants of the runs table; "twin transfer" is transfer on the aligned-basis families (a
`twin` column that is true, or a family named twin-...), and every other arm is read on the other
families. Chance comes from the protocol (`chance`: {metric: value}) or a `chance` column.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats
from .report_page import level_text
from .report_tables import ALPHA, BASELINE, DATA_ROUTE, INERT, LOWER_IS_BETTER, SIZE_CONTROLS, SUBJECT, truthy

TWIN = "twin transfer"
STUDENT, TEACHER, CHANCE = "vanilla", "teacher", "chance"
HEAD = ("teacher", "oracle", TWIN, *DATA_ROUTE, SUBJECT, "transfer-add")  # the table's order; controls follow
TAIL = (BASELINE, STUDENT)
MOVERS = ("oracle", TWIN, "transfer-add", *DATA_ROUTE)  # the positive controls a sentence is written for


def role(arm: str) -> str:
    """What an arm is, in the table's words (a data route says so in every table)."""
    if arm in DATA_ROUTE:
        return "data route (reads the teacher's outputs, not its weights)"
    return {TEACHER: "the teacher itself (how much there is to move)",
            "oracle": "positive control: trained on the scored facts (the ceiling)",
            TWIN: "positive control: transfer between models that share a basis",
            SUBJECT: "the method (parametric)", "transfer-add": "positive control: the piece added, not subtracted",
            BASELINE: "baseline: LoRA from its own init", STUDENT: "the untrained student",
            CHANCE: "chance"}.get(arm, "control built to carry no teacher knowledge" if arm in SIZE_CONTROLS
                                  else "other method")


def twin_rows(runs: pd.DataFrame) -> pd.Series:
    """Which rows are read apart as aligned-basis (twin) families: none in a table of twin families only
    (the study's twin report), whose arms are read as any report's."""
    if "twin" in runs:
        flags = runs["twin"].map(truthy)
    elif "family" in runs:
        flags = runs["family"].astype(str).str.startswith("twin")
    else:
        flags = pd.Series(False, index=runs.index)
    return flags if not (len(flags) and flags.all()) else pd.Series(False, index=runs.index)


def endpoint_scope(runs: pd.DataFrame, primary: str, endpoint: dict | None) -> tuple[str, list[str]]:
    """(metric, tasks) the first screen reads: the declared endpoint's, else the primary metric on every
    task that has it."""
    metric = (endpoint or {}).get("metric") or primary
    tasks = list((endpoint or {}).get("tasks") or dict.fromkeys(runs.loc[runs["metric"] == metric, "task"]))
    return metric, tasks


def _units(rows: pd.DataFrame, by_family: bool) -> pd.Series:
    """An arm's value per unit: its mean over seeds per family, or per seed in a single family."""
    return rows.groupby("family" if by_family else "seed", sort=False)["value"].mean()


def arms(runs: pd.DataFrame, metric: str, task: str) -> dict[str, pd.DataFrame]:
    """The rows of each arm on one task x metric, in the table's order."""
    r = runs[(runs["metric"] == metric) & (runs["task"] == task)]
    twin = twin_rows(r)
    out = {v: g for v, g in r[~twin].groupby("variant", sort=False)}
    if twin.any() and SUBJECT in set(r.loc[twin, "variant"]):
        out[TWIN] = r[twin & (r["variant"] == SUBJECT)]
    order = [a for a in HEAD if a in out] + [a for a in out if a not in HEAD + TAIL] + [a for a in TAIL if a in out]
    return {a: out[a] for a in order}


def glance(runs: pd.DataFrame, metric: str, task: str, chance: float | None = None,
           alpha: float = ALPHA) -> list[dict]:
    """One dict per arm: arm, role, n (units), units (the per-unit values), mean, lo, hi (its interval),
    delta, dlo, dhi (minus the untrained student, paired by family), share, slo, shi (delta over the
    teacher - student gap), level, inert. Every interval is a t-interval over units at the level
    Bonferroni gives over the arms that have one (1 - alpha/k); the gap is taken at its mean."""
    groups = arms(runs, metric, task)
    by_family = "family" in runs and runs["family"].nunique() >= 2
    twin = twin_rows(runs[(runs["metric"] == metric) & (runs["task"] == task)])
    rows = []
    for arm, g in groups.items():
        units = _units(g, by_family)
        inert = "inert" in g and bool(g["inert"].map(truthy).all())
        rows.append({"arm": arm, "role": role(arm), "n": len(units), "units": units, "inert": inert,
                     "mean": float(units.mean())})
    student = _reference(runs, metric, task, twin, STUDENT, by_family)
    teacher = _reference(runs, metric, task, twin, TEACHER, by_family)
    tested = [r for r in rows if not r["inert"] and r["arm"] != STUDENT and r["n"] >= 2]
    level = 1 - alpha / max(1, len(tested))
    for r in rows:
        r.update(level=level, k=max(1, len(tested)), unit="families" if by_family else "seeds")
        if r["inert"]:
            continue
        _, r["lo"], r["hi"], _ = stats.t_test(r["units"].to_numpy(float), level)
        base = student[r["arm"] == TWIN]
        if r["arm"] == STUDENT or base is None:
            continue
        d = (r["units"] - base).dropna() if isinstance(base, pd.Series) else r["units"] - base
        r["delta"], r["dlo"], r["dhi"], _ = stats.t_test(d.to_numpy(float), level)
        gap = teacher[r["arm"] == TWIN] - base if teacher[r["arm"] == TWIN] is not None else None
        gap = float(np.mean(gap)) if gap is not None else float("nan")
        if np.isfinite(gap) and abs(gap) > 1e-12:
            r["share"], r["slo"], r["shi"] = r["delta"] / gap, *sorted((r["dlo"] / gap, r["dhi"] / gap))
    if chance is not None:
        rows.append({"arm": CHANCE, "role": role(CHANCE), "n": 0, "units": pd.Series(dtype=float), "inert": False,
                     "mean": float(chance), "level": level, "k": max(1, len(tested)),
                     "unit": "families" if by_family else "seeds"})
    return rows


def _reference(runs, metric, task, twin, variant, by_family) -> dict[bool, pd.Series | float | None]:
    """A deterministic arm's value per unit (family), on the twin families (key True) and the others:
    the untrained student or the teacher; a single value in a single family."""
    r = runs[(runs["metric"] == metric) & (runs["task"] == task)]
    out = {}
    for side in (False, True):
        g = r[(twin == side) & (r["variant"] == variant)]
        out[side] = None if g.empty else _units(g, True) if by_family else float(g["value"].mean())
    return out


def chance_of(runs: pd.DataFrame, protocol: dict, metric: str, task: str) -> float | None:
    """The endpoint's chance level: the protocol's `chance` ({metric: value}) or the runs' `chance` column."""
    given = (protocol or {}).get("chance")
    if isinstance(given, dict) and metric in given:
        return float(given[metric])
    if "chance" in runs:
        c = pd.to_numeric(runs.loc[(runs["metric"] == metric) & (runs["task"] == task), "chance"], errors="coerce")
        if c.notna().any():
            return float(c.mean())
    return None


def _interval(x: dict, key: str, lo: str, hi: str, fmt: str = "{:+.3f}") -> str:
    if pd.isna(x.get(key, np.nan)):
        return ""
    if pd.isna(x.get(lo, np.nan)):
        return fmt.format(x[key]) + " [n/a]"
    return f"{fmt.format(x[key])} [{fmt.format(x[lo])}, {fmt.format(x[hi])}]"


def glance_table(rows: list[dict], metric: str, task: str) -> list[str]:
    """The first table of report.md."""
    if not rows:
        return [f"No run scored `{metric}` on {task}.", ""]
    k, unit = rows[0]["k"], rows[0]["unit"]
    lines = [f"**{task} · `{metric}`** ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better). Mean over "
             f"{unit}; every interval is a t-interval over {unit} at {level_text(rows[0]['level'])} (Bonferroni "
             f"over the {k} arms with one). Δ student: the arm minus the untrained student (vanilla), paired by "
             "family; share of gap: Δ over the teacher − student gap.", "",
             "| arm | what it is | units | mean [corrected interval] | Δ student [corrected interval] | "
             "share of the teacher − student gap |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["inert"]:
            cells = [INERT, "", ""]
        elif r["arm"] == CHANCE:
            cells = [f"{r['mean']:.3f}", "", ""]
        else:
            cells = [_interval(r, "mean", "lo", "hi", "{:.3f}"), _interval(r, "delta", "dlo", "dhi"),
                     _interval(r, "share", "slo", "shi", "{:+.2f}")]
        lines.append(f"| {r['arm']} | {r['role']} | {r['n'] or ''} | " + " | ".join(cells) + " |")
    return lines + [""]


def positive_control_lines(rows: list[dict], metric: str) -> list[str]:
    """Per positive control present: did it move the endpoint from the untrained student (its corrected
    interval excludes 0), by how much of the teacher's gap; then transfer beside them."""
    by = {r["arm"]: r for r in rows}
    better = -1 if metric in LOWER_IS_BETTER else 1
    out = []
    for arm in [a for a in MOVERS if a in by] + ([SUBJECT] if SUBJECT in by else []):
        r = by[arm]
        if r["inert"]:
            out.append(f"{arm}: {INERT}")
            continue
        if pd.isna(r.get("dlo", np.nan)):
            out.append(f"{arm}: no interval (fewer than 2 units or no untrained student to compare with)")
            continue
        moved = r["dlo"] > 0 or r["dhi"] < 0
        way = "" if not moved else " toward the teacher" if better * r["delta"] > 0 else " away from the teacher"
        share = "" if pd.isna(r.get("share", np.nan)) else \
            f", {r['share']:+.2f} [{r['slo']:+.2f}, {r['shi']:+.2f}] of the teacher − student gap"
        out.append(f"{arm} ({'moved the endpoint' + way if moved else 'did not move the endpoint'}): Δ student "
                   f"{_interval(r, 'delta', 'dlo', 'dhi')} at {level_text(r['level'])}{share}")
    if "oracle" in by and not by["oracle"]["inert"] and not pd.isna(by["oracle"].get("dlo", np.nan)) \
            and not (by["oracle"]["dlo"] > 0 or by["oracle"]["dhi"] < 0):
        out.append("even the oracle, trained on the scored facts themselves, did not move the endpoint: at this "
                   "budget the testbed cannot register transfer, and a null for transfer says nothing")
    return out


def dose_response(runs: pd.DataFrame, metric: str, task: str, level: float = 0.95) -> pd.DataFrame:
    """Mean per variant and step count where runs were scored at several step counts (columns variant,
    steps, mean, n, lo, hi, unit): the mean over units (families' means, or seeds in a single family) with its
    t-interval over them at `level` (nan below 2 units); empty where every run has one step count."""
    if "steps" not in runs:
        return pd.DataFrame()
    r = runs[(runs["metric"] == metric) & (runs["task"] == task) & ~twin_rows(runs)]
    r = r.assign(steps=pd.to_numeric(r["steps"], errors="coerce")).dropna(subset=["steps"])
    r = r[r["steps"] > 0]
    if r.empty or r.groupby("variant")["steps"].nunique().max() < 2:
        return pd.DataFrame()
    by_family = "family" in r and r["family"].nunique() >= 2
    rows = []
    for (variant, steps), g in r.groupby(["variant", "steps"], sort=False):
        units = _units(g, by_family).to_numpy(float)
        mean, lo, hi, _ = stats.t_test(units, level)
        rows.append({"variant": variant, "steps": steps, "mean": mean, "n": len(units), "lo": lo, "hi": hi,
                     "unit": "families" if by_family else "seeds"})
    return pd.DataFrame(rows)
