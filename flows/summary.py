"""What a flow run publishes in the Prefect UI: a markdown summary and a score table, on the run
the user triggered, under keys that name the flow and (for a sweep) its config."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pkt.artifacts.store import Store
from pkt.core import report


def artifact_key(title: str, tag: str | None, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    parts = ["pkt", title, *([tag] if tag else []), what]
    return "-".join(p.lower().replace("_", "-") for p in parts)


def ui_table(summary: pd.DataFrame) -> list[dict]:
    """The score table as a person reads it in the UI: variant and metric first, short names, 4 decimals."""
    t = summary.assign(student=summary["student"].map(lambda s: Path(str(s)).name))
    first = ["variant", "metric", "mean", "std", "n", "diff", "ci_low", "ci_high", "p_t", "p_adj", "verdict",
             "transfer_diff", "transfer_ci_low", "transfer_ci_high", "transfer_p_t", "transfer_p_adj", "transfer_verdict",
             "top_sv", "top_sv_ratio", "task", "benchmark", "student"]
    t = t[[c for c in first if c in t] + [c for c in t if c not in first]]
    return json.loads(t.round(4).to_json(orient="records"))


def nodes_markdown(store: Store, results: list[dict]) -> str:
    lines = ["| kind | key | status | path |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | `{r['key'][:16]}` | {r['status']} | `{store.record_path(r['kind'], r['key'])}` |"
              for r in results]
    return "\n".join(lines)


def publish(store: Store, title: str, results: list[dict], *, tag: str | None = None, plans: dict | None = None,
            summary: pd.DataFrame | None = None, paths: dict | None = None, headlines: list[str] | None = None,
            notes: list[str] | None = None) -> None:
    computed = sum(r["status"] == "computed" for r in results)
    md = [f"# pkt {title}" + (f" ({tag})" if tag else ""), "",
          f"Store: `{store.root.resolve()}`; {computed} computed, {len(results) - computed} reused.", ""]
    md += [f"- {line.strip()}" for line in (notes or []) + (headlines or [])]
    for student, layers in (plans or {}).items():
        md.append(f"- layer plan for `{Path(student).name}`: teacher layers {layers}")
    if summary is not None:
        md += ["", report.markdown(summary)]
        create_table_artifact(key=artifact_key(title, tag, "scores"), table=ui_table(summary),
                              description="pkt scores: mean, std, variant - lora and transfer - variant with "
                                          "95% CI, t-test p and its Holm/BH-adjusted p")
    if paths:
        md += ["", *(f"- {k}: `{Path(v).resolve()}`" for k, v in paths.items())]
    md += ["", "## Nodes", "", nodes_markdown(store, results)]
    create_markdown_artifact(key=artifact_key(title, tag, "summary"), markdown="\n".join(md),
                             description=f"pkt {title} summary")
