"""The paper-style table: mean +- std over seeds per student x benchmark x variant, and the paired
difference to the standard-LoRA baseline with a 95% t-interval. Wording never claims a gain whose
interval includes zero.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

BASELINE = "lora"
LOWER_IS_BETTER = {"answer_nll"}
ROW_KEYS = ["student", "task", "benchmark", "metric", "variant"]


def paired_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval; nan bounds below 2 pairs."""
    diffs = np.asarray(diffs, dtype=float)
    mean = float(diffs.mean()) if diffs.size else float("nan")
    if diffs.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, diffs.size - 1) * diffs.std(ddof=1) / np.sqrt(diffs.size)
    return mean, mean - half, mean + half


def verdict(metric: str, lo: float, hi: float) -> str:
    if np.isnan(lo):
        return "n/a (fewer than 2 paired seeds)"
    better_if_positive = metric not in LOWER_IS_BETTER
    if lo > 0:
        return "better than lora" if better_if_positive else "worse than lora"
    if hi < 0:
        return "worse than lora" if better_if_positive else "better than lora"
    return "no clear difference (interval includes 0)"


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """scores: one row per run with ROW_KEYS + seed + value (+ top_sv). Returns one row per group."""
    out = []
    for keys, g in scores.groupby(ROW_KEYS, sort=False):
        row = dict(zip(ROW_KEYS, keys))
        v = g["value"].to_numpy(dtype=float)
        row.update(mean=v.mean(), std=v.std(ddof=1) if v.size > 1 else float("nan"), n=v.size)
        if "top_sv" in g and g["top_sv"].notna().any():
            row["top_sv"] = float(g["top_sv"].mean())
        base = scores[(scores[ROW_KEYS[:4]] == pd.Series(keys[:4], ROW_KEYS[:4])).all(axis=1)
                      & (scores["variant"] == BASELINE)]
        if keys[4] != BASELINE and not base.empty:
            paired = g.merge(base[["seed", "value"]], on="seed", suffixes=("", "_base"))
            mean, lo, hi = paired_interval(paired["value"] - paired["value_base"])
            row.update(diff=mean, ci_low=lo, ci_high=hi, verdict=verdict(keys[3], lo, hi))
        out.append(row)
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame) -> str:
    lines = []
    for (student, task, bench, metric), g in summary.groupby(ROW_KEYS[:4], sort=False):
        lines += [f"### {Path(str(student)).name} · {task} · {bench} · {metric}", "",
                  "| variant | mean ± std | n | Δ vs lora [95% CI] | verdict | init top σ |", "|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            diff = "" if pd.isna(r.get("diff")) else f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            sv = "" if pd.isna(r.get("top_sv", np.nan)) else f"{r['top_sv']:.3f}"
            std = "" if pd.isna(r["std"]) else f" ± {r['std']:.4f}"
            lines.append(f"| {r['variant']} | {r['mean']:.4f}{std} | {r['n']} | {diff} | "
                         f"{'' if pd.isna(r.get('verdict')) else r['verdict']} | {sv} |")
        lines.append("")
    return "\n".join(lines)


def headline(summary: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences: did transfer beat lora, and did it beat each control, on this run?"""
    out = []
    rows = summary[summary["metric"] == metric]
    for (student, task), g in rows.groupby(["student", "task"], sort=False):
        by = g.set_index("variant")
        if "transfer" not in by.index:
            continue
        t = by.loc["transfer"]
        sign = -1 if metric in LOWER_IS_BETTER else 1
        vs = (f" vs lora {by.loc[BASELINE, 'mean']:.4f}" if BASELINE in by.index
              else " (this sweep has no lora baseline to compare with)")
        verdict_text = f" — {t['verdict']}" if "verdict" in t and not pd.isna(t["verdict"]) else ""
        out.append(f"{Path(str(student)).name} / {task} / {metric}: transfer {t['mean']:.4f}{vs}{verdict_text}")
        controls = [v for v in by.index if v not in ("transfer", "lora", "vanilla")]
        beaten = [v for v in controls if sign * (t["mean"] - by.loc[v, "mean"]) > 0]
        if controls:
            out.append(f"  transfer's mean is better than {len(beaten)} of {len(controls)} controls"
                       + (f" (not: {', '.join(sorted(set(controls) - set(beaten)))})" if len(beaten) < len(controls) else ""))
    return out


def bar_chart(summary: pd.DataFrame, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.groupby(ROW_KEYS[:4], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5, 4.5 * len(groups)), 4), squeeze=False)
    for ax, (keys, g) in zip(axes[0], groups):
        ax.bar(g["variant"], g["mean"], yerr=g["std"].fillna(0), capsize=3,
               color=["tab:orange" if v == "transfer" else "tab:blue" if v == BASELINE else "tab:gray"
                      for v in g["variant"]])
        ax.set_title(f"{keys[1]} · {keys[3]}", fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.suptitle("pkt: mean ± std over seeds (orange: transfer, blue: lora)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def headlines(summary: pd.DataFrame, primary: str) -> list[str]:
    """Headline sentences for the primary metric and, where measured, the answer NLL."""
    metrics = [primary] + [m for m in LOWER_IS_BETTER if m != primary and m in set(summary["metric"])]
    return [line for m in metrics for line in headline(summary, m)]


REPORT_FILES = {"markdown": "report.md", "csv": "summary.csv", "runs": "runs.csv", "chart": "report.png"}


def write_report(scores: pd.DataFrame, out_dir: str | Path, primary: str) -> dict[str, Path]:
    paths = {name: Path(out_dir) / f for name, f in REPORT_FILES.items()}
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(scores)
    scores.to_csv(paths["runs"], index=False)
    summary.to_csv(paths["csv"], index=False)
    text = "# pkt report\n\n" + "\n".join(f"- {h}" for h in headlines(summary, primary)) + "\n\n" + markdown(summary)
    paths["markdown"].write_text(text)
    bar_chart(summary, paths["chart"])
    return paths


def read_csv(path: str | Path) -> pd.DataFrame:
    """A runs or summary table as written above (empty cells are missing values, nothing else is)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def choose_settings(runs: pd.DataFrame, primary: dict[str, str]) -> pd.DataFrame:
    """Test rows only, each (student, task, variant) at the training setting whose mean primary
    metric (primary: task -> metric) is best on the val split; the split column is dropped."""
    test = runs[runs["split"] == "test"]
    val = runs[runs["split"] == "val"]
    if val.empty:
        return test.drop(columns=["split"])
    keep = []
    for (student, task, variant), g in val.groupby(["student", "task", "variant"]):
        metric = primary[task]
        means = g[g["metric"] == metric].groupby("setting")["value"].mean()
        best = means.idxmin() if metric in LOWER_IS_BETTER else means.idxmax()
        keep.append((student, task, variant, best))
    chosen = pd.DataFrame(keep, columns=["student", "task", "variant", "setting"])
    return test.merge(chosen, on=["student", "task", "variant", "setting"]).drop(columns=["split"])
