"""The paper-style table: mean +- std over seeds per student x benchmark x variant, and paired
inference against every comparison that carries a verdict: each variant minus standard LoRA, and
transfer minus each other variant. Each difference has its 95% t-interval and, beside it, an exact
paired sign-flip permutation p-value. Wording never claims a difference whose interval includes zero.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

BASELINE = "lora"
SUBJECT = "transfer"
DETERMINISTIC = {"vanilla"}  # no training, one run: compared as a fixed value, not paired by seed
NOT_CONTROLS = {SUBJECT, BASELINE, *DETERMINISTIC}  # what the headline's "controls" leave out
SIZE_CONTROLS = ("spectrum-matched", "shuffled", "untrained-teacher")  # same size or source, no knowledge
AT_SUBJECT = "@transfer-setting"  # a control also run at transfer's chosen setting (matched size)
LOWER_IS_BETTER = {"answer_nll"}
ROW_KEYS = ["student", "task", "benchmark", "metric", "variant"]
EXACT_MAX = 16  # sign-flip: all 2^n patterns up to n = 16, Monte Carlo above
PAIRED, FIXED = "paired by seed", "one-sample vs its single run"


def paired_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval; nan bounds below 2 pairs."""
    diffs = np.asarray(diffs, dtype=float)
    mean = float(diffs.mean()) if diffs.size else float("nan")
    if diffs.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, diffs.size - 1) * diffs.std(ddof=1) / np.sqrt(diffs.size)
    return mean, mean - half, mean + half


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
    """The subject against `other`, from the interval of (subject - other)."""
    if np.isnan(lo):
        return "n/a (fewer than 2 paired seeds)"
    better_if_positive = metric not in LOWER_IS_BETTER
    if lo > 0:
        return f"better than {other}" if better_if_positive else f"worse than {other}"
    if hi < 0:
        return f"worse than {other}" if better_if_positive else f"better than {other}"
    return f"not distinguishable from {other} (interval includes 0)"


def compare(a: pd.DataFrame, b: pd.DataFrame, a_name: str, b_name: str, metric: str) -> dict:
    """a - b over the runs of two variants (columns seed, value): paired by seed, or, when one side
    is a deterministic single run (vanilla), every run of the other against that one value."""
    if b_name in DETERMINISTIC and len(b) == 1:
        diffs, pairing = a["value"].to_numpy(float) - float(b["value"].iloc[0]), FIXED
    elif a_name in DETERMINISTIC and len(a) == 1:
        diffs, pairing = float(a["value"].iloc[0]) - b["value"].to_numpy(float), FIXED
    else:
        paired = a[["seed", "value"]].merge(b[["seed", "value"]], on="seed", suffixes=("", "_b"))
        diffs, pairing = (paired["value"] - paired["value_b"]).to_numpy(float), PAIRED
    mean, lo, hi = paired_interval(diffs)
    return {"diff": mean, "ci_low": lo, "ci_high": hi, "p_perm": sign_flip_p(diffs), "pairs": diffs.size,
            "pairing": pairing, "verdict": verdict(metric, lo, hi, b_name)}


COMPARISON_COLUMNS = ["diff", "ci_low", "ci_high", "p_perm", "pairs", "pairing", "verdict"]
TRANSFER_COLUMNS = [f"transfer_{c}" for c in COMPARISON_COLUMNS]


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """scores: one row per run with ROW_KEYS + seed + value (+ top_sv, top_sv_ratio). One row per
    group with mean/std/n, the variant minus lora (diff, ci_low, ci_high, p_perm, pairs, pairing,
    verdict) and transfer minus the variant (the same names prefixed transfer_)."""
    out = []
    for keys, g in scores.groupby(ROW_KEYS, sort=False):
        row = dict(zip(ROW_KEYS, keys))
        v = g["value"].to_numpy(dtype=float)
        row.update(mean=v.mean(), std=v.std(ddof=1) if v.size > 1 else float("nan"), n=v.size)
        for col in ("top_sv", "top_sv_ratio"):
            if col in g and g[col].notna().any():
                row[col] = float(g[col].mean())
        group = scores[(scores[ROW_KEYS[:4]] == pd.Series(keys[:4], ROW_KEYS[:4])).all(axis=1)]
        variant, metric = keys[4], keys[3]
        base = group[group["variant"] == BASELINE]
        if variant != BASELINE and not base.empty:
            row.update(compare(g, base, variant, BASELINE, metric))
        subject = group[group["variant"] == SUBJECT]
        if variant != SUBJECT and not subject.empty:
            row.update({f"transfer_{k}": x for k, x in compare(subject, g, SUBJECT, variant, metric).items()})
        out.append(row)
    return pd.DataFrame(out)


def _ci(r: pd.Series, prefix: str = "") -> str:
    if pd.isna(r.get(prefix + "diff")):
        return ""
    if pd.isna(r.get(prefix + "ci_low")):
        return f"{r[prefix + 'diff']:+.4f} [n/a]"
    return f"{r[prefix + 'diff']:+.4f} [{r[prefix + 'ci_low']:+.4f}, {r[prefix + 'ci_high']:+.4f}]"


def _p(r: pd.Series, prefix: str = "") -> str:
    p = r.get(prefix + "p_perm")
    if p is None or pd.isna(p):
        return ""
    return f"{p:.3f}" + ("*" if r.get(prefix + "pairing") == FIXED else "")


def _cell(r: pd.Series, col: str) -> str:
    x = r.get(col)
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)


def _size(r: pd.Series) -> str:
    sv = r.get("top_sv")
    if sv is None or pd.isna(sv):
        return ""
    ratio = r.get("top_sv_ratio")
    return f"{sv:.3f}" + ("" if ratio is None or pd.isna(ratio) else f" ({ratio:.2f}×)")


TABLE_NOTE = ("Δ: paired difference over training seeds with its 95% t-interval; p: exact two-sided paired "
              "sign-flip permutation p-value (all 2^n sign patterns; it cannot go below 2/2^n, 0.25 at n = 3, "
              "0.0625 at n = 5); * marks a comparison with vanilla, which is one deterministic run, so the "
              "interval is one-sample (the other variant's runs minus that single value), not paired. "
              "A verdict says better/worse only when the interval excludes 0. init σ₁: the effective top "
              "singular value of the init's applied delta (alpha/r included), mean over modules, and in "
              "brackets its ratio to the student's own weight's top singular value for the same module.")


def markdown(summary: pd.DataFrame) -> str:
    lines = []
    for (student, task, bench, metric), g in summary.groupby(ROW_KEYS[:4], sort=False):
        lines += [f"### {Path(str(student)).name} · {task} · {bench} · {metric}", "",
                  "| variant | mean ± std | n | init σ₁ (× student σ₁) | Δ vs lora [95% CI] | p | verdict vs lora "
                  "| transfer − variant [95% CI] | p | transfer vs variant |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            std = "" if pd.isna(r["std"]) else f" ± {r['std']:.4f}"
            lines.append(f"| {r['variant']} | {r['mean']:.4f}{std} | {r['n']} | {_size(r)} | {_ci(r)} | {_p(r)} | "
                         f"{_cell(r, 'verdict')} | {_ci(r, 'transfer_')} | {_p(r, 'transfer_')} | "
                         f"{_cell(r, 'transfer_verdict')} |")
        lines.append("")
    return "\n".join(lines + [TABLE_NOTE, ""])


def _ci_text(r: pd.Series, prefix: str = "") -> str:
    text = f"Δ {_ci(r, prefix)}"
    p = _p(r, prefix)
    return text + (f", p = {p}" if p else "")


def headline(summary: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences: did transfer beat lora, and which controls did it beat, on this run? A control
    counts as beaten only when the 95% interval of transfer minus it excludes zero."""
    out = []
    rows = summary[summary["metric"] == metric]
    for (student, task), g in rows.groupby(["student", "task"], sort=False):
        by = g.set_index("variant")
        if SUBJECT not in by.index:
            continue
        t = by.loc[SUBJECT]
        head = f"{Path(str(student)).name} / {task} / {metric}: transfer {t['mean']:.4f}"
        if BASELINE in by.index:
            out.append(f"{head} vs lora {by.loc[BASELINE, 'mean']:.4f} — {t['verdict']} ({_ci_text(t)})")
        else:
            out.append(f"{head} (this sweep has no lora baseline to compare with)")
        controls = [v for v in by.index if v not in NOT_CONTROLS and AT_SUBJECT not in v]
        if controls:
            out.append("  " + _control_sentence(by, controls, metric))
        for v in (v for v in by.index if v in DETERMINISTIC):
            out.append(f"  vs {v} (one deterministic run, one-sample interval): {by.loc[v, 'transfer_verdict']} "
                       f"({_ci_text(by.loc[v], 'transfer_')})")
    return out


def _control_sentence(by: pd.DataFrame, controls: list[str], metric: str) -> str:
    beaten, lost, tied = [], [], []
    for v in controls:
        verdict_text = str(by.loc[v, "transfer_verdict"])
        (beaten if verdict_text.startswith("better") else lost if verdict_text.startswith("worse") else tied).append(v)
    parts = [f"transfer beats {len(beaten)} of {len(controls)} controls (95% interval of the paired difference "
             f"excludes 0)" + (f": {', '.join(beaten)}" if beaten else "")]
    if tied:
        parts.append("not distinguishable from " + ", ".join(tied))
    if lost:
        parts.append("worse than " + ", ".join(lost))
    return "; ".join(parts)


def knowledge_vs_size(summary: pd.DataFrame, metric: str) -> list[str]:
    """Transfer against the controls that keep its size but not its knowledge (spectrum-matched and
    shuffled: the same singular values; untrained-teacher: the same extraction from a teacher that
    learned nothing), each at transfer's own training setting where the sweep ran it there."""
    out = []
    rows = summary[summary["metric"] == metric]
    for (student, task), g in rows.groupby(["student", "task"], sort=False):
        by = g.set_index("variant")
        if SUBJECT not in by.index:
            continue
        parts = []
        for c in SIZE_CONTROLS:
            name = c + AT_SUBJECT if c + AT_SUBJECT in by.index else c
            if name not in by.index:
                continue
            r = by.loc[name]
            parts.append(f"vs {c} ({_size(r) or 'size n/a'}): {r['transfer_verdict']} ({_ci_text(r, 'transfer_')})")
        if parts:
            out.append(f"{Path(str(student)).name} / {task} / {metric}: transfer's init "
                       f"({_size(by.loc[SUBJECT]) or 'size n/a'}, σ₁ and ratio to the student's) at its own "
                       f"setting — " + "; ".join(parts))
    return out


def select_settings(val: pd.DataFrame, metric: str) -> dict[str, str]:
    """Each variant's setting (a JSON string) with the best mean over seeds of `metric` on val
    (columns variant, setting, value). Ties: the first setting in the table's order."""
    chosen = {}
    for variant, g in val.groupby("variant", sort=False):
        means = g.groupby("setting", sort=False)["value"].mean()
        chosen[variant] = means.idxmin() if metric in LOWER_IS_BETTER else means.idxmax()
    return chosen


def curves_chart(curves: pd.DataFrame, path: str | Path) -> Path:
    """Training loss per optimizer step, mean over seeds per variant (shaded: min..max over seeds),
    one panel per student x task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(curves.groupby(["student", "task"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5, 5 * len(groups)), 4), squeeze=False)
    for ax, ((student, task), g) in zip(axes[0], groups):
        for variant, v in g.groupby("variant", sort=False):
            by_step = v.groupby("step")["loss"]
            mean = by_step.mean()
            style = {"lw": 2.2, "color": "tab:orange"} if variant == SUBJECT else {"lw": 1}
            ax.plot(mean.index, mean.values, label=variant, **style)
            ax.fill_between(mean.index, by_step.min().values, by_step.max().values, alpha=0.12,
                            color=style.get("color"))
        ax.set_title(f"{Path(str(student)).name} · {task}", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("training loss (answer tokens)", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _forest(ax, g: pd.DataFrame, prefix: str, label: str) -> None:
    """Paired differences with their 95% intervals, one line per comparison; grey when it spans 0."""
    rows = g[g[prefix + "diff"].notna()] if prefix + "diff" in g else g.iloc[:0]
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        lo, hi = r[prefix + "ci_low"], r[prefix + "ci_high"]
        clear = not pd.isna(lo) and (lo > 0 or hi < 0)
        color = "tab:orange" if clear else "tab:gray"
        if not pd.isna(lo):
            ax.plot([lo, hi], [yi, yi], color=color, lw=2)
        ax.plot([r[prefix + "diff"]], [yi], "o", color=color)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{label.format(v=r['variant'])}" for _, r in rows.iterrows()], fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def bar_chart(summary: pd.DataFrame, path: str | Path) -> Path:
    """Per group: means ± std, then variant − lora and transfer − variant with 95% intervals
    (orange: the interval excludes 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.groupby(ROW_KEYS[:4], sort=False))
    fig, axes = plt.subplots(3, len(groups), figsize=(max(5, 4.8 * len(groups)), 11), squeeze=False)
    for col, (keys, g) in enumerate(groups):
        ax = axes[0][col]
        ax.bar(g["variant"], g["mean"], yerr=g["std"].fillna(0), capsize=3,
               color=["tab:orange" if v == SUBJECT else "tab:blue" if v == BASELINE else "tab:gray"
                      for v in g["variant"]])
        ax.set_title(f"{keys[1]} · {keys[3]}", fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        _forest(axes[1][col], g, "", "{v} − lora")
        axes[1][col].set_title("variant − lora, 95% CI", fontsize=8)
        _forest(axes[2][col], g, "transfer_", "transfer − {v}")
        axes[2][col].set_title("transfer − variant, 95% CI", fontsize=8)
    fig.suptitle("pkt: mean ± std over seeds; paired differences (orange: interval excludes 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def headlines(summary: pd.DataFrame, primary: str) -> list[str]:
    """Headline sentences for the primary metric and, where measured, the answer NLL."""
    return [line for m in _metrics(summary, primary) for line in headline(summary, m)]


REPORT_FILES = {"markdown": "report.md", "csv": "summary.csv", "runs": "runs.csv", "chart": "report.png",
                "curves": "curves.csv", "curves_chart": "curves.png"}


def write_report(scores: pd.DataFrame, out_dir: str | Path, primary: str,
                 curves: pd.DataFrame | None = None) -> dict[str, Path]:
    """report.md, summary.csv, runs.csv, report.png; with training curves also curves.csv and curves.png."""
    names = REPORT_FILES if curves is not None and not curves.empty else \
        {k: v for k, v in REPORT_FILES.items() if not k.startswith("curves")}
    paths = {name: Path(out_dir) / f for name, f in names.items()}
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(scores)
    scores.to_csv(paths["runs"], index=False)
    summary.to_csv(paths["csv"], index=False)
    text = "# pkt report\n\n" + "\n".join(f"- {h}" for h in headlines(summary, primary)) + "\n\n"
    size = [line for m in _metrics(summary, primary) for line in knowledge_vs_size(summary, m)]
    if size:
        text += ("## Knowledge vs size\n\nTransfer against inits of the same size without the teacher's knowledge "
                 "(spectrum-matched, shuffled: its singular values exactly; untrained-teacher: the same extraction "
                 "from a teacher that learned nothing), at transfer's own lr and scale.\n\n"
                 + "\n".join(f"- {line}" for line in size) + "\n\n")
    views = [view for m in _metrics(summary, primary) if (view := overview(summary, m))]
    text += ("## Overview\n\nMean over seeds; T−X: transfer minus the row's variant, paired by seed, with its "
             "95% interval (▲ transfer better, ▼ worse, unmarked: not distinguishable).\n\n"
             + "\n\n".join(views) + "\n\n## Every comparison\n\n")
    paths["markdown"].write_text(text + markdown(summary))
    bar_chart(summary, paths["chart"])
    if "curves" in paths:
        curves.to_csv(paths["curves"], index=False)
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
    """One row per variant, one column per student x task: the mean over seeds, then transfer minus
    that variant with its 95% interval, marked ▲ (transfer better: the interval excludes 0), ▼
    (transfer worse) or nothing (not distinguishable)."""
    rows = summary[summary["metric"] == metric]
    if rows.empty:
        return ""
    cols = list(dict.fromkeys(zip(rows["student"], rows["task"])))
    head = [f"{Path(str(st)).name} · {t}" for st, t in cols]
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


def read_csv(path: str | Path) -> pd.DataFrame:
    """A runs or summary table as written above (empty cells are missing values, nothing else is)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


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
