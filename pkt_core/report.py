"""The report: what the data say, under the protocol declared before them.

A façade over its rooms, under the names callers have always used: report_tables (the statistics:
paired differences, families as units, Holm/BH-corrected verdicts), report_page (the markdown tables),
report_study (the endpoint, the sentences, the scale, the protocol, the diagnostic), report_glance (the
first screen: every arm on the endpoint, the positive controls) and report_figures (the charts). Here:
the report's files, written together, and the reading of a runs table.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pandas as pd

from . import inputs

from .report_figures import (  # noqa: F401 (re-exported)
    LINESTYLES, MARKERS, VERDICT_COLORS, _all_zero, _forest, _means, bar_chart, chart_panels, curve_styles,
    curves_chart, endpoint_chart, endpoint_figure)
from .report_glance import (  # noqa: F401 (re-exported)
    chance_of, dose_response, endpoint_scope, glance, glance_table, positive_control_lines)
from .report_page import (  # noqa: F401 (re-exported)
    HEADLINE_METRICS, TABLE_NOTE, _cell, dashes, _ci, _ci_text, _corrected, _metrics, _name, _overview_cell, _p, _size,
    level_text, markdown, overview)
from .report_study import (  # noqa: F401 (re-exported)
    _axes, _control_sentence, _group_grids, _item_tables, _natural, _power_line, _units, corrections_section,
    diagnostic_levels, diagnostic_section, edge_flags, endpoint_section, family_gates, gate_lines, grids_of,
    headline, headlines, knowledge_vs_size, protocol_section, scale_section, settings_table, size_match)
from .report_tables import (  # noqa: F401 (re-exported)
    ALPHA, BASELINE, COMPARISON_COLUMNS, DATA_ROUTE, DETERMINISTIC, EXACT_MAX, FIXED, INERT, LOWER_IS_BETTER,
    NOT_CONTROLS, PAIRED, POOLED, POSITIVE_CONTROLS, PREFIXES, ROW_KEYS, SIZE_CONTROLS, SIZE_TOLERANCE, SUBJECT,
    TRANSFER_COLUMNS, RunsTableError, _comparisons, _family_diffs, _mirror_transfer_minus_lora, _paired_diffs,
    _pooled_rows, _rescale, _row, _test,
    at_final_steps, check_runs, correct, inferential, is_primary, select_settings, sign_flip_p, summarize, verdict)


REPORT_FILES = {"markdown": "report.md", "csv": "summary.csv", "runs": "runs.csv", "chart": "report.png",
                "protocol": "protocol.json", "selection": "selection.csv", "items": "items.csv",
                "curves": "curves.csv", "curves_chart": "curves.png", "comparisons": "comparisons.md",
                "comparisons_chart": "comparisons.png"}


def write_report(scores: pd.DataFrame, out_dir: str | Path, primary: str, curves: pd.DataFrame | None = None, *,
                 selection: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
                 protocol: dict | None = None, dose: pd.DataFrame | None = None) -> dict[str, Path]:
    """report.md (one screen: every arm on the endpoint, then the endpoint's tests, the claims that
    survive correction, the scale, the protocol and the diagnostic), report.png (its figure),
    comparisons.md and comparisons.png (every comparison), summary.csv, runs.csv, protocol.json; with
    them also selection.csv (the val runs that chose the settings), items.csv (per-item test scores, for
    the bootstrap), curves.csv and curves.png (training losses). Runs scored at several step counts are
    tested at their largest (report_tables.at_final_steps); the others draw the dose-response. dose: the
    runs' scores at every checkpoint (a sweep's dose.csv: steps = the checkpoint), drawn as the
    dose-response instead of the scores' own step counts; it is not written here (the report node keeps
    it beside the report as given).

    protocol: endpoint (the declared primary endpoint: metric, tasks, comparisons [{subject, control}],
    alpha), grids (variant -> its settings), selection_seeds, test_seeds, select_on, scale (the
    caveat of the run's size, in words), families (name -> the family's stats, with its gates), chance
    ({metric: value}, the endpoint's chance level), laten ({until_moved, max_steps}: LaTen's stopping rule,
    printed where its grid's step is 0)."""
    protocol = dict(protocol or {})
    given = {"curves": curves, "selection": selection, "items": items}
    present = {k for k, t in given.items() if t is not None and not t.empty}
    names = {k: f for k, f in REPORT_FILES.items() if k.split("_")[0] not in given or k.split("_")[0] in present}
    paths = {name: Path(out_dir) / f for name, f in names.items()}
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    endpoint = protocol.get("endpoint")
    final = at_final_steps(scores)
    summary = summarize(final, endpoint)
    scores.to_csv(paths["runs"], index=False)
    summary.to_csv(paths["csv"], index=False)
    paths["protocol"].write_text(json.dumps(protocol, indent=1, sort_keys=True))
    for name in ("selection", "items", "curves"):
        if name in paths:
            given[name].to_csv(paths[name], index=False)
    metric, tasks = endpoint_scope(final, primary, endpoint)
    panels = [(f"{task} · {metric}", metric, glance(final, metric, task, chance_of(final, protocol, metric, task)))
              for task in tasks]
    dosed = dose if dose is not None and not dose.empty else scores
    doses = [(f"{task} · {metric}", metric, dose_response(dosed, metric, task)) for task in tasks]
    paths["markdown"].write_text(dashes(_report_page(summary, final, items, selection, protocol, primary, panels)))
    paths["comparisons"].write_text(dashes(_comparisons_page(summary, final, selection, protocol, primary)))
    endpoint_chart(panels, doses, paths["chart"])
    bar_chart(summary, paths["comparisons_chart"])
    if "curves_chart" in paths:
        curves_chart(curves, paths["curves_chart"])
    return paths


def _report_page(summary: pd.DataFrame, scores: pd.DataFrame, items: pd.DataFrame | None,
                 selection: pd.DataFrame | None, protocol: dict, primary: str, panels: list) -> str:
    """report.md: what a person reads in one screen; every comparison is in comparisons.md."""
    endpoint = protocol.get("endpoint")
    text = ["# pkt report", "", "Every arm on the endpoint first; the full listing of comparisons, the per-family "
            "overview, each chosen setting and each family's gates: [comparisons.md](comparisons.md).", ""]
    for title, metric, rows in panels:
        text += glance_table(rows, metric, title.split(" · ")[0])
    text += ["![Every arm on the endpoint: units as dots, the mean and its corrected interval, with chance, the "
             "untrained student, the oracle and the teacher as lines](report.png)", ""]
    controls = [(title, line) for title, metric, rows in panels for line in positive_control_lines(rows, metric)]
    if controls:
        text += ["## Positive controls: could this testbed register transfer?", "",
                 "Each arm's move from the untrained student on the endpoint, with the interval of the table above, "
                 "and as a share of the teacher − student gap (the gap taken at its mean). A null for transfer is "
                 "informative only beside a positive control that moved.", ""]
        text += [f"- {title}: {line}" for title, line in controls] + [""]
    metrics = _metrics(summary, primary)
    text += endpoint_section(summary, scores, items, endpoint) + scale_section(scores, protocol, gates=False)
    text += protocol_section(scores, selection, protocol, settings=False) + ["## Claims after correction", ""]
    text += [f"- {h}" for h in headlines(summary, primary)] + [""] + corrections_section(summary)
    size = [line for m in metrics for line in knowledge_vs_size(summary, m)]
    if size:
        text += ["## Knowledge vs size", "", "Transfer against the controls built to carry none of the teacher's "
                 "knowledge (spectrum-matched, shuffled: transfer's singular values at the same scale; "
                 "untrained-teacher: the same extraction from a teacher that learned nothing), each at its own "
                 f"chosen setting. A control is called size-matched only when its measured effective top singular "
                 f"value is within ±{SIZE_TOLERANCE:.0%} of transfer's.", ""] + [f"- {line}" for line in size] + [""]
    pooled = summary[summary["student"] == POOLED] if (summary["student"] == POOLED).any() else summary
    views = [view for m in metrics if (view := overview(pooled, m))]
    text += ["## Overview", "", OVERVIEW_NOTE + (" Rows over all families; each family's: comparisons.md."
                                                if pooled is not summary else ""), "", "\n\n".join(views), ""]
    return "\n".join(text) + diagnostic_section(scores, primary)


OVERVIEW_NOTE = ("Mean; T−X: transfer minus the row's variant with its 95% interval; ▲ transfer better, ▼ worse "
                 "(the corrected interval excludes 0; only on rows that carry a verdict), unmarked: not "
                 "distinguishable or descriptive.")


def _comparisons_page(summary: pd.DataFrame, scores: pd.DataFrame, selection: pd.DataFrame | None,
                      protocol: dict, primary: str) -> str:
    """comparisons.md: every group's overview, every chosen setting, every family's gates and every
    paired comparison, with its figure."""
    views = [view for m in _metrics(summary, primary) if (view := overview(summary, m))]
    text = ["# pkt report: every comparison", "", "The one-screen report: [report.md](report.md).", "",
            "## Overview", "", OVERVIEW_NOTE, "", "\n\n".join(views), ""]
    table = settings_table(scores, grids_of(scores, selection, protocol))
    if table:
        text += ["## Chosen settings", ""] + table
    gates = family_gates(protocol)
    if gates != [""]:
        text += ["## Families: sizes and quality gates", ""] + gates
    text += ["## Every comparison", "", "![Every paired difference with its 95% and corrected interval]"
             "(comparisons.png)", ""]
    return "\n".join(text) + "\n" + markdown(summary)


def read_csv(path) -> pd.DataFrame:
    """A runs or summary table as written above (empty cells are missing values, nothing else is). A
    path is read bounded (pkt_core/inputs.py: a regular file, its size, its lines, a .gz's unpacked size)."""
    if isinstance(path, (str, Path)):
        path = io.BytesIO(_table_bytes(Path(path)))
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _table_bytes(path: Path) -> bytes:
    what = "a CSV table pkt wrote (runs.csv in a report directory)"
    raw = inputs.read_bytes(path, what)
    if path.suffix == ".gz":
        max_bytes, _ = inputs.limits()
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(max_bytes + 1)
        except (OSError, EOFError) as e:
            raise inputs.InputError(f"{path}: not a readable gzip file ({e}); give {what}") from None
        if len(raw) > max_bytes:
            raise inputs.InputError(f"{path}: unpacks to more than {max_bytes / 2**20:g} MiB; check it is {what}, "
                                    "or pass --max-input-mb N to read it")
    inputs.check_line_lengths(path, raw, what)
    return raw


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
    tmp.write_text(Path(paths["markdown"]).read_text() + dashes(text))
    os.replace(tmp, paths["markdown"])
