"""The report's markdown: number formats, the per-comparison tables and the overview."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .report_tables import FIXED, POOLED, ROW_KEYS


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
            f"{r[prefix + 'ci_high_adj']:+.4f}] at {level_text(r[prefix + 'level'])}")


def level_text(level: float) -> str:
    """A corrected interval's level as a percentage with the digits that keep it readable: enough that
    its distance from 100% shows (BH's 1 − 2·0.05/277 is 99.96%, not 100.0%), one decimal at least."""
    if pd.isna(level):
        return "n/a"
    miss = round((1 - float(level)) * 100, 10)  # in percent (rounded: 1 - 0.9999 is not 0.01 in floats)
    digits = max(1, int(np.ceil(-np.log10(miss)))) if miss > 0 else 1
    return f"{float(level) * 100:.{digits}f}%"


_NAN_CI = re.compile(r"[+-]?nan \[[+-]?nan, [+-]?nan\]|\[[+-]?nan, [+-]?nan\]")
_NAN = re.compile(r"(?<![\w.])[+-]?nan%?(?!\w)")


def dashes(text: str) -> str:
    """Text a person reads with every undefined number as '-': a formatted NaN (nan, +nan, nan%, an
    interval of them) says nothing a reader can use."""
    return _NAN.sub("-", _NAN_CI.sub("-", text))


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
    return (f"Δ {_ci(r, prefix, adj=True)} at {level_text(r[prefix + 'level'])}, "
            f"{r[prefix + 'test'].split(' (')[0]}-adjusted "
            f"p = {r[prefix + 'p_adj']:.3f}")


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
