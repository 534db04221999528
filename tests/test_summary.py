"""What a person reads of a sweep: report.md, the UI's summary and score table. No 'nan' anywhere (an
undefined number is '-'), the summary fits a ~1k px pane with the verdicts first, and the nodes are a
table of their own."""
import re

import numpy as np
import pandas as pd

from pkt.artifacts.store import Store
from pkt.core import report
from pkt.flows import summary as ui

NAN = re.compile(r"(?<![\w.])[+-]?nan(?!\w)", re.I)
PANE_CHARS = 140  # ~1k px at ~7 px a character


def sweep_runs() -> pd.DataFrame:
    """A demo-like runs table: exact match 0 for every run (the test family cannot add), answer NLL moving,
    vanilla one run, every other variant two seeds, a step-0 diagnostic on the trained runs (two cells: too
    few for its correlation)."""
    rng, rows = np.random.default_rng(0), []
    for v in ["vanilla", "lora", "transfer", "spectrum-matched", "pissa"]:
        for seed in [0] if v == "vanilla" else [0, 1]:
            for metric in ["exact_match/strict-match", "answer_nll"]:
                rows.append(dict(student="/x/student", task="gsm", benchmark="gsm", metric=metric, variant=v,
                                 seed=seed, setting="", value=0.0 if metric.startswith("exact") else rng.normal(2, .1),
                                 diag_cos=np.nan if v == "vanilla" else rng.normal(),
                                 diag_share=np.nan if v == "vanilla" else rng.random()))
    return pd.DataFrame(rows)


def test_report_md_says_dash_where_a_number_is_undefined(tmp_path):
    paths = report.write_report(sweep_runs(), tmp_path, "exact_match/strict-match")
    report.append_costs(paths, pd.DataFrame(columns=["variant", "runs", "teacher_side_s", "training_s_per_run",
                                                     "peak_rss_mib", "added_rss_mib", "shared_with"]))
    text = paths["markdown"].read_text()
    assert "diag_cos" in text  # the diagnostic's rows, whose correlation is undefined on 2 cells
    assert not NAN.findall(text), [line for line in text.splitlines() if NAN.search(line)][:3]


def test_dashes_replaces_formatted_nans_only():
    assert report.dashes("| +nan | [+nan, +nan] | nan | Δ +nan [+nan, +nan] | nano | 0.5 |") == \
        "| - | - | - | Δ - | nano | 0.5 |"


def test_the_summary_fits_a_pane_with_verdicts_first_and_nodes_apart(tmp_path):
    summary = report.summarize(sweep_runs(), None)
    results = [{"kind": "adapter", "key": f"{i:064x}", "status": "reused"} for i in range(243)]
    md = ui.summary_markdown(Store(tmp_path / "store"), "demo", results, tag="test", summary=summary,
                             headlines=report.headlines(summary, "answer_nll"))
    assert not NAN.findall(md)
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows and max(map(len, rows)) <= PANE_CHARS, max(rows, key=len)
    assert rows[0].split("|")[1:4] == [" variant ", " vs lora ", " transfer vs it "]
    assert len(rows) < 2 * len(summary) + 10  # the score rows only: no node table in the markdown
    assert "pkt-demo-test-nodes" in md
    nodes = ui.nodes_table(Store(tmp_path / "store"), results)
    assert len(nodes) == 243 and list(nodes[0]) == ["kind", "key", "status", "record"]


def test_the_score_table_artifact_puts_verdicts_first_and_has_no_nan():
    table = ui.ui_table(report.summarize(sweep_runs(), None))
    assert list(table[0])[:4] == ["variant", "metric", "verdict", "transfer_verdict"]
    cells = [x for row in table for x in row.values()]
    assert "-" in cells and not any(x is None or (isinstance(x, float) and np.isnan(x)) for x in cells)


def test_a_metric_that_moves_is_shown_first_with_a_line_that_says_why():
    summary = report.summarize(sweep_runs(), None)  # exact match 0 for every run, answer NLL moving
    shown, why = ui.lead_metric(summary, "exact_match/strict-match")
    assert shown == "answer_nll" and len(why) == 1 and "exact_match/strict-match is 0.0000 for every variant" in why[0]
    moving = sweep_runs()
    moving.loc[(moving["metric"] != "answer_nll") & (moving["variant"] == "transfer"), "value"] = 0.5
    assert ui.lead_metric(report.summarize(moving, None), "exact_match/strict-match") == \
        ("exact_match/strict-match", [])
    assert ui.lead_metric(summary, "answer_nll") == ("answer_nll", [])
