"""The report's statistics tables: what the data say, under the protocol declared before them.

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

import numpy as np
import pandas as pd

from . import stats
from .errors import UserError


BASELINE = "lora"
SUBJECT = "transfer"
DETERMINISTIC = {"vanilla", "teacher"}  # no training, one run: compared as a fixed value, not paired by seed
# the positive controls: each answers "could this testbed register transfer?" (docs: positive-controls.md);
# kd and seq-kd read the teacher's outputs, not its weights: a data route, labelled so in every table
DATA_ROUTE = ("kd", "seq-kd")
POSITIVE_CONTROLS = ("oracle", "transfer-add", *DATA_ROUTE)
NOT_CONTROLS = {SUBJECT, BASELINE, *DETERMINISTIC, *POSITIVE_CONTROLS}  # what the headline's "controls" leave out
INERT = "not evaluated: inert at this width"  # a variant whose runs carry inert = true (its update moved nothing)
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
    if "inert" in sizes:
        row["inert"] = bool(sizes["inert"].map(truthy).all())
    return row


def truthy(x) -> bool:
    """A flag cell as runs.csv holds it: True/true/1 (pandas reads a column with blanks as objects)."""
    return str(x).strip().lower() in ("true", "1", "1.0", "yes")


def at_final_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """Where a run was scored at several checkpoints (a `steps` column with several values for one
    variant x seed), the rows at its largest step count: the endpoint is read there; the other
    checkpoints are the dose-response. A table with one row per run is returned as it is."""
    if "steps" not in runs:
        return runs
    keys = [k for k in ROW_KEYS + ["family", "seed"] if k in runs]
    steps = pd.to_numeric(runs["steps"], errors="coerce").fillna(0)
    last = steps.groupby([runs[k] for k in keys], sort=False).transform("max")
    return runs if (steps == last).all() else runs[(steps == last).to_numpy()].reset_index(drop=True)


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
        inert = s["inert"].fillna(False).astype(bool) if "inert" in s else pd.Series(False, index=s.index)
        for i in s.index[s[prefix + "p_t"].notna() & tested & ~same & ~inert]:
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
    if "inert" in s:  # its update moved nothing: a null from it would say nothing about the method
        s.loc[s["inert"].fillna(False).astype(bool), [p + "verdict" for p in PREFIXES if p + "verdict" in s]] = INERT
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


def select_settings(val: pd.DataFrame, metric: str) -> dict[str, str]:
    """Each variant's setting (a JSON string) with the best mean over seeds of `metric` on val
    (columns variant, setting, value). Ties: the first setting in the table's order."""
    chosen = {}
    for variant, g in val.groupby("variant", sort=False):
        means = g.groupby("setting", sort=False)["value"].mean()
        chosen[variant] = means.idxmin() if metric in LOWER_IS_BETTER else means.idxmax()
    return chosen
