"""What a flow run publishes in the Prefect UI: a markdown summary, a score table and a node table, on
the run the user triggered, under keys that name the flow and (for a sweep) its config.

The markdown fits a ~1k px pane: per metric a compact table with the verdicts first; the full table
(every interval and p-value) is report.md's, and the nodes are a table artifact of their own."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pkt.artifacts.store import Store
from pkt.core import report

FIRST_COLUMNS = ["variant", "metric", "verdict", "transfer_verdict", "mean", "std", "n", "diff", "ci_low", "ci_high",
                 "p_t", "p_adj", "transfer_diff", "transfer_ci_low", "transfer_ci_high", "transfer_p_t",
                 "transfer_p_adj", "top_sv", "top_sv_ratio", "task", "benchmark", "student"]


def lead_metric(summary: pd.DataFrame, primary: str) -> tuple[str, list[str]]:
    """The metric a table and its headlines show first: the primary one, unless every variant scores the
    same on it (the test family's exact match is 0 for every run: it cannot add) while the answer NLL
    moves; then the NLL, with a line that says so."""
    def flat(metric: str) -> bool:
        return summary.loc[summary["metric"] == metric, "mean"].round(12).nunique() <= 1

    metrics = set(summary["metric"])
    if primary != "answer_nll" and primary in metrics and flat(primary) and "answer_nll" in metrics \
            and not flat("answer_nll"):
        value = summary.loc[summary["metric"] == primary, "mean"].iloc[0]
        return "answer_nll", [f"{primary} is {value:.4f} for every variant, so it cannot tell them apart here; "
                              "answer_nll (the answer's negative log-likelihood, lower is better) moves and is "
                              "shown first"]
    return primary, []


def artifact_key(title: str, tag: str | None, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    parts = ["pkt", title, *([tag] if tag else []), what]
    return "-".join(p.lower().replace("_", "-") for p in parts)


def _cell(x):
    """A cell as a person reads it: 4 decimals, an undefined number as '-' (never NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return round(x, 4) if isinstance(x, float) else x


def ui_table(summary: pd.DataFrame) -> list[dict]:
    """The score table as a person reads it in the UI: variant, metric and the verdicts first, short
    names, 4 decimals, '-' where a number is undefined."""
    t = summary.assign(student=summary["student"].map(lambda s: Path(str(s)).name))
    t = t[[c for c in FIRST_COLUMNS if c in t] + [c for c in t if c not in FIRST_COLUMNS]]
    rows = json.loads(t.to_json(orient="records"))  # plain Python numbers (None for NaN)
    return [{k: _cell(v) for k, v in row.items()} for row in rows]


def nodes_table(store: Store, results: list[dict]) -> list[dict]:
    """One row per node of the run: kind, key (short), computed or reused, its record in the store."""
    return [{"kind": r["kind"], "key": r["key"][:16], "status": r["status"],
             "record": str(store.record_path(r["kind"], r["key"]))} for r in results]


def _verdict(text) -> str:
    """A verdict in a narrow column (its header names the other variant): 'better than lora' -> 'better',
    'not distinguishable from lora (corrected interval includes 0)' -> 'not distinguishable'."""
    if not isinstance(text, str) or not text:
        return "-"
    return text.split(" (")[0].split(" than ")[0].split(" from ")[0]


def _mean(r: pd.Series) -> str:
    return "-" if pd.isna(r["mean"]) else f"{r['mean']:.4f}" + ("" if pd.isna(r["std"]) else f" ± {r['std']:.4f}")


def _diff(r: pd.Series, prefix: str = "") -> str:
    d, lo, hi = (r.get(prefix + c) for c in ("diff", "ci_low", "ci_high"))
    if d is None or pd.isna(d):
        return "-"
    return f"{d:+.4f}" + ("" if lo is None or pd.isna(lo) else f" [{lo:+.3f}, {hi:+.3f}]")


def compact_markdown(summary: pd.DataFrame) -> str:
    """Per student, task and metric: variant, the two verdicts, mean ± std and the two paired
    differences with their 95% intervals (report.md has the p-values and corrected intervals)."""
    out = []
    for (student, task, metric), g in summary.groupby(["student", "task", "metric"], sort=False):
        out += [f"### {Path(str(student)).name} · {task} · {metric}", "",
                "| variant | vs lora | transfer vs it | mean ± std | Δ vs lora [95% CI] | transfer − it |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {_verdict(r.get('verdict'))} | {_verdict(r.get('transfer_verdict'))} | "
                f"{_mean(r)} | {_diff(r)} | {_diff(r, 'transfer_')} |" for _, r in g.iterrows()]
        out.append("")
    return "\n".join(out)


def summary_markdown(store: Store, title: str, results: list[dict], *, tag: str | None = None,
                     plans: dict | None = None, summary: pd.DataFrame | None = None, paths: dict | None = None,
                     headlines: list[str] | None = None, notes: list[str] | None = None) -> str:
    computed = sum(r["status"] == "computed" for r in results)
    md = [f"# pkt {title}" + (f" ({tag})" if tag else ""), "",
          f"Store: `{store.root.resolve()}`; {computed} computed, {len(results) - computed} reused "
          f"(the nodes: table artifact `{artifact_key(title, tag, 'nodes')}`).", ""]
    md += [f"- {line.strip()}" for line in (notes or []) + (headlines or [])]
    for student, layers in (plans or {}).items():
        md.append(f"- layer plan for `{Path(student).name}`: teacher layers {layers}")
    if summary is not None:
        md += ["", compact_markdown(summary), "Every interval, p-value and correction: report.md below."]
    if paths:
        md += ["", *(f"- {k}: `{Path(v).resolve()}`" for k, v in paths.items())]
    return report.dashes("\n".join(md))


def publish(store: Store, title: str, results: list[dict], *, tag: str | None = None, plans: dict | None = None,
            summary: pd.DataFrame | None = None, paths: dict | None = None, headlines: list[str] | None = None,
            notes: list[str] | None = None) -> None:
    if summary is not None:
        create_table_artifact(key=artifact_key(title, tag, "scores"), table=ui_table(summary),
                              description="pkt scores: verdicts, mean, std, variant - lora and transfer - variant "
                                          "with 95% CI, t-test p and its Holm/BH-adjusted p")
    create_table_artifact(key=artifact_key(title, tag, "nodes"), table=nodes_table(store, results),
                          description=f"pkt {title}: every node of this run, computed or reused")
    create_markdown_artifact(key=artifact_key(title, tag, "summary"), description=f"pkt {title} summary",
                             markdown=summary_markdown(store, title, results, tag=tag, plans=plans, summary=summary,
                                                       paths=paths, headlines=headlines, notes=notes))
