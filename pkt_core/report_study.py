"""The study-level summary: the declared endpoint with its bootstrap and power, the sentences that
survive correction, knowledge vs size, the scale and gates, the protocol, and the step-0 diagnostic."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from . import stats
from .report_page import _ci, _ci_text, _metrics, _name, _size, dashes, level_text
from .report_tables import (
    ALPHA, BASELINE, DETERMINISTIC, INERT, LOWER_IS_BETTER, NOT_CONTROLS, POOLED, PREFIXES, SIZE_CONTROLS,
    SIZE_TOLERANCE, SUBJECT, _family_diffs, _paired_diffs, inferential)


# ---- sentences ----------------------------------------------------------------------------------------
def headline(summary: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences from the rows that carry a verdict: is transfer distinguishable from lora, and
    which controls does it beat? A control counts as beaten only when the corrected interval of
    transfer minus it excludes zero."""
    out = []
    rows = summary[(summary["metric"] == metric) & inferential(summary)]
    for (student, task), g in rows.groupby(["student", "task"], sort=False):
        by = g.set_index("variant")
        if SUBJECT not in by.index:
            continue
        t = by.loc[SUBJECT]
        head = f"{_name(student)} / {task} / {metric}: transfer {t['mean']:.4f}"
        if BASELINE in by.index:
            out.append(f"{head} vs lora {by.loc[BASELINE, 'mean']:.4f} — {t['verdict']} ({_ci_text(t)})")
            others = [v for v in by.index if v not in NOT_CONTROLS]
            also = [v for v in others if str(by.loc[v, "verdict"]).startswith("better")]
            if str(t["verdict"]).startswith("better") and others:
                out.append(f"  {len(also)} of {len(others)} other trained inits also beat lora"
                           + (f" ({', '.join(also)}): beating lora is an init effect these share, not by itself "
                              "evidence of the teacher's knowledge" if also else ""))
        else:
            out.append(f"{head} (this sweep has no lora baseline to compare with)")
        controls = [v for v in by.index if v not in NOT_CONTROLS]
        if controls:
            out.append("  " + _control_sentence(by, controls))
        for v in (v for v in by.index if v in DETERMINISTIC):
            out.append(f"  vs {v} (one deterministic run, one-sample interval): {by.loc[v, 'transfer_verdict']} "
                       f"({_ci_text(by.loc[v], 'transfer_')})")
    return out


def _control_sentence(by: pd.DataFrame, controls: list[str]) -> str:
    beaten, lost, tied, inert = [], [], [], []
    for v in controls:
        verdict_text = str(by.loc[v, "transfer_verdict"])
        (beaten if verdict_text.startswith("better") else lost if verdict_text.startswith("worse")
         else inert if verdict_text == INERT else tied).append(v)
    evaluated = len(controls) - len(inert)
    parts = [f"transfer beats {len(beaten)} of {evaluated} controls (corrected interval of the paired difference "
             f"excludes 0)" + (f": {', '.join(beaten)}" if beaten else "")]
    if tied:
        parts.append("not distinguishable from " + ", ".join(tied))
    if lost:
        parts.append("worse than " + ", ".join(lost))
    if inert:
        parts.append(f"{INERT}: " + ", ".join(inert))
    return "; ".join(parts)


def size_match(by: pd.DataFrame, control: str, tolerance: float = SIZE_TOLERANCE) -> tuple[float, bool]:
    """(control's measured effective top singular value / transfer's, within tolerance?); nan, False
    when either size is unknown."""
    t, c = by.loc[SUBJECT].get("top_sv"), by.loc[control].get("top_sv")
    if t is None or c is None or pd.isna(t) or pd.isna(c) or t == 0:
        return float("nan"), False
    ratio = float(c / t)
    return ratio, abs(ratio - 1) <= tolerance


def knowledge_vs_size(summary: pd.DataFrame, metric: str, tolerance: float = SIZE_TOLERANCE) -> list[str]:
    """Transfer against the controls built to carry none of the teacher's knowledge (spectrum-matched,
    shuffled: transfer's singular values at the same scale; untrained-teacher: the same extraction
    from a teacher that learned nothing), each at its own chosen setting. A control is called
    size-matched only when its measured size is within `tolerance` of transfer's."""
    out = []
    rows = summary[(summary["metric"] == metric) & inferential(summary)]
    for (student, task), g in rows.groupby(["student", "task"], sort=False):
        by = g.set_index("variant")
        if SUBJECT not in by.index:
            continue
        parts = []
        for c in (c for c in SIZE_CONTROLS if c in by.index):
            ratio, matched = size_match(by, c, tolerance)
            size = ("size n/a: not called size-matched" if np.isnan(ratio) else
                    f"σ₁ {ratio:.2f}× transfer's: " + ("size-matched" if matched else "NOT size-matched"))
            parts.append(f"vs {c} ({size}): {by.loc[c, 'transfer_verdict']} ({_ci_text(by.loc[c], 'transfer_')})")
        if parts:
            out.append(f"{_name(student)} / {task} / {metric}: transfer's init ({_size(by.loc[SUBJECT]) or 'size n/a'}"
                       f", σ₁ and ratio to the student's) — " + "; ".join(parts))
    return out


# ---- the declared endpoint, first in the report ------------------------------------------------------
def _units(scores: pd.DataFrame, r: pd.Series, prefix: str) -> tuple[list[tuple[str, np.ndarray]], str]:
    """The seed-level paired differences behind a row's comparison, per family ('families') or, in a
    single group, as one list ('seeds')."""
    a, b = (SUBJECT, r["variant"]) if prefix else (r["variant"], BASELINE)
    g = scores[(scores["task"] == r["task"]) & (scores["benchmark"] == r["benchmark"]) &
               (scores["metric"] == r["metric"])]
    if r["student"] == POOLED:
        by_family = {f: {v: x for v, x in fg.groupby("variant")} for f, fg in g.groupby("family", sort=False)}
        return _family_diffs(by_family, a, b), "families"
    g = g[g["student"] == r["student"]]
    return [(str(r["student"]), _paired_diffs(g[g["variant"] == a], g[g["variant"] == b], a, b)[0])], "seeds"


def _item_tables(items: pd.DataFrame, r: pd.Series, prefix: str) -> list[np.ndarray]:
    """Per unit (family, or the one student), the [seeds x items] paired differences a - b on the
    same test items (vanilla, one run, against every seed of the other)."""
    a, b = (SUBJECT, r["variant"]) if prefix else (r["variant"], BASELINE)
    g = items[(items["task"] == r["task"]) & (items["metric"] == r["metric"])]
    if r["student"] == POOLED:
        parts = [fg for _, fg in g.groupby("family", sort=False)]
    else:
        parts = [g[g["student"] == r["student"]]]
    out = []
    for part in parts:
        wide = {v: part[part["variant"] == v].pivot(index="seed", columns="item", values="value") for v in (a, b)}
        if wide[a].empty or wide[b].empty:
            continue
        cols = wide[a].columns.intersection(wide[b].columns)
        x, y = wide[a][cols], wide[b][cols]
        if a in DETERMINISTIC or b in DETERMINISTIC:  # one run against every seed of the other
            d = x.to_numpy() - y.to_numpy() if len(x) == len(y) else (
                x.to_numpy() - y.to_numpy()[0] if len(y) == 1 else x.to_numpy()[0] - y.to_numpy())
        else:
            seeds = x.index.intersection(y.index)
            d = x.loc[seeds].to_numpy() - y.loc[seeds].to_numpy()
        if d.size:
            out.append(d)
    return out


def endpoint_section(summary: pd.DataFrame, scores: pd.DataFrame, items: pd.DataFrame | None,
                     endpoint: dict | None) -> list[str]:
    """The declared primary endpoint and its comparisons: the per-unit differences, the interval over
    units, Holm, the item x seed bootstrap, and the power of the design."""
    if not endpoint:
        return ["## Primary endpoint", "", "None was declared in the sweep config (`endpoint:`): every comparison "
                "below is exploratory, corrected together with Benjamini-Hochberg.", ""]
    comps = ", ".join(f"{c['subject']} − {c['control']}" for c in endpoint["comparisons"])
    tasks = ", ".join(endpoint.get("tasks") or []) or "every task"
    alpha = endpoint.get("alpha", ALPHA)
    lines = ["## Primary endpoint (declared in the config before the data)", "",
             f"`{endpoint['metric']}` on {tasks}; comparisons: {comps}; each variant at its own best setting on val. "
             f"Two-sided t-tests over units (families when there are several, else training seeds), Holm across "
             f"the primary comparisons at familywise α = {alpha}; every other comparison in this report is "
             f"corrected with Benjamini-Hochberg at α = {ALPHA}.", "",
             "| comparison | task | units | per-unit Δ | Δ [95% CI] | p (t) | Holm | corrected interval | "
             "bootstrap over units × seeds × test items, same level | verdict |", "|---" * 10 + "|"]
    power_lines, seen = [], 0
    rows = summary[inferential(summary)]
    m = sum(rows[p + "test"].astype(str).str.startswith("Holm").sum() for p in PREFIXES if p + "test" in rows)
    for c in endpoint["comparisons"]:
        prefix, variant = ("transfer_", c["control"]) if c["subject"] == SUBJECT else ("", c["subject"])
        found = rows[(rows["metric"] == endpoint["metric"]) & (rows["variant"] == variant) &
                     rows["task"].isin(endpoint.get("tasks") or rows["task"].unique())]
        for _, r in found.iterrows():
            if pd.isna(r.get(prefix + "diff")):
                continue
            seen += 1
            per_unit, kind = _units(scores, r, prefix)
            units = np.array([d.mean() for _, d in per_unit]) if kind == "families" else per_unit[0][1]
            boot = ""
            if items is not None and not pd.isna(r.get(prefix + "level")):
                tables = _item_tables(items, r, prefix)
                if tables:
                    lo, hi = stats.bootstrap_interval(tables, float(r[prefix + "level"]))
                    boot = f"[{lo:+.4f}, {hi:+.4f}] ({sum(t.shape[1] for t in tables) // len(tables)} items/unit)"
            holm = "" if pd.isna(r.get(prefix + "p_adj")) else f"p {r[prefix + 'p_adj']:.3f}"
            corrected = "" if pd.isna(r.get(prefix + "level")) else \
                f"[{r[prefix + 'ci_low_adj']:+.4f}, {r[prefix + 'ci_high_adj']:+.4f}] at {level_text(r[prefix + 'level'])}"
            lines.append(f"| {c['subject']} − {c['control']} | {r['task']} | {len(units)} {kind} | "
                         f"{', '.join(f'{u:+.3f}' for u in units)} | {_ci(r, prefix)} | {r[prefix + 'p_t']:.4f} "
                         f"| {holm} | {corrected} | {boot} | {r[prefix + 'verdict']} |")
            power_lines.append(_power_line(f"{c['subject']} − {c['control']} on {r['task']}", per_unit, kind, units,
                                           alpha / max(1, m)))
    if not seen:
        lines.append(f"| {comps} | | | | | | | | | no data: the runs table has none of these comparisons |")
    return lines + [""] + [f"- {p}" for p in power_lines] + [""]


def _power_line(what: str, per_unit: list[tuple[str, np.ndarray]], kind: str, units: np.ndarray, alpha: float) -> str:
    """The smallest effect this design detects (80% power, at Holm's first-step alpha) and what the
    observed effect would need."""
    n, effect = len(units), float(units.mean())
    sd = float(units.std(ddof=1)) if n > 1 else float("nan")
    if n < 2 or not sd > 0:
        return f"power ({what}): not computable from {n} {kind} with spread {sd:.3g}"
    mde = stats.min_detectable(sd, n, alpha)
    need = stats.units_needed(effect, sd, alpha)
    text = (f"power ({what}): with {n} {kind} (SD of a unit's difference {sd:.4f}) this design detects a true "
            f"difference of ±{mde:.4f} or more with 80% power at α = {alpha:.4g} (Holm's first step); the observed "
            f"{effect:+.4f} would need " + (f"{need} {kind}" if need else f"more than 100,000 {kind}"))
    if kind == "families":
        seeds = np.mean([d.size for _, d in per_unit])
        seed_sd = float(np.sqrt(np.mean([d.var(ddof=1) for _, d in per_unit if d.size > 1]))) \
            if any(d.size > 1 for _, d in per_unit) else 0.0
        k = stats.seeds_needed(effect, units, seed_sd, int(round(seeds)), alpha)
        text += (f" at {seeds:.0f} seeds each, or " + (f"{k} seeds per family with these {n} families" if k else
                 f"more families: no number of seeds suffices with {n} (the spread between families alone is too "
                 "large)"))
    return text


# ---- the scale, the gates, the protocol -----------------------------------------------------------------
def gate_lines(stats_: dict) -> list[str]:
    """A family's quality gates as sentences (the miniature family's renderer when it has one)."""
    try:
        from .mini.gates import gate_lines as render
    except ImportError:
        render = None
    if render is not None:
        return list(render(stats_))
    out = []
    for name, g in (stats_.get("gates") or {}).items():
        out.append(f"gate {name}: {g.get('value', float('nan')):.4g} against threshold "
                   f"{g.get('threshold', float('nan')):.4g} on {g.get('split', '?')}: "
                   f"{'passed' if g.get('passed') else 'FAILED'}" + (f" ({g['what']})" if g.get("what") else ""))
    return out


def scale_section(scores: pd.DataFrame, protocol: dict, gates: bool = True) -> list[str]:
    """What the run's size allows: the flow's caveat, test-set sizes, optimizer steps, families,
    seeds, and every family's quality gates (gates=False: a pointer to comparisons.md instead)."""
    lines = ["## Scale: what this run can and cannot say", ""]
    if protocol.get("scale"):
        lines += [protocol["scale"], ""]
    fams = protocol.get("families") or {}
    failed = [f for f, st in fams.items() if any(not g.get("passed") for g in (st.get("gates") or {}).values())]
    if failed:
        lines += [f"**Quality gates failed in {len(failed)} of {len(fams)} families ({', '.join(failed)})**: on those, "
                  f"the testbed cannot show what the study asks (gates {'below' if gates else 'in comparisons.md'}).",
                  ""]
    if protocol.get("excluded"):
        left = protocol["excluded"]
        lines += [f"Families are drawn by seed in order and included when every quality gate passes (measured on "
                  f"the gate split, never val or test); {len(left)} candidate famil{'ies were' if len(left) != 1 else 'y was'}"
                  " left out: " + "; ".join(f"{f} ({', '.join(g)})" for f, g in sorted(left.items(),
                                                                            key=lambda kv: _natural(kv[0]))) + ".", ""]
    if "n_items" in scores and scores["n_items"].notna().any():
        sizes = scores.groupby(["task", "benchmark"], sort=False)["n_items"].agg(["min", "max"])
        lines.append("- test set: " + "; ".join(
            f"{t} · {b}: {int(r['min'])}" + (f"-{int(r['max'])}" if r["max"] != r["min"] else "") + " items"
            for (t, b), r in sizes.iterrows()))
    if "steps" in scores:
        trained = scores[scores["steps"].fillna(0) > 0]
        if not trained.empty:
            lo, hi = int(trained["steps"].min()), int(trained["steps"].max())
            lines.append(f"- optimizer steps per training run: {lo}" + (f"-{hi}" if hi != lo else ""))
    families = scores["family"].nunique() if "family" in scores else 1
    seeds = scores[~scores["variant"].isin(DETERMINISTIC)]["seed"].nunique()
    lines.append(f"- {families} famil{'ies' if families != 1 else 'y'}, {seeds} test seeds per variant"
                 + ("" if families > 1 else ": every interval is over training seeds of one model pair and says "
                    "nothing about other pairs"))
    if not gates:
        return lines + (["- each family's sizes and quality gates: comparisons.md"] if fams else []) + [""]
    return lines + family_gates(protocol) + [""]


def family_gates(protocol: dict) -> list[str]:
    """Each family's teacher and student sizes and its quality gates, as list items."""
    lines = []
    for fam, st in sorted((protocol.get("families") or {}).items(), key=lambda kv: _natural(kv[0])):
        st = {**st, "gates": dict(sorted((st.get("gates") or {}).items()))} if st.get("gates") else st
        gates = gate_lines(st)
        who = [f"{w} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(st[w].items()))
               for w in ("teacher", "student") if isinstance(st.get(w), dict)]
        lines.append(f"- {fam}: " + "; ".join(who) if who else f"- {fam}")
        lines += [f"  - {g.strip()}" for g in gates] or ["  - no quality gates recorded for this family"]
    return lines + [""]


def _natural(name: str) -> list:
    """'family-10' after 'family-2'."""
    import re

    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(name))]


def _axes(points: list[dict]) -> dict[str, list]:
    """A grid's axes, by name (the report must not depend on a dict's insertion order: the report
    node's bytes are a function of its key, which sees canonical JSON)."""
    axes: dict[str, list] = {}
    for p in points:
        for k, x in p.items():
            if x not in axes.setdefault(k, []):
                axes[k].append(x)
    return {k: sorted(axes[k], key=str) if not all(isinstance(x, (int, float)) for x in axes[k]) else sorted(axes[k])
            for k in sorted(axes)}


def edge_flags(setting: dict, points: list[dict]) -> list[str]:
    """Each axis on which a chosen setting sits at the lowest or highest value of its grid."""
    out = []
    for k, values in _axes(points).items():
        numeric = [x for x in values if isinstance(x, (int, float))]
        if len(numeric) < 2 or k not in setting:
            continue
        if setting[k] == min(numeric):
            out.append(f"{k} {setting[k]:g} is the lowest of {sorted(numeric)}")
        elif setting[k] == max(numeric):
            out.append(f"{k} {setting[k]:g} is the highest of {sorted(numeric)}")
    return out


def protocol_section(scores: pd.DataFrame, selection: pd.DataFrame | None, protocol: dict,
                     settings: bool = True) -> list[str]:
    """The grids, the selection apart from test, and each chosen setting with its edge flags
    (settings=False: how many choices sit on a grid edge, the table in comparisons.md)."""
    grids = grids_of(scores, selection, protocol)
    lines = ["## Protocol", ""] + ([f"- {protocol['prompt_format']}"] if protocol.get("prompt_format") else [])
    if grids:
        sizes = Counter(len(p) for p in grids.values())
        head = f"every trained variant has {next(iter(sizes))} settings" if len(sizes) == 1 else \
            "UNEQUAL grids (settings per variant differ)"
        lines.append(f"- grids: {head}: " + "; ".join(
            f"{', '.join(vs)}: {_grid_text(p, vs, scores, protocol)}" + ("" if len(sizes) == 1 else f" ({len(p)})")
            for p, vs in _group_grids(grids)))
    test_seeds = sorted(set(scores.loc[~scores["variant"].isin(DETERMINISTIC), "seed"]))
    if selection is not None and not selection.empty:
        sel_seeds = sorted(set(selection["seed"]))
        shared = sorted(set(sel_seeds) & set(test_seeds))
        metric = selection["metric"].iloc[0] if "metric" in selection else protocol.get("select_on")
        lines.append(f"- selection: each variant's setting with the best mean val `{metric}` over selection seeds "
                     f"{sel_seeds}; test runs use seeds {test_seeds}" + (
                         ", which chose nothing" if not shared else
                         f". WARNING: seeds {shared} both chose settings and are scored on test"))
    else:
        lines.append(f"- no selection: every variant ran one setting; test seeds {test_seeds}")
    table = settings_table(scores, grids)
    if settings:
        lines += ["", *table]
    elif table:
        edged = sum("⚠" in line for line in table)
        lines.append(f"- chosen settings: {len(table) - 3} (task × variant × setting), {edged} of them on an edge of "
                     "their grid (⚠: the grid does not bracket the choice); the table: comparisons.md")
    return lines + [""]


def _grid_text(points: list[dict], variants: list[str], scores: pd.DataFrame, protocol: dict) -> str:
    """A grid's axes joined by ×, or 'one fixed setting'."""
    axes = [_axis_text(k, v, variants, scores, protocol) for k, v in _axes(points).items()]
    return " × ".join(axes) or "one fixed setting"


def _axis_text(name: str, values: list, variants: list[str], scores: pd.DataFrame, protocol: dict) -> str:
    """One axis of a grid as the protocol line prints it. LaTen's `step` [0] is no step count: its
    translators trained until their val answer CE moved (flows/config.py LatenSpec.points); it prints that
    rule (the protocol's `laten`: until_moved, max_steps) and the steps the runs took (translator_steps)."""
    if name != "step" or values != [0]:
        return f"{name} {values}"
    rule = protocol.get("laten") or {}
    text = "translator steps: until its val answer CE moves" + (
        " (the threshold and cap are not in this report's protocol)" if rule.get("until_moved") is None else
        f" by {rule['until_moved']:g} nats" + (f", at most {rule['max_steps']}" if rule.get("max_steps") else ""))
    if "translator_steps" in scores:
        took = pd.to_numeric(scores.loc[scores["variant"].isin(variants), "translator_steps"], errors="coerce").dropna()
        if not took.empty:
            lo, hi = int(took.min()), int(took.max())
            text += f" (the test runs took {lo}" + (f"-{hi}" if hi != lo else "") + ")"
    return text


def grids_of(scores: pd.DataFrame, selection: pd.DataFrame | None, protocol: dict) -> dict[str, list]:
    """Each variant's grid of settings, in the runs' order: the protocol's, else those selection ran."""
    order = list(dict.fromkeys(scores["variant"]))
    grids = {v: p for v, p in sorted((protocol.get("grids") or {}).items(),
                                     key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))}
    if not grids and selection is not None and not selection.empty:
        grids = {v: [json.loads(x) for x in dict.fromkeys(g["setting"])] for v, g in selection.groupby("variant")}
    return grids


def settings_table(scores: pd.DataFrame, grids: dict[str, list]) -> list[str]:
    """Per task and variant, each chosen setting, how many units chose it, and its grid-edge flags."""
    lines = []
    if "setting" in scores:
        lines += ["| task | variant | chosen setting (units that chose it) | grid edge |", "|---|---|---|---|"]
        runs = scores[~scores["variant"].isin(DETERMINISTIC)].drop_duplicates(
            [c for c in ("student", "family", "task", "variant", "seed") if c in scores])
        for (task, variant), g in runs.groupby(["task", "variant"], sort=False):
            unit = "family" if "family" in g else "student"
            chosen = Counter(g.drop_duplicates([unit, "setting"])["setting"].astype(str))
            for setting, count in chosen.items():
                edges = edge_flags(json.loads(setting), grids.get(variant, [])) if setting.startswith("{") else []
                lines.append(f"| {task} | {variant} | `{setting}` ({count}) | "
                             + ("⚠ " + "; ".join(edges) + ": the grid does not bracket this choice" if edges else "")
                             + " |")
    return lines + [""] if lines else []


def _group_grids(grids: dict[str, list]) -> list[tuple[list, list[str]]]:
    out: dict[str, tuple[list, list[str]]] = {}
    for v, points in grids.items():
        out.setdefault(json.dumps(points, sort_keys=True), (points, []))[1].append(v)
    return list(out.values())


def corrections_section(summary: pd.DataFrame) -> list[str]:
    """Which comparisons survive correction, primary (Holm) and the rest (BH)."""
    lines = ["## What survives correction", ""]
    s = summary[inferential(summary)]
    for primary, name in ((True, "Holm (primary)"), (False, "Benjamini-Hochberg (all other comparisons)")):
        total, kept = 0, []
        for prefix, label in PREFIXES.items():
            if prefix + "test" not in s:
                continue
            mine = s[s[prefix + "test"].astype(str).str.startswith("Holm" if primary else "BH")]
            if prefix:  # lora's transfer - lora mirrors transfer's own row: counted there
                mine = mine[mine["variant"] != BASELINE]
            total += len(mine)
            kept += [f"{_name(r['student'])} · {r['task']} · {r['metric']}: {label.format(v=r['variant'])} "
                     f"({r[prefix + 'verdict'].split(' (')[0]}, {_ci_text(r, prefix)})"
                     for _, r in mine.iterrows() if str(r[prefix + "verdict"]).startswith(("better", "worse"))]
        lines.append(f"- {name}: {len(kept)} of {total} comparisons survive" + (":" if kept else ""))
        lines += [f"  - {k}" for k in kept]
    return lines + [""]


def headlines(summary: pd.DataFrame, primary: str) -> list[str]:
    """Headline sentences for the primary metric and, where measured, the other headline metrics."""
    return [dashes(line) for m in _metrics(summary, primary) for line in headline(summary, m)]


def diagnostic_section(runs: pd.DataFrame, primary: str) -> str:
    """The step-0 diagnostic (diag_cos, diag_share: pkt.core.diagnose): its levels per variant beside the
    random directions of transfer's size, then how well it ranks the measured gain over lora, per metric
    (Spearman's rho with its intervals), read against the gain's own split-half reliability; "" when the
    runs carry no diagnostic."""
    from . import diagnose

    if not set(diagnose.FIELDS) <= set(runs.columns):
        return ""
    lines = ["| metric | diagnostic | cells | families | Spearman ρ | 95% interval (Fisher z) | "
             "95% bootstrap over families | p | gain's split-half reliability [95%] | reading |", "|---" * 10 + "|"]
    for metric in [m for m in _metrics(runs, primary) if m in set(runs["metric"])]:
        try:
            res = diagnose.predictive_power(runs, metric, metric in LOWER_IS_BETTER)
            rel = diagnose.split_half_reliability(runs, metric, metric in LOWER_IS_BETTER)
        except ValueError as e:
            lines.append(f"| {metric} | | | | not computed: {e} | | | | | |")
            continue
        replicates = rel["ci_low"] > 0  # nan compares False: a gain with no reliability replicates nothing shown
        rel_text = "n/a (fewer than 4 cells with 2 seeds)" if np.isnan(rel["reliability"]) else \
            f"{rel['reliability']:+.2f} [{rel['ci_low']:+.2f}, {rel['ci_high']:+.2f}] ({rel['n']} cells)"
        for field in diagnose.FIELDS:
            r = res[field]
            boot = f"[{r['boot_low']:+.2f}, {r['boot_high']:+.2f}]" if "boot_low" in r else "n/a (< 5 families)"
            lo, hi = min(r["ci_low"], r.get("boot_low", np.inf)), max(r["ci_high"], r.get("boot_high", -np.inf))
            reading = ("n/a" if np.isnan(r["ci_low"]) else
                       "not evidence either way: the gain does not replicate across seed halves" if not replicates
                       else "ranks the gain" if lo > 0  # both intervals agree
                       else "ranks it inversely" if hi < 0 else "not distinguishable from no association")
            lines.append(f"| {metric} | {field} | {r['n']} | {res['families']} | {r['rho']:+.2f} | "
                         f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {boot} | {r['p']:.3g} | {rel_text} | "
                         f"{reading} |")
    return ("\n\n## Does the step-0 diagnostic predict the gain? Its levels, then its ranking of the gain\n\n"
            "Before training, per init: "
            "diag_cos, the cosine between the init's applied update and the student's task gradient (positive = "
            "downhill), and diag_share, the part of that gradient the first LoRA step can follow (its tangent "
            "space). An init whose cosine and share sit where random directions of the same size sit (marked "
            "below) points nowhere the student's task wants to go: a direct measurement of incompatibility.\n\n"
            + "\n".join(diagnostic_levels(diagnose.levels(runs))) + "\n\nGain: variant minus lora, paired "
            "by seed, averaged per family x task x variant (positive = better; lora itself and vanilla, which has no "
            "init, left out). A reading needs every interval shown to exclude 0, and a gain that replicates: its "
            "split-half reliability (alternate seeds of each cell, Spearman-Brown) bounds any correlation with it "
            "near its square root, so where that reliability's interval includes 0 a correlation is not evidence "
            "either way. The Fisher-z interval (variance 1.06/(n-3)) treats cells as independent although the "
            "cells of one family share its lora runs; the bootstrap over families (5 or more) does not.\n\n"
            + "\n".join(lines) + "\n")


def diagnostic_levels(levels: pd.DataFrame) -> list[str]:
    """The diagnostic's levels per variant (diagnose.levels), random directions marked."""
    lines = ["| variant | inits | diag_cos mean ± SD | diag_share mean ± SD | diag_share per task (min-max) |",
             "|---|---|---|---|---|"]
    for _, r in levels.iterrows():
        name = f"{r['variant']} (random directions)" if r["random_direction"] else str(r["variant"])
        cos = "n/a (B = 0: no update)" if pd.isna(r["cos_mean"]) else f"{r['cos_mean']:+.4f} ± {_sd(r['cos_sd'])}"
        lines.append(f"| {name} | {r['inits']} | {cos} | {r['share_mean']:.3f} ± {_sd(r['share_sd'])} | "
                     f"{r['share_task_min']:.3f}-{r['share_task_max']:.3f} |")
    return lines


def _sd(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{x:.4f}"
