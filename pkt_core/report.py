"""The report: what the data say, under the protocol declared before them.

Per student x task x benchmark x metric: mean +- std over seeds and every paired comparison (each
variant minus standard LoRA, transfer minus each other variant) with its 95% t-interval, the t-test p
and an exact sign-flip p. When the runs come from several independently built families (a `family`
column), the comparisons that carry a verdict are taken over families, a random effect: each
family's mean paired difference is one unit, and the t-interval is over those (the per-family rows
are descriptive). Verdicts are corrected: Holm among the declared primary comparisons, Benjamini-
Hochberg among all the others, each with the t-interval dual to its correction; a difference is
claimed only when that corrected interval excludes 0, otherwise it is "not distinguishable".
"""
from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .errors import UserError

BASELINE = "lora"
SUBJECT = "transfer"
DETERMINISTIC = {"vanilla", "teacher"}  # no training, one run: compared as a fixed value, not paired by seed
NOT_CONTROLS = {SUBJECT, BASELINE, *DETERMINISTIC}  # what the headline's "controls" leave out
SIZE_CONTROLS = ("spectrum-matched", "shuffled", "untrained-teacher")  # built to carry no teacher knowledge
SIZE_TOLERANCE = 0.10  # "size-matched": measured effective top singular value within 10% of transfer's
LOWER_IS_BETTER = {"answer_nll"}
ROW_KEYS = ["student", "task", "benchmark", "metric", "variant"]
EXACT_MAX = 16  # sign-flip: all 2^n patterns up to n = 16, Monte Carlo above
PAIRED, FIXED = "paired by seed", "one-sample vs its single run"
POOLED = "all families"  # the student name of the rows taken over families
ALPHA = 0.05
PREFIXES = {"": "{v} − lora", "transfer_": "transfer − {v}"}  # the two comparisons of every row


class RunsTableError(UserError, ValueError):
    pass


def check_runs(runs: pd.DataFrame, where: str = "runs table") -> None:
    """Refuse a table in which a variant has the same seed twice within a group: pairing by seed
    would silently pool the runs (two settings per seed read as twice the seeds)."""
    keys = [k for k in ROW_KEYS if k in runs] + [k for k in ("family",) if k in runs] + ["seed"]
    dup = runs[runs.duplicated(keys, keep=False)]
    if dup.empty:
        return
    first = dup.iloc[0]
    same = dup[(dup[keys] == first[keys]).all(axis=1)]
    settings = sorted(set(same["setting"].astype(str))) if "setting" in same else []
    raise RunsTableError(
        f"{where}: {first['variant']} has seed {first['seed']} {len(same)} times in {first['student']} / "
        f"{first['task']} / {first['metric']}" + (f" (settings {', '.join(settings)})" if len(settings) > 1 else "")
        + "; a paired comparison takes one run per variant and seed: keep one setting per variant (the rows of "
        "its chosen `setting`) or give the repeated runs seeds of their own")


def sign_flip_p(diffs: np.ndarray, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation p-value of mean(diffs) = 0: the share of sign patterns
    whose |mean| is at least the observed one. Exact (all 2^n patterns) for n <= EXACT_MAX; its
    smallest possible value is 2/2^n (0.25 at n = 3, 0.0625 at n = 5). nan below 2 pairs."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return float("nan")
    if d.size <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, d.size))
    observed = abs(d.mean())
    means = np.abs(signs @ d) / d.size
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def verdict(metric: str, lo: float, hi: float, other: str = BASELINE) -> str:
    """The subject against `other`, from the corrected interval of (subject - other)."""
    if np.isnan(lo):
        return "n/a (fewer than 2 units)"
    better_if_positive = metric not in LOWER_IS_BETTER
    if lo > 0:
        return f"better than {other}" if better_if_positive else f"worse than {other}"
    if hi < 0:
        return f"worse than {other}" if better_if_positive else f"better than {other}"
    return f"not distinguishable from {other} (corrected interval includes 0)"


# ---- the paired differences --------------------------------------------------------------------------
def _paired_diffs(a: pd.DataFrame, b: pd.DataFrame, a_name: str, b_name: str) -> tuple[np.ndarray, str]:
    """a - b over the runs of two variants (columns seed, value): paired by seed, or, when one side
    is a deterministic single run (vanilla), every run of the other against that one value."""
    if b_name in DETERMINISTIC and len(b) == 1:
        return a["value"].to_numpy(float) - float(b["value"].iloc[0]), FIXED
    if a_name in DETERMINISTIC and len(a) == 1:
        return float(a["value"].iloc[0]) - b["value"].to_numpy(float), FIXED
    paired = a[["seed", "value"]].merge(b[["seed", "value"]], on="seed", suffixes=("", "_b"))
    return (paired["value"] - paired["value_b"]).to_numpy(float), PAIRED


def _family_diffs(by_family: dict[str, dict[str, pd.DataFrame]], a: str, b: str) -> list[tuple[str, np.ndarray]]:
    """(family, paired seed differences a - b) for every family that ran both."""
    return [(f, _paired_diffs(runs[a], runs[b], a, b)[0]) for f, runs in by_family.items() if a in runs and b in runs]


def _test(units: np.ndarray, pairing: str) -> dict:
    mean, lo, hi, p = stats.t_test(units)
    return {"diff": mean, "ci_low": lo, "ci_high": hi, "p_t": p, "p_perm": sign_flip_p(units),
            "pairs": len(units), "pairing": pairing}


COMPARISON_COLUMNS = ["diff", "ci_low", "ci_high", "p_t", "p_perm", "pairs", "pairing", "test", "p_adj", "level",
                      "ci_low_adj", "ci_high_adj", "verdict"]
TRANSFER_COLUMNS = [f"transfer_{c}" for c in COMPARISON_COLUMNS]


def _row(keys: dict, variant: str, values: np.ndarray, sizes: pd.DataFrame) -> dict:
    row = {**keys, "variant": variant, "mean": values.mean(), "std": values.std(ddof=1) if values.size > 1 else
           float("nan"), "n": values.size}
    for col in ("top_sv", "top_sv_ratio"):
        if col in sizes and sizes[col].notna().any():
            row[col] = float(sizes[col].mean())
    return row


def _comparisons(row: dict, variant: str, present, units_of) -> dict:
    """variant - lora and transfer - variant, each from units_of(a, b) -> (units, pairing) or None."""
    for prefix, (a, b) in (("", (variant, BASELINE)), ("transfer_", (SUBJECT, variant))):
        if variant in (BASELINE if prefix == "" else SUBJECT,) or b not in present or a not in present:
            continue
        got = units_of(a, b)
        if got is not None:
            row.update({prefix + k: x for k, x in _test(*got).items()})
    return row


def summarize(scores: pd.DataFrame, endpoint: dict | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """scores: one row per run with ROW_KEYS + seed + value (+ family, top_sv, top_sv_ratio). One row per
    group with mean/std/n, variant - lora and transfer - variant (COMPARISON_COLUMNS, the second
    prefixed transfer_); with two or more families, also one row per variant over families
    (student = POOLED). Verdicts corrected as in correct()."""
    check_runs(scores)
    rows = []
    for keys, group in scores.groupby(ROW_KEYS[:4], sort=False):
        runs = {v: g for v, g in group.groupby("variant", sort=False)}
        for v, g in runs.items():
            row = _row(dict(zip(ROW_KEYS[:4], keys)), v, g["value"].to_numpy(float), g)
            rows.append(_comparisons(row, v, runs, lambda a, b: _paired_diffs(runs[a], runs[b], a, b)))
    if "family" in scores:
        for keys, group in scores.groupby(["task", "benchmark", "metric"], sort=False):
            if group["family"].nunique() >= 2:
                rows += _pooled_rows(dict(zip(["task", "benchmark", "metric"], keys)), group)
    return correct(pd.DataFrame(rows), endpoint, alpha)


def _pooled_rows(keys: dict, group: pd.DataFrame) -> list[dict]:
    """Families as a random effect: a variant's mean is the mean of its family means; a comparison's
    unit is a family's mean paired difference over seeds, and its interval is over families."""
    by_family = {f: {v: g for v, g in fg.groupby("variant", sort=False)}
                 for f, fg in group.groupby("family", sort=False)}
    out = []
    for v, g in group.groupby("variant", sort=False):
        means = np.array([runs[v]["value"].mean() for runs in by_family.values() if v in runs])
        row = _row({"student": POOLED, **keys}, v, means, g)

        def units_of(a, b):
            diffs = _family_diffs(by_family, a, b)
            return (np.array([d.mean() for _, d in diffs]),
                    f"over families ({len(diffs)} family means of the paired differences)") if diffs else None
        out.append(_comparisons(row, v, set(group["variant"]), units_of))
    return out


def inferential(summary: pd.DataFrame) -> pd.Series:
    """The rows whose comparisons carry a verdict: the rows over families where the table has them,
    else every row."""
    pooled = summary["student"] == POOLED
    tested = summary[pooled].set_index(["task", "benchmark", "metric"]).index
    has_pooled = summary.set_index(["task", "benchmark", "metric"]).index.isin(tested)
    return pd.Series(pooled.to_numpy() | ~has_pooled, index=summary.index)


def is_primary(row: pd.Series, prefix: str, endpoint: dict | None) -> bool:
    """Whether this row's comparison (prefix '' : variant - lora; 'transfer_': transfer - variant) is
    one of the endpoint's."""
    if not endpoint or row["metric"] != endpoint["metric"]:
        return False
    if endpoint.get("tasks") and row["task"] not in endpoint["tasks"]:
        return False
    pair = (SUBJECT, row["variant"]) if prefix else (row["variant"], BASELINE)
    return any((c["subject"], c["control"]) == pair for c in endpoint["comparisons"])


def correct(summary: pd.DataFrame, endpoint: dict | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """Holm among the endpoint's comparisons (at the endpoint's alpha), Benjamini-Hochberg among every
    other comparison that carries a verdict; adds test, p_adj, level (of the corrected interval, dual
    to the correction), ci_low_adj, ci_high_adj and verdict for both prefixes. Rows that carry no
    verdict (one family among several) are marked descriptive."""
    s = summary.copy()
    if s.empty:
        return s
    tested = inferential(s)
    entries = []  # (row index, prefix, primary?)
    for prefix in PREFIXES:
        if prefix + "p_t" not in s:
            continue
        for col in ("test", "pairing", "verdict"):
            s[prefix + col] = s[prefix + col].astype(object) if prefix + col in s else ""
        for col in ("p_adj", "level", "ci_low_adj", "ci_high_adj"):
            s[prefix + col] = np.nan
        same = (s["variant"] == BASELINE) if prefix else False  # lora's transfer - lora is transfer's - lora
        for i in s.index[s[prefix + "p_t"].notna() & tested & ~same]:
            entries.append((i, prefix, is_primary(s.loc[i], prefix, endpoint)))
        for i in s.index[s[prefix + "diff"].notna() & ~tested]:
            s.at[i, prefix + "test"] = "descriptive (one family of several)"
    for primary, method, name in ((True, stats.holm, "Holm"), (False, stats.bh, "BH")):
        chosen = [(i, prefix) for i, prefix, p in entries if p == primary]
        level_alpha = (endpoint or {}).get("alpha", alpha) if primary else alpha
        adj, reject, local = method([s.at[i, prefix + "p_t"] for i, prefix in chosen], level_alpha)
        for (i, prefix), pa, a in zip(chosen, adj, local):
            lo, hi = _rescale(s.loc[i], prefix, 1 - a)
            other = BASELINE if prefix == "" else s.at[i, "variant"]
            s.loc[i, [prefix + c for c in ("p_adj", "level", "ci_low_adj", "ci_high_adj")]] = [pa, 1 - a, lo, hi]
            s.at[i, prefix + "test"] = f"{name} ({'primary, ' if primary else ''}m = {len(chosen)})"
            s.at[i, prefix + "verdict"] = verdict(s.at[i, "metric"], lo, hi, other)
    _mirror_transfer_minus_lora(s)
    for prefix in PREFIXES:  # a comparison with fewer than 2 units has no p and no verdict
        if prefix + "diff" in s:
            few = tested & s[prefix + "diff"].notna() & s[prefix + "p_t"].isna()
            s.loc[few, prefix + "verdict"] = "n/a (fewer than 2 units)"
    return s


def _mirror_transfer_minus_lora(s: pd.DataFrame) -> None:
    """transfer - lora is tested once (transfer's row, variant - lora); lora's row shows the same result
    in its transfer - variant columns."""
    if "transfer_p_adj" not in s or "p_adj" not in s:
        return
    keys = ROW_KEYS[:4]
    src = s[s["variant"] == SUBJECT].set_index(keys)
    for i in s.index[s["variant"] == BASELINE]:
        key = tuple(s.loc[i, keys])
        if key in src.index:
            for col in ("test", "p_adj", "level", "ci_low_adj", "ci_high_adj", "verdict"):
                s.at[i, "transfer_" + col] = src.at[key, col]


def _rescale(r: pd.Series, prefix: str, level: float) -> tuple[float, float]:
    """The t-interval of a row's comparison at another level, from its 95% interval and unit count."""
    from scipy import stats as sp

    n, mean, lo = r[prefix + "pairs"], r[prefix + "diff"], r[prefix + "ci_low"]
    if pd.isna(lo) or n < 2:
        return float("nan"), float("nan")
    se = (mean - lo) / sp.t.ppf(0.975, n - 1)
    half = sp.t.ppf(0.5 + level / 2, n - 1) * se
    return mean - half, mean + half


# ---- formatting ---------------------------------------------------------------------------------------
def _ci(r: pd.Series, prefix: str = "", adj: bool = False) -> str:
    lo, hi = (prefix + "ci_low_adj", prefix + "ci_high_adj") if adj else (prefix + "ci_low", prefix + "ci_high")
    if pd.isna(r.get(prefix + "diff")):
        return ""
    if pd.isna(r.get(lo)):
        return f"{r[prefix + 'diff']:+.4f} [n/a]"
    return f"{r[prefix + 'diff']:+.4f} [{r[lo]:+.4f}, {r[hi]:+.4f}]"


def _p(r: pd.Series, prefix: str = "") -> str:
    p, perm = r.get(prefix + "p_t"), r.get(prefix + "p_perm")
    if p is None or pd.isna(p):
        return ""
    return f"{p:.3f} / {perm:.3f}" + ("*" if r.get(prefix + "pairing") == FIXED else "")


def _corrected(r: pd.Series, prefix: str = "") -> str:
    if pd.isna(r.get(prefix + "p_adj")):
        return str(r.get(prefix + "test") or "")
    return (f"{r[prefix + 'test']}: p {r[prefix + 'p_adj']:.3f}, [{r[prefix + 'ci_low_adj']:+.4f}, "
            f"{r[prefix + 'ci_high_adj']:+.4f}] at {r[prefix + 'level']:.1%}")


def _cell(r: pd.Series, col: str) -> str:
    x = r.get(col)
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)


def _size(r: pd.Series) -> str:
    sv = r.get("top_sv")
    if sv is None or pd.isna(sv):
        return ""
    ratio = r.get("top_sv_ratio")
    return f"{sv:.3f}" + ("" if ratio is None or pd.isna(ratio) else f" ({ratio:.2f}×)")


def _name(student) -> str:
    return str(student) if student == POOLED else Path(str(student)).name


TABLE_NOTE = ("Δ: paired difference with its 95% t-interval, over training seeds (one family) or over families "
              "(rows 'all families': each family's mean paired difference is one unit); p: the t-test's, then the "
              "exact two-sided sign-flip permutation p (it cannot go below 2/2^n: 0.0625 at n = 5, 0.031 at n = 6); "
              "* marks a comparison with vanilla, one deterministic run, so the interval is one-sample. Corrected: "
              "Holm among the declared primary comparisons, Benjamini-Hochberg (BH) among all others; the adjusted "
              "p, and the t-interval at the level dual to the correction (Holm's step; BH's false-coverage level "
              "R·α/m). A verdict says better/worse only when that corrected interval excludes 0. Per-family rows "
              "of a study over several families are descriptive: no verdict. init σ₁: the effective top singular "
              "value of the init's applied delta (alpha/r included), mean over modules, and in brackets its ratio "
              "to the student's own weight's top singular value for the same module.")


def markdown(summary: pd.DataFrame) -> str:
    lines = []
    for (student, task, bench, metric), g in summary.groupby(ROW_KEYS[:4], sort=False):
        lines += [f"### {_name(student)} · {task} · {bench} · {metric}", "",
                  "| variant | mean ± std | n | init σ₁ (× student σ₁) | Δ vs lora [95% CI] | p (t / sign-flip) | "
                  "corrected | verdict vs lora | transfer − variant [95% CI] | p (t / sign-flip) | corrected | "
                  "transfer vs variant |", "|---" * 12 + "|"]
        for _, r in g.iterrows():
            std = "" if pd.isna(r["std"]) else f" ± {r['std']:.4f}"
            lines.append(f"| {r['variant']} | {r['mean']:.4f}{std} | {r['n']} | {_size(r)} | {_ci(r)} | {_p(r)} | "
                         f"{_corrected(r)} | {_cell(r, 'verdict')} | {_ci(r, 'transfer_')} | {_p(r, 'transfer_')} | "
                         f"{_corrected(r, 'transfer_')} | {_cell(r, 'transfer_verdict')} |")
        lines.append("")
    return "\n".join(lines + [TABLE_NOTE, ""])


def _ci_text(r: pd.Series, prefix: str = "") -> str:
    if pd.isna(r.get(prefix + "p_adj")):
        return f"Δ {_ci(r, prefix)}"
    return (f"Δ {_ci(r, prefix, adj=True)} at {r[prefix + 'level']:.1%}, {r[prefix + 'test'].split(' (')[0]}-adjusted "
            f"p = {r[prefix + 'p_adj']:.3f}")


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
    beaten, lost, tied = [], [], []
    for v in controls:
        verdict_text = str(by.loc[v, "transfer_verdict"])
        (beaten if verdict_text.startswith("better") else lost if verdict_text.startswith("worse") else tied).append(v)
    parts = [f"transfer beats {len(beaten)} of {len(controls)} controls (corrected interval of the paired difference "
             f"excludes 0)" + (f": {', '.join(beaten)}" if beaten else "")]
    if tied:
        parts.append("not distinguishable from " + ", ".join(tied))
    if lost:
        parts.append("worse than " + ", ".join(lost))
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


def select_settings(val: pd.DataFrame, metric: str) -> dict[str, str]:
    """Each variant's setting (a JSON string) with the best mean over seeds of `metric` on val
    (columns variant, setting, value). Ties: the first setting in the table's order."""
    chosen = {}
    for variant, g in val.groupby("variant", sort=False):
        means = g.groupby("setting", sort=False)["value"].mean()
        chosen[variant] = means.idxmin() if metric in LOWER_IS_BETTER else means.idxmax()
    return chosen


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
                f"[{r[prefix + 'ci_low_adj']:+.4f}, {r[prefix + 'ci_high_adj']:+.4f}] at {r[prefix + 'level']:.1%}"
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


def scale_section(scores: pd.DataFrame, protocol: dict) -> list[str]:
    """What the run's size allows: the flow's caveat, test-set sizes, optimizer steps, families,
    seeds, and every family's quality gates."""
    lines = ["## Scale: what this run can and cannot say", ""]
    if protocol.get("scale"):
        lines += [protocol["scale"], ""]
    fams = protocol.get("families") or {}
    failed = [f for f, st in fams.items() if any(not g.get("passed") for g in (st.get("gates") or {}).values())]
    if failed:
        lines += [f"**Quality gates failed in {len(failed)} of {len(fams)} families ({', '.join(failed)})**: on those, "
                  "the testbed cannot show what the study asks (gates below).", ""]
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
    for fam, st in sorted(fams.items(), key=lambda kv: _natural(kv[0])):
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


def protocol_section(scores: pd.DataFrame, selection: pd.DataFrame | None, protocol: dict) -> list[str]:
    """The grids, the selection apart from test, and each chosen setting with its edge flags."""
    order = list(dict.fromkeys(scores["variant"]))
    grids = {v: p for v, p in sorted((protocol.get("grids") or {}).items(),
                                     key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))}
    if not grids and selection is not None and not selection.empty:
        grids = {v: [json.loads(x) for x in dict.fromkeys(g["setting"])] for v, g in selection.groupby("variant")}
    lines = ["## Protocol", ""]
    if grids:
        sizes = Counter(len(p) for p in grids.values())
        head = f"every trained variant has {next(iter(sizes))} settings" if len(sizes) == 1 else \
            "UNEQUAL grids (settings per variant differ)"
        lines.append(f"- grids: {head}: " + "; ".join(
            f"{', '.join(vs)}: {' × '.join(f'{k} {v}' for k, v in _axes(p).items()) or 'one fixed setting'}"
            + ("" if len(sizes) == 1 else f" ({len(p)})") for p, vs in _group_grids(grids)))
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
    if "setting" in scores:
        lines += ["", "| task | variant | chosen setting (units that chose it) | grid edge |", "|---|---|---|---|"]
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
    return lines + [""]


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


# ---- charts ---------------------------------------------------------------------------------------------
def _all_zero(values) -> bool:
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return v.empty or bool((v == 0).all())


def chart_panels(summary: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(title, kind, rows) of every panel report.png draws: per group that carries verdicts, the means
    ± std ("means"), transfer − variant ("transfer_") and variant − lora (""); a panel with no data,
    or only zeros, is left out."""
    panels = []
    for keys, g in summary[inferential(summary)].groupby(ROW_KEYS[:4], sort=False):
        title = f"{_name(keys[0])} · {keys[1]} · {keys[3]}"
        if not (_all_zero(g["mean"]) and _all_zero(g["std"])):
            panels.append((f"{title}: mean ± std", "means", g))
        for prefix, label in (("transfer_", "transfer − variant"), ("", "variant − lora")):
            rows = g[g[prefix + "diff"].notna()] if prefix + "diff" in g else g.iloc[:0]
            if prefix:  # transfer - lora is drawn once, in the variant - lora panel
                rows = rows[rows["variant"] != BASELINE]
            if not rows.empty and not _all_zero(pd.concat([rows[prefix + c] for c in ("diff", "ci_low", "ci_high")])):
                panels.append((f"{title}: {label}", prefix, rows))
    return panels


VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "not": "tab:gray", "n/a": "tab:gray"}


def _forest(ax, rows: pd.DataFrame, prefix: str, metric: str) -> None:
    """Differences with their 95% interval (thin) and corrected interval (thick), coloured by the
    corrected verdict; the axis spans the intervals, not 0 to the values."""
    y = np.arange(len(rows))[::-1]
    # the axis spans 0, the differences and their 95% intervals; a wider corrected interval is cut at
    # the edge and marked with an arrow, so that it cannot shrink the differences out of sight
    span = pd.concat([rows[prefix + c] for c in ("diff", "ci_low", "ci_high")]).dropna().tolist() + [0.0]
    lo, hi = min(span), max(span)
    pad = 0.08 * (hi - lo) or 1e-3
    lo, hi = lo - pad, hi + pad
    for yi, (_, r) in zip(y, rows.iterrows()):
        color = VERDICT_COLORS.get(str(r.get(prefix + "verdict", "")).split(" ")[0], "tab:gray")
        if not pd.isna(r[prefix + "ci_low"]):
            ax.plot([r[prefix + "ci_low"], r[prefix + "ci_high"]], [yi, yi], color=color, lw=1)
        if not pd.isna(r.get(prefix + "ci_low_adj", np.nan)):
            a, b = r[prefix + "ci_low_adj"], r[prefix + "ci_high_adj"]
            ax.plot([max(a, lo), min(b, hi)], [yi, yi], color=color, lw=3.5, alpha=0.6)
            for end, edge, marker in ((a, lo, "<"), (b, hi, ">")):
                if (end < edge) if marker == "<" else (end > edge):
                    ax.plot([edge], [yi], marker, color=color, ms=6)
        ax.plot([r[prefix + "diff"]], [yi], "o", color=color)
    ax.set_xlim(lo, hi)
    ax.axvline(0, color="k", lw=0.8)
    label = PREFIXES[prefix]
    ax.set_yticks(y, [label.format(v=r["variant"]) for _, r in rows.iterrows()], fontsize=7)
    ax.set_xlabel(f"difference in {metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)",
                  fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def _means(ax, rows: pd.DataFrame, metric: str) -> None:
    y = np.arange(len(rows))[::-1]
    colors = ["tab:orange" if v == SUBJECT else "tab:blue" if v == BASELINE else "k" for v in rows["variant"]]
    for yi, (_, r), c in zip(y, rows.iterrows(), colors):
        ax.errorbar([r["mean"]], [yi], xerr=[[0 if pd.isna(r["std"]) else r["std"]]], fmt="o", color=c, capsize=3)
    ax.set_yticks(y, list(rows["variant"]), fontsize=7)
    ax.set_xlabel(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def bar_chart(summary: pd.DataFrame, path: str | Path) -> Path:
    """Every panel of chart_panels: means ± std as points, and the paired differences with their 95%
    and corrected intervals, green/red when the corrected interval says better/worse, grey when not
    distinguishable (legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = chart_panels(summary)
    cols = min(3, max(1, len(panels)))
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 0.3 * 16 * nrows + 1), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (title, kind, rows) in zip(axes.flat, panels):
        metric = rows["metric"].iloc[0]
        _means(ax, rows, metric) if kind == "means" else _forest(ax, rows, kind, metric)
        ax.set_title(title, fontsize=8)
    if not panels:
        fig.text(0.5, 0.5, "no comparison with data to draw", ha="center")
    handles = [Line2D([], [], color=VERDICT_COLORS[k], marker="o", lw=2, label=text) for k, text in
               (("better", "better (corrected interval excludes 0)"),
                ("worse", "worse (corrected interval excludes 0)"), ("not", "not distinguishable"))]
    handles += [Line2D([], [], color="k", lw=1, label="95% interval"),
                Line2D([], [], color="k", lw=3.5, alpha=0.6,
                       label="corrected interval (Holm / BH; ▶ cut at the edge)")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("pkt: paired differences (the first named is better or worse than the second)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def curve_styles(variants: list[str]) -> dict[str, dict]:
    """A distinct (colour, linestyle) per variant, transfer thick and black: 10 colours x 4 styles, and
    a marker each (a run of one step is a point, not a line)."""
    import matplotlib

    palette = [c for c in matplotlib.colormaps["tab10"].colors]
    out, i = {}, 0
    for v in variants:
        if v == SUBJECT:
            out[v] = {"color": "black", "linestyle": "-", "lw": 2.4, "marker": "o"}
            continue
        out[v] = {"color": palette[i % 10], "linestyle": LINESTYLES[(i // 10) % 4], "lw": 1.2,
                  "marker": MARKERS[(i + 1) % len(MARKERS)]}
        i += 1
    return out


def curves_chart(curves: pd.DataFrame, path: str | Path) -> Path:
    """Training loss per optimizer step, mean over seeds per variant (shaded: min..max over seeds),
    one panel per student x task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(curves.groupby(["student", "task"], sort=False))
    styles = curve_styles(list(dict.fromkeys(curves["variant"])))
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.remove()
    for ax, ((student, task), g) in zip(axes.flat, groups):
        for variant, v in g.groupby("variant", sort=False):
            by_step = v.groupby("step")["loss"]
            mean = by_step.mean()
            ax.plot(mean.index, mean.values, label=variant, markevery=max(1, len(mean) // 8), ms=4,
                    **styles[variant])
            ax.fill_between(mean.index, by_step.min().values, by_step.max().values, alpha=0.08,
                            color=styles[variant]["color"])
        ax.set_title(f"{_name(student)} · {task}", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("training loss (answer tokens)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def headlines(summary: pd.DataFrame, primary: str) -> list[str]:
    """Headline sentences for the primary metric and, where measured, the other headline metrics."""
    return [line for m in _metrics(summary, primary) for line in headline(summary, m)]


REPORT_FILES = {"markdown": "report.md", "csv": "summary.csv", "runs": "runs.csv", "chart": "report.png",
                "protocol": "protocol.json", "selection": "selection.csv", "items": "items.csv",
                "curves": "curves.csv", "curves_chart": "curves.png"}


def write_report(scores: pd.DataFrame, out_dir: str | Path, primary: str, curves: pd.DataFrame | None = None, *,
                 selection: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
                 protocol: dict | None = None) -> dict[str, Path]:
    """report.md, summary.csv, runs.csv, report.png, protocol.json; with them also selection.csv (the
    val runs that chose the settings), items.csv (per-item test scores, for the bootstrap), curves.csv
    and curves.png (training losses).

    protocol: endpoint (the declared primary endpoint: metric, tasks, comparisons [{subject, control}],
    alpha), grids (variant -> its settings), selection_seeds, test_seeds, select_on, scale (the
    caveat of the run's size, in words), families (name -> the family's stats, with its gates)."""
    protocol = dict(protocol or {})
    given = {"curves": curves, "selection": selection, "items": items}
    present = {k for k, t in given.items() if t is not None and not t.empty}
    names = {k: f for k, f in REPORT_FILES.items() if k.split("_")[0] not in given or k.split("_")[0] in present}
    paths = {name: Path(out_dir) / f for name, f in names.items()}
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    endpoint = protocol.get("endpoint")
    summary = summarize(scores, endpoint)
    scores.to_csv(paths["runs"], index=False)
    summary.to_csv(paths["csv"], index=False)
    paths["protocol"].write_text(json.dumps(protocol, indent=1, sort_keys=True))
    for name in ("selection", "items", "curves"):
        if name in paths:
            given[name].to_csv(paths[name], index=False)
    metrics = _metrics(summary, primary)
    text = ["# pkt report", ""] + endpoint_section(summary, scores, items, endpoint) + scale_section(scores, protocol)
    text += protocol_section(scores, selection, protocol) + ["## Claims after correction", ""]
    text += [f"- {h}" for h in headlines(summary, primary)] + [""] + corrections_section(summary)
    size = [line for m in metrics for line in knowledge_vs_size(summary, m)]
    if size:
        text += ["## Knowledge vs size", "", "Transfer against the controls built to carry none of the teacher's "
                 "knowledge (spectrum-matched, shuffled: transfer's singular values at the same scale; "
                 "untrained-teacher: the same extraction from a teacher that learned nothing), each at its own "
                 f"chosen setting. A control is called size-matched only when its measured effective top singular "
                 f"value is within ±{SIZE_TOLERANCE:.0%} of transfer's.", ""] + [f"- {line}" for line in size] + [""]
    views = [view for m in metrics if (view := overview(summary, m))]
    text += ["## Overview", "", "Mean; T−X: transfer minus the row's variant with its 95% interval; ▲ transfer "
             "better, ▼ worse (the corrected interval excludes 0; only on rows that carry a verdict), unmarked: "
             "not distinguishable or descriptive.", "", "\n\n".join(views), "", "## Every comparison", ""]
    paths["markdown"].write_text("\n".join(text) + "\n" + markdown(summary) + diagnostic_section(scores, primary))
    bar_chart(summary, paths["chart"])
    if "curves_chart" in paths:
        curves_chart(curves, paths["curves_chart"])
    return paths


# the metric each shipped benchmark is judged by (evaluate.primary_metric), and the answer NLL
HEADLINE_METRICS = ("exact_match/strict-match", "acc", "exact_match", "winrate", "answer_nll")


def _metrics(summary: pd.DataFrame, primary: str) -> list[str]:
    """The primary metric first, then every other headline metric the table has (a sweep over a
    GSM-like and an MMLU-like task reports both exact match and accuracy)."""
    present = set(summary["metric"])
    return [primary] + [m for m in HEADLINE_METRICS if m != primary and m in present]


def overview(summary: pd.DataFrame, metric: str) -> str:
    """One row per variant, one column per student x task (rows over families first): the mean, then
    transfer minus that variant with its 95% interval, marked ▲ (transfer better: the corrected
    interval excludes 0) or ▼ (worse) where the row carries a verdict."""
    rows = summary[summary["metric"] == metric]
    if rows.empty:
        return ""
    rows = pd.concat([rows[rows["student"] == POOLED], rows[rows["student"] != POOLED]])
    cols = list(dict.fromkeys(zip(rows["student"], rows["task"])))
    head = [f"{_name(st)} · {t}" for st, t in cols]
    lines = [f"| {metric} | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in dict.fromkeys(rows["variant"]):
        cells = []
        for st, t in cols:
            r = rows[(rows["student"] == st) & (rows["task"] == t) & (rows["variant"] == variant)]
            cells.append(_overview_cell(r.iloc[0]) if len(r) else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _overview_cell(r: pd.Series) -> str:
    text = f"{r['mean']:.3f}"
    if pd.isna(r.get("transfer_diff")):
        return text
    v = str(r.get("transfer_verdict", ""))
    mark = " ▲" if v.startswith("better") else " ▼" if v.startswith("worse") else ""
    return f"{text}; T−X {_ci(r, 'transfer_')}{mark}"


def read_csv(path) -> pd.DataFrame:
    """A runs or summary table as written above (empty cells are missing values, nothing else is)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def diagnostic_section(runs: pd.DataFrame, primary: str) -> str:
    """How well the step-0 diagnostic (diag_cos, diag_share: pkt.core.diagnose) ranks the measured gain over
    lora, per metric: Spearman's rho with its interval; "" when the runs carry no diagnostic."""
    from . import diagnose

    if not set(diagnose.FIELDS) <= set(runs.columns):
        return ""
    lines = ["| metric | diagnostic | cells | families | Spearman ρ | 95% interval (Fisher z) | "
             "95% bootstrap over families | p | reading |", "|---" * 9 + "|"]
    for metric in [m for m in _metrics(runs, primary) if m in set(runs["metric"])]:
        try:
            res = diagnose.predictive_power(runs, metric, metric in LOWER_IS_BETTER)
        except ValueError as e:
            lines.append(f"| {metric} | | | | not computed: {e} | | | | |")
            continue
        for field in diagnose.FIELDS:
            r = res[field]
            boot = f"[{r['boot_low']:+.2f}, {r['boot_high']:+.2f}]" if "boot_low" in r else "n/a (< 5 families)"
            lo, hi = min(r["ci_low"], r.get("boot_low", np.inf)), max(r["ci_high"], r.get("boot_high", -np.inf))
            reading = ("n/a" if np.isnan(r["ci_low"]) else "ranks the gain" if lo > 0  # both intervals agree
                       else "ranks it inversely" if hi < 0 else "not distinguishable from no association")
            lines.append(f"| {metric} | {field} | {r['n']} | {res['families']} | {r['rho']:+.2f} | "
                         f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {boot} | {r['p']:.3g} | {reading} |")
    return ("\n\n## Does the step-0 diagnostic predict the gain?\n\nBefore training, per init: diag_cos, the "
            "cosine between the init's applied update and the student's task gradient (positive = downhill), and "
            "diag_share, the part of that gradient the first LoRA step can follow. Gain: variant minus lora, paired "
            "by seed, averaged per family x task x variant (positive = better; lora itself and vanilla, which has no "
            "init, left out). A reading needs every interval shown to exclude 0. The Fisher-z interval (variance 1.06/(n-3)) treats cells as independent although the cells of "
            "one family share its lora runs; the bootstrap over families (5 or more) does not.\n\n"
            + "\n".join(lines) + "\n")


def append_costs(paths: dict[str, Path], costs: pd.DataFrame) -> None:
    """Add "What each method costs" to report.md: per variant its measured cost (pkt_core/costs.py)
    beside its effect, the paired difference to lora with its 95% interval on each headline metric."""
    summary = read_csv(paths["csv"])
    metrics = [m for m in HEADLINE_METRICS if m in set(summary["metric"])]
    head = ["variant", "trained runs", "teacher-side s", "training s/run", "peak RSS MiB (+added)"] + \
        [f"{m}: −lora" for m in metrics] + ["teacher-side nodes shared with"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for _, c in costs.iterrows():
        effects = []
        for m in metrics:
            rows = summary[(summary["variant"] == c["variant"]) & (summary["metric"] == m)]
            effects.append("; ".join(_ci(r) for _, r in rows.iterrows() if _ci(r)) or "—")
        rss = "" if pd.isna(c["peak_rss_mib"]) else f"{c['peak_rss_mib']:.0f} (+{c['added_rss_mib']:.0f})"
        lines.append("| " + " | ".join([str(c["variant"]), str(c["runs"]), f"{c['teacher_side_s']:.2f}",
                                         f"{c['training_s_per_run']:.2f}", rss, *effects,
                                         _cell(c, "shared_with")]) + " |")
    text = ("\n\n## What each method costs\n\nSeconds and peak resident memory of each variant's nodes, from the "
            "store's records (teacher-side: every node upstream of its adapters, summed per distinct node; "
            "training: mean per run). A node shared by several variants is charged in full to each (its cost "
            "run alone; the last column names who shares). Peak RSS is the whole process's, sampled while a node "
            "ran; (+added) the most one node added above its start: a lower bound of its own need. −lora: "
            "the variant minus lora, paired by seed, 95% interval, one entry per student · task.\n\n"
            + "\n".join(lines) + "\n")
    tmp = Path(paths["markdown"]).with_name(".report.md.tmp")  # a reader never sees half a report
    tmp.write_text(Path(paths["markdown"]).read_text() + text)
    os.replace(tmp, paths["markdown"])
