"""The report's figures: paired differences with their corrected intervals, and training curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .report_page import _name, level_text
from .report_tables import BASELINE, LOWER_IS_BETTER, PREFIXES, ROW_KEYS, SUBJECT, inferential


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


def curve_styles(variants: list[str], avoid: tuple[str, ...] = ()) -> dict[str, dict]:
    """A distinct (colour, linestyle) per variant, transfer thick and black: 10 colours (less those named
    in avoid) x 4 styles, and a marker each (a run of one step is a point, not a line)."""
    import matplotlib
    from matplotlib.colors import same_color

    palette = [c for c in matplotlib.colormaps["tab10"].colors if not any(same_color(c, a) for a in avoid)]
    out, i = {}, 0
    for v in variants:
        if v == SUBJECT:
            out[v] = {"color": "black", "linestyle": "-", "lw": 2.4, "marker": "o"}
            continue
        out[v] = {"color": palette[i % len(palette)], "linestyle": LINESTYLES[(i // len(palette)) % 4], "lw": 1.2,
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


REFERENCE_LINES = {"chance": ("tab:gray", ":"), "vanilla": ("black", "--"), "oracle": ("tab:green", "-."),
                   "teacher": ("tab:blue", "-")}
DOSE_REFERENCES = ("chance", "vanilla", "teacher")  # the oracle is a curve of the dose panel itself


def endpoint_figure(panels: list[tuple[str, str, list[dict]]], doses: list[tuple[str, str, pd.DataFrame]]):
    """report.png's Figure, the first screen's figure: per endpoint task (panels: title, metric,
    report_glance rows), each arm's per-unit values as dots, its mean and corrected interval, and vertical
    lines at chance, the untrained student (vanilla), the oracle and the teacher; beside each, where the
    runs were scored at several step counts (doses, one per panel: title, metric, report_glance
    dose_response rows; empty where not), the dose-response: every variant's mean over units per step
    count with its 95% interval, and the panel's chance, vanilla and teacher as horizontal lines. Each
    legend sits outside its axes, so that it covers no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + any(not dose.empty for _, _, dose in doses)
    height = max([3.5] + [0.35 * len(rows) + 2.2 for _, _, rows in panels])
    fig, axes = plt.subplots(max(1, len(panels)), cols, figsize=(7.5 * cols, height * max(1, len(panels))),
                             squeeze=False, layout="constrained")
    for (title, metric, rows), ax in zip(panels, axes[:, 0]):
        _endpoint_panel(ax, rows, metric)
        ax.set_title(f"{title}: every arm at the endpoint", fontsize=9)
    by_title = {title: rows for title, _, rows in panels}
    for (title, metric, dose), ax in zip(doses, axes[:, 1] if cols == 2 else []):
        if dose.empty:
            ax.remove()
            continue
        _dose_panel(ax, dose, metric, by_title.get(title, []))
        ax.set_title(f"{title}: dose-response", fontsize=9)
    if not panels:
        fig.text(0.5, 0.5, "no run on the endpoint to draw", ha="center")
    return fig


def endpoint_chart(panels: list[tuple[str, str, list[dict]]], doses: list[tuple[str, str, pd.DataFrame]],
                   path: str | Path) -> Path:
    """endpoint_figure, written to path (report.png)."""
    import matplotlib.pyplot as plt

    fig = endpoint_figure(panels, doses)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _dose_panel(ax, dose: pd.DataFrame, metric: str, rows: list[dict]) -> None:
    """Every variant's mean per step count (log2 axis, ticks at the step counts) with its interval as
    error bars, the variants nudged apart along x so that their bars do not hide each other; chance,
    the untrained student and the teacher (the endpoint panel's rows) as horizontal lines."""
    # the legend lists the variants top to bottom as their curves end at the largest step count
    last = dose.sort_values("steps").groupby("variant", sort=False)["mean"].last()
    variants = list(last.sort_values(ascending=False, kind="stable").index)
    # the reference lines' colours are theirs alone; the oracle keeps its endpoint panel's colour
    oracle = REFERENCE_LINES["oracle"][0]
    styles = curve_styles(variants, avoid=tuple(REFERENCE_LINES[a][0] for a in DOSE_REFERENCES) + (oracle,))
    if "oracle" in styles:
        styles["oracle"] = {**styles["oracle"], "color": oracle}
    nudge = np.linspace(-0.12, 0.12, len(variants)) if len(variants) > 1 else [0.0]
    for v, shift in zip(variants, nudge):
        g = dose[dose["variant"] == v].sort_values("steps")
        x = g["steps"].to_numpy(float) * 2.0 ** shift
        y = g["mean"].to_numpy(float)
        lo = g["lo"].to_numpy(float) if "lo" in g else np.full_like(y, np.nan)
        hi = g["hi"].to_numpy(float) if "hi" in g else np.full_like(y, np.nan)
        err = np.vstack([np.where(np.isnan(lo), 0, y - lo), np.where(np.isnan(hi), 0, hi - y)])
        st = styles[v]
        ax.errorbar(x, y, yerr=err, label=v, color=st["color"], linestyle=st["linestyle"], lw=st["lw"],
                    marker=st["marker"], ms=4, capsize=2, elinewidth=0.8, zorder=3 if v == SUBJECT else 2)
    for arm in DOSE_REFERENCES:
        ref = next((r for r in rows if r["arm"] == arm), None)
        if ref is not None:
            color, style = REFERENCE_LINES[arm]
            ax.axhline(ref["mean"], color=color, linestyle=style, lw=1, label=f"{arm} {ref['mean']:.3f}")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(dose["steps"]))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("optimizer steps (checkpoints of one training run)", fontsize=8)
    over = f"{int(dose['n'].max())} {dose['unit'].iloc[0]}" if {"n", "unit"} <= set(dose) else "units"
    ax.set_ylabel(f"{metric}, mean over {over}; bar: 95% t-interval", fontsize=8)
    ax.tick_params(labelsize=7)
    handles, labels = ax.get_legend_handles_labels()  # the variants first, in their order, then the lines
    order = sorted(range(len(labels)), key=lambda i: variants.index(labels[i]) if labels[i] in variants
                   else len(variants) + i)
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)


def _endpoint_panel(ax, rows: list[dict], metric: str) -> None:
    """One row per arm: dots per unit (family or seed), the mean, its corrected interval (thick)."""
    shown = [r for r in rows if r["arm"] != "chance"]
    y = np.arange(len(shown))[::-1]
    jitter = np.random.default_rng(0)
    for yi, r in zip(y, shown):
        color = "tab:orange" if r["arm"] == SUBJECT else "tab:gray" if r["inert"] else "k"
        units = r["units"].to_numpy(float)
        ax.plot(units, yi + jitter.uniform(-0.15, 0.15, units.size), "o", color=color, alpha=0.35, ms=3)
        if not r["inert"] and not pd.isna(r.get("lo", np.nan)):
            ax.plot([r["lo"], r["hi"]], [yi, yi], color=color, lw=3, alpha=0.7)
        ax.plot([r["mean"]], [yi], "D", color=color, ms=5)
    for arm, (color, style) in REFERENCE_LINES.items():
        ref = next((r for r in rows if r["arm"] == arm), None)
        if ref is not None:
            ax.axvline(ref["mean"], color=color, linestyle=style, lw=1, label=f"{arm} {ref['mean']:.3f}")
    level = rows[0]["level"] if rows else 0.95
    ax.set_yticks(y, [r["arm"] + (" (inert)" if r["inert"] else "") for r in shown], fontsize=7)
    ax.set_xlabel(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better); dots: units, "
                  f"◆ mean, bar: interval at {level_text(level)} (Bonferroni)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    if ax.get_legend_handles_labels()[0]:  # beside the axes, where no data is drawn
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
